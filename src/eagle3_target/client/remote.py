"""RemoteTarget: a target served by ``eagle3-target serve``, with the surface of
:class:`~eagle3_target.contract.Eagle3TargetModel`.

A trainer swaps ``Eagle3TargetModel.from_pretrained(...)`` for
``RemoteTarget(["http://host-a:8000", "http://host-b:8000"], token=...)`` and keeps
calling ``generate_batch``. What this module owns:

- the wire (native ``/v1`` protocol, safetensors bodies; see ``docs/protocol.md``);
- the mode: ``logits`` and ``draft`` return what the server computed; ``hidden``
  (the default, 8H bytes/token in bf16) fetches aux + final-norm hidden and rebuilds
  the logits on the trainer's ``device`` with the LM head fetched once from
  ``/v1/lm_head`` (then the draft distribution, once :meth:`set_vocab_mapping` was
  called); ``topk`` is sparse and served by :meth:`generate_topk`;
- spreading requests over several servers (:mod:`.failover`: least in flight first),
  failing over on a connection error or 502/503/504, retrying with exponential
  backoff; every endpoint
  it calls is idempotent (supervision is a pure function of the inputs, mappings are
  content-addressed), so a retry can never double-count a batch;
- ``generate_batch_async`` and :meth:`prefetch`, a bounded in-order prefetch iterator;
- the bulk read path: a response body goes from the socket straight into one buffer
  (pinned host memory when ``device`` is CUDA; :mod:`.http_pool` says why
  ``http.client`` and not httpx), its tensors are zero-copy views into that buffer
  (:func:`eagle3_target.wire.st_stream.decode_buffer`, strictly validated: the library's
  ``load(bytes)`` would copy every tensor into fresh pageable memory), and they reach
  the device by pinned-to-device copies; every answer is checked (:mod:`.answers`).

Errors: :class:`RemoteTargetError` (the server refused the request: status, error
code, detail; never retried, except ``unknown_mapping``, answered by registering the
mapping on that server) and its subclass :class:`RemoteTargetUnavailable` (no server
answered within the retries).
"""

from __future__ import annotations

import collections
import concurrent.futures
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from eagle3_target.contract import (
    Eagle3TargetBatch,
    LMHead,
    shift_left_with_zero,
    validate_batch_inputs,
    zero_tail,
)
from eagle3_target.client.answers import (
    TopKBatch,
    bad_response,
    check_outputs,
    decode_tensors,
    error_from,
    identity_diff,
    lm_head_from,
    model_info_from,
    most_bytes,
)
from eagle3_target.client.failover import Server, Servers
from eagle3_target.client.http_pool import Reply
from eagle3_target.errors import RemoteTargetError, RemoteTargetUnavailable, TransportError
from eagle3_target.wire.v1 import (
    BATCH_POLICIES,
    MAX_TOPK,
    MODES,
    OUTPUT_DTYPES,
    SupervisionParams,
    encode_safetensors,
    response_spec,
)
from eagle3_target.vocab import VocabMapping, compute_target_distribution

__all__ = ["RemoteTarget", "TopKBatch"]

_RETRY_STATUS = (502, 503, 504)


class RemoteTarget:
    """The target behind one or more ``eagle3-target serve`` processes.

    Args:
        urls: one URL or several (``http://host:port``; ``http://user:TOKEN@host:port``
            sends the token as the HTTP Basic password).
        token: sent as ``Authorization: Bearer`` to every server.
        mode: ``hidden`` (default), ``logits``, ``draft`` or ``topk``.
        device: where returned tensors (and rebuilt logits) live.
        timeout: the deadline of one HTTP request, in seconds: sending it and reading
            its whole answer must end within it (a server that trickles bytes cannot
            stretch it). Each retry gets a fresh deadline, so a call returns or raises
            within about ``(retries + 1) * timeout`` plus the backoff sleeps.
        retries: extra attempts per request, across servers, before
            :class:`RemoteTargetUnavailable`.
        backoff, max_backoff: first and largest sleep (seconds) when no server is healthy.
        dtype: wire dtype of float outputs (``auto`` = the server model's dtype).
        topk: k for ``topk`` mode (1..64).
        max_in_flight: concurrent requests of ``generate_batch_async``/``prefetch``
            (default 2 per server).
        batch: ``shared`` (default) lets a server merge a request with others into one
            engine call; ``alone`` has each request run by itself, so the answer's bytes
            depend on the request only (the dump's ``--server`` path uses it).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        mode: str = "hidden",
        device: str | torch.device = "cpu",
        timeout: float = 120.0,
        retries: int = 6,
        backoff: float = 0.25,
        max_backoff: float = 5.0,
        dtype: str = "auto",
        topk: int | None = None,
        max_in_flight: int | None = None,
        batch: str = "shared",
    ):
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("RemoteTarget needs at least one server URL")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
        if topk is not None and not 1 <= topk <= MAX_TOPK:
            raise ValueError(f"topk must lie in 1..{MAX_TOPK}, got {topk}")
        if mode == "topk" and topk is None:
            raise ValueError("mode='topk' needs topk=k")
        if batch not in BATCH_POLICIES:
            raise ValueError(f"batch must be one of {', '.join(BATCH_POLICIES)}, got {batch!r}")
        if retries < 0 or timeout <= 0:
            raise ValueError("retries must be >= 0 and timeout > 0")
        self.mode = mode
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self.dtype = dtype
        self.topk = topk
        self.batch = batch
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_in_flight = max_in_flight or max(2, 2 * len(url_list))
        self._servers = Servers(url_list, token=token, timeout=timeout, pool=self.max_in_flight)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._mapping: VocabMapping | None = None
        self._device_mapping: tuple[torch.Tensor, torch.Tensor] | None = None
        self._head: LMHead | None = None
        self._embeddings: SimpleNamespace | None = None
        self._closed = False
        self.stats: collections.Counter[str] = collections.Counter()
        try:
            self.info: dict[str, Any] = model_info_from(self._request("GET", "/v1/model_info"))
        except BaseException:
            self.close()
            raise
        self.aux_layer_ids: list[int] = list(self.info["aux_layer_ids"])
        self.vocab_size: int = int(self.info["vocab_size"])
        self.hidden_size: int = int(self.info["hidden_size"])
        self.num_hidden_layers: int = int(self.info["num_hidden_layers"])
        if mode not in self.info.get("modes", MODES):
            self.close()
            raise ValueError(f"the server does not offer mode {mode!r} "
                             f"(it offers {self.info.get('modes')})")

    # ------------------------------------------------------------------ transport
    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def _verify(self, srv: Server) -> None:
        """First contact with a server: it must serve the same model as the others (the
        first answer, taken in the constructor, is the reference)."""
        info = getattr(self, "info", None)
        if srv.verified or info is None:
            srv.verified = True
            return
        resp = srv.http.request("GET", "/v1/model_info")
        if resp.status_code >= 400:
            if resp.status_code in _RETRY_STATUS:
                raise TransportError(f"{srv.url} answered {resp.status_code}")
            raise error_from(resp)
        theirs = model_info_from(resp)
        diff = identity_diff(info, theirs)
        if diff:
            raise RemoteTargetError(f"{srv.url} serves a different model than {self.urls[0]}: "
                                    f"{'; '.join(diff)}; give RemoteTarget servers of one model only")
        srv.verified = True

    def _request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                 content: bytes | None = None, bulk: bool = False,
                 max_body: int | None = None) -> Reply:
        """One idempotent request, with failover and backoff. ``bulk``: a 200 body is
        read straight into a buffer from :meth:`_alloc` (``Reply.buffer``). ``max_body``:
        the most bytes the answer can legitimately hold (a larger one is refused before
        it is read)."""
        if self._closed:
            raise RuntimeError("RemoteTarget is closed")
        attempt = 0
        sleeps = 0
        last: BaseException | None = None
        while True:
            srv = self._servers.pick()
            retry_after: float | None = None
            try:
                self._verify(srv)
                headers = {"Content-Type": "application/octet-stream"} if content is not None else None
                resp = srv.http.request(method, path, params=params, body=content,
                                        headers=headers, into=self._alloc if bulk else None,
                                        **({} if max_body is None else {"max_body": max_body}))
            except TransportError as e:
                last = e
                srv.mark_down()
            else:
                self.stats["requests"] += 1
                self.stats["bytes_sent"] += len(content or b"")
                self.stats["bytes_received"] += resp.nbytes
                if resp.status_code < 400:
                    srv.mark_up()
                    if resp.status_code != 200:  # 204, a redirect: not an answer we know
                        raise bad_response(resp, f"status {resp.status_code}, expected 200 "
                                                 "with a body")
                    self.stats[f"served_by:{srv.url}"] += 1
                    return resp
                err = error_from(resp)
                if resp.status_code in _RETRY_STATUS:
                    last = err
                    ra = resp.headers.get("retry-after", "")
                    retry_after = float(ra) if ra.replace(".", "", 1).isdigit() else None
                    srv.mark_down(retry_after)
                elif err.error == "unknown_mapping" and self._mapping is not None:
                    # A restarted or newly added server: register, then ask again.
                    last = err
                    try:
                        self._register(srv, self._mapping)
                    except TransportError as e:
                        last = e
                        srv.mark_down()
                else:
                    raise err
            finally:
                self._servers.release(srv)
            if attempt >= self.retries:
                raise RemoteTargetUnavailable(
                    f"{method} {path} failed on {len(self._servers)} server(s) after "
                    f"{attempt + 1} attempts; last error: {type(last).__name__}: {last}") from last
            attempt += 1
            self.stats["retries"] += 1
            if self._servers.any_healthy():
                self.stats["failovers"] += 1
                continue
            delay = min(self.max_backoff, self.backoff * 2 ** sleeps)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.max_backoff))
            time.sleep(delay * (0.75 + 0.5 * random.random()))
            sleeps += 1

    # ------------------------------------------------------------------ bulk bodies
    def _alloc(self, n: int) -> torch.Tensor:
        """The buffer a response body is read into: pinned when ``device`` is CUDA, so
        the copies to the device run at full speed (torch caches pinned blocks, so
        taking one per response is cheap after the first)."""
        return torch.empty(n, dtype=torch.uint8, pin_memory=self._pin)

    def _tensors(self, resp: Reply) -> dict[str, torch.Tensor]:
        return decode_tensors(resp, self.device)

    # ------------------------------------------------------------------ metadata
    def get_input_embeddings(self) -> SimpleNamespace:
        """``.weight [V,H]`` on ``device`` (fetched once)."""
        if self._embeddings is None:
            t = self._tensors(self._request("GET", "/v1/input_embeddings", bulk=True,
                                            max_body=self._matrix_bytes()))
            self._embeddings = SimpleNamespace(weight=t["weight"])
        return self._embeddings

    def lm_head(self) -> LMHead:
        """The target's LM head on ``device`` (fetched once from ``/v1/lm_head``)."""
        if self._head is None:
            resp = self._request("GET", "/v1/lm_head", bulk=True,
                                 max_body=self._matrix_bytes())
            self._head = lm_head_from(resp, self._tensors(resp), self.device)
        return self._head

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor | VocabMapping,
                          selected_token_mask: torch.Tensor | None = None) -> None:
        """Sets the draft vocabulary. In ``draft`` mode it is registered on every server
        now (and on any server that later reports it unknown); in ``hidden`` mode
        ``generate_batch`` then returns the draft form, computed here."""
        if isinstance(selected_token_ids, VocabMapping):
            mapping = selected_token_ids
        else:
            mapping = VocabMapping.from_ids(torch.as_tensor(selected_token_ids), self.vocab_size)
            if selected_token_mask is not None and not torch.equal(
                    selected_token_mask.to("cpu", torch.bool), mapping.selected_token_mask):
                raise ValueError("selected_token_mask does not mark exactly selected_token_ids")
        if mapping.target_vocab_size != self.vocab_size:
            raise ValueError(f"the mapping is over a vocabulary of {mapping.target_vocab_size}, "
                             f"the target's has {self.vocab_size}")
        self._mapping = mapping
        self._device_mapping = (mapping.selected_token_ids.to(self.device),
                                mapping.selected_token_mask.to(self.device))
        if self.mode == "draft":
            for srv in self._servers:
                try:
                    self._register(srv, mapping)
                except TransportError:
                    srv.mark_down()  # registered on first use after it comes back

    def _register(self, srv: Server, mapping: VocabMapping) -> None:
        body = encode_safetensors({"selected_token_ids": mapping.selected_token_ids,
                                   "selected_token_mask": mapping.selected_token_mask})
        resp = srv.http.request("POST", "/v1/vocab_mapping", body=body,
                                headers={"Content-Type": "application/octet-stream"})
        if resp.status_code >= 400:
            raise error_from(resp)
        try:
            got = resp.json().get("mapping_id")
        except (ValueError, AttributeError):
            raise bad_response(resp, "the answer of /v1/vocab_mapping is not a JSON object "
                                     "with mapping_id") from None
        if got != mapping.mapping_id:
            raise RemoteTargetError(f"{srv.url} registered mapping {got}, expected "
                                    f"{mapping.mapping_id}: client and server disagree on the hash")
        srv.mappings.add(got)

    # ------------------------------------------------------------------ supervision
    def _params(self, mode: str, k: int | None = None) -> dict[str, str]:
        mapping_id = None
        if mode == "draft":
            if self._mapping is None:
                raise RuntimeError("draft mode needs set_vocab_mapping() first")
            mapping_id = self._mapping.mapping_id
        return SupervisionParams(mode=mode, mapping_id=mapping_id, dtype=self.dtype,
                                 k=k, batch=self.batch).to_query()

    def _supervision(self, mode: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     loss_mask: torch.Tensor, k: int | None = None) -> dict[str, torch.Tensor]:
        validate_batch_inputs(input_ids, attention_mask, loss_mask, self.vocab_size)
        # Narrow integer dtypes on the wire: 6 bytes/token up instead of 24.
        body = encode_safetensors({
            "input_ids": input_ids.to("cpu", torch.int32 if self.vocab_size < 2**31 else torch.int64),
            "attention_mask": attention_mask.to("cpu", torch.bool),
            "loss_mask": loss_mask.to("cpu", torch.bool),
        })
        b, s = input_ids.shape
        draft = self._mapping.draft_vocab_size if mode == "draft" and self._mapping else None
        spec = response_spec(mode, rows=b, seq=s, info=self.info, dtype=self.dtype, k=k,
                             draft_vocab=draft)
        resp = self._request("POST", "/v1/supervision", params=self._params(mode, k), content=body,
                             bulk=True, max_body=most_bytes(spec.values()))
        tensors = self._tensors(resp)
        check_outputs(resp, mode, tensors, spec)
        return tensors

    def _matrix_bytes(self) -> int:
        """The most a ``[V,H]`` matrix answer (embeddings, LM head) may hold."""
        return most_bytes([((self.vocab_size, self.hidden_size + 1), None)])

    def _frame(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = self.device
        return {"input_ids": shift_left_with_zero(input_ids).to(dev),
                "attention_mask": attention_mask.to(dev),
                "loss_mask": shift_left_with_zero(loss_mask).to(dev)}

    @torch.no_grad()
    def generate_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       loss_mask: torch.Tensor) -> Eagle3TargetBatch:
        """Supervision for one batch, as ``Eagle3TargetModel.generate_batch`` returns it.

        Args:
            input_ids: ``[B,S] int64``, right-padded.
            attention_mask, loss_mask: ``[B,S]`` 0/1.

        Returns:
            ``logits`` mode: ``logits [B,S,V]``; ``draft`` mode: ``target_probs [B,S,Vd]``
            and ``position_mask [B,S,1]``; ``hidden`` mode: logits rebuilt here, or the
            draft form when a vocab mapping is set. Always ``aux_hidden_states [B,S,3H]``
            and the shifted ``input_ids``/``loss_mask``, on ``device``.
        """
        if self.mode == "topk":
            raise ValueError("mode='topk' gives sparse supervision: call generate_topk()")
        t = self._supervision(self.mode, input_ids, attention_mask, loss_mask)
        frame = self._frame(input_ids, attention_mask, loss_mask)
        # The answer's tensors are Eagle3TargetBatch fields by name, but for hidden mode,
        # whose final state becomes logits (and then the draft form) here.
        fields = {k: t[k].to(self.device) for k in MODES[self.mode].outputs}
        if "final_hidden" in fields:
            logits = self.logits_from_hidden(fields.pop("final_hidden"))
            if self._device_mapping is None:
                fields["logits"] = logits
            else:
                fields["target_probs"], fields["position_mask"] = compute_target_distribution(
                    logits, *self._device_mapping, frame["loss_mask"])
        return Eagle3TargetBatch(**fields, **frame)

    def logits_from_hidden(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Shifted ``final_hidden [B,S,H]`` -> shifted logits ``[B,S,V]`` (zero tail), as
        the server's ``logits`` mode would send them."""
        return zero_tail(self.lm_head()(final_hidden.to(self.device)))

    @torch.no_grad()
    def generate_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(aux [B,S,3H], final_hidden [B,S,H] shifted)`` as
        ``Eagle3TargetModel.generate_hidden`` returns them."""
        t = self._supervision("hidden", input_ids, attention_mask, loss_mask)
        return t["aux_hidden_states"].to(self.device), t["final_hidden"].to(self.device)

    @torch.no_grad()
    def generate_topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor, k: int | None = None) -> TopKBatch:
        """Top-k logits, their ids and the full-vocab logsumexp (mode ``topk``)."""
        k = k if k is not None else self.topk
        if k is None or not 1 <= k <= MAX_TOPK:
            raise ValueError(f"k must lie in 1..{MAX_TOPK}, got {k}")
        t = self._supervision("topk", input_ids, attention_mask, loss_mask, k=k)
        dev = self.device
        return TopKBatch(aux_hidden_states=t["aux_hidden_states"].to(dev),
                         topk_values=t["topk_values"].to(dev),
                         topk_indices=t["topk_indices"].to(dev),
                         logsumexp=t["logsumexp"].to(dev),
                         **self._frame(input_ids, attention_mask, loss_mask))

    # ------------------------------------------------------------------ async
    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.max_in_flight, thread_name_prefix="eagle3-remote")
            return self._executor

    def generate_batch_async(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             loss_mask: torch.Tensor) -> concurrent.futures.Future:
        """``generate_batch`` in a background thread; ``.result()`` gives the batch."""
        fn = self.generate_topk if self.mode == "topk" else self.generate_batch
        return self._pool().submit(fn, input_ids, attention_mask, loss_mask)

    def prefetch(self, batches: Iterable[Any], depth: int = 2) -> Iterator[Eagle3TargetBatch]:
        """Yields the supervision of each input batch, in order, keeping up to ``depth``
        requests in flight. Items are ``(input_ids, attention_mask, loss_mask)`` tuples
        or mappings with those keys. An error stops the iteration (pending requests are
        cancelled)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        it = iter(batches)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < depth:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    if isinstance(item, Mapping):
                        args = (item["input_ids"], item["attention_mask"], item["loss_mask"])
                    else:
                        args = tuple(item)
                    pending.append(self.generate_batch_async(*args))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stops background requests and closes connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._servers.close()

    def __enter__(self) -> "RemoteTarget":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteTarget({self.urls}, mode={self.mode!r}, device={str(self.device)!r})"
