"""The batching worker: one thread that owns the target model and batches requests.

HTTP handlers never touch the model's forward. They validate a request, wrap it as a
:class:`Job` and :meth:`EngineWorker.submit` it; the worker thread takes the oldest
job, packs every queued job of the same kind (``logits`` or ``hidden`` forward) that
fits ``max_batch_tokens`` (rows x longest row, right-padded) into one engine call while
that call holds fewer than ``merge_below_tokens`` (a job that asked to run ``alone`` is
never merged, either way),
splits the outputs back by row range, and finishes each job's own post-processing
(:mod:`.outputs`: EAGLE-3 shift, draft projection, top-k, dtype) before resolving its
future. GPU results
go to pinned host memory on a side stream, so the next engine call launches while the
copy drains. Decoding and encoding bodies happen in the handlers' threads, so they
overlap with the next engine call; there is no lock around a whole request.

Faults stay inside the batch that caused them: when a merged call fails (out of
memory, or an engine error a bad row provoked) each job is re-run alone, so only the
job that cannot run fails. Out of memory becomes :class:`EngineOverloaded` (the server
answers 503 with Retry-After); the worker keeps serving.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from eagle3_target.contract import Eagle3TargetModel, HiddenRunner
from eagle3_target.engines.packing import right_pad
from eagle3_target.errors import EngineFailed, EngineOverloaded, WorkerUnavailable
from eagle3_target.server.outputs import postprocess
from eagle3_target.vocab import VocabMapping
from eagle3_target.wire.v1 import MODES, NEMO_GENERATE

__all__ = ["Job", "EngineWorker", "forward_kind"]

log = logging.getLogger("eagle3_target.server")

_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None),
                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
    if isinstance(t, type)
)


def forward_kind(mode: str) -> str:
    """Which engine forward a mode needs (the mode table's ``forward``): ``hidden``
    skips the LM head."""
    return (NEMO_GENERATE if mode == NEMO_GENERATE.name else MODES[mode]).forward


@dataclass(eq=False)
class Job:
    """One request's rows.

    Attributes:
        mode: ``logits | draft | hidden | topk | nemo`` (nemo: NeMo's /generate output).
        input_ids, attention_mask: ``[B,S] int64`` CPU, already validated.
        loss_mask: ``[B,S] int64`` CPU or None (required by ``draft`` and ``nemo``).
        mapping: the draft vocabulary for ``draft``/``nemo``.
        out_dtype: wire dtype of float outputs; None keeps the engine's.
        k: top-k size for ``topk``.
    """

    mode: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor | None = None
    mapping: VocabMapping | None = None
    out_dtype: torch.dtype | None = None
    k: int | None = None
    alone: bool = False
    """Run in an engine call of its own (the request's ``batch=alone``)."""
    future: Future = field(default_factory=Future)
    batch_requests: int = 0
    """Set by the worker: how many requests shared the engine call."""
    host_ready: Any = None
    """Set by the worker for GPU results: a CUDA event the reader waits on before the
    (pinned, asynchronously copied) CPU tensors are complete; None when already there."""

    def wait_host(self) -> None:
        if self.host_ready is not None:
            self.host_ready.synchronize()

    @property
    def kind(self) -> str:
        return forward_kind(self.mode)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


class EngineWorker:
    """Owns the target and runs every forward, in one thread.

    ``loader`` builds the :class:`Eagle3TargetModel` inside the worker thread (so the
    thread that loads the engine is the one that drives it). ``on_batch`` is told
    ``(kind, n_requests, padded_tokens, real_tokens, seconds)`` after each engine call.

    ``merge_below_tokens`` (default half of ``max_batch_tokens``) stops merging once a
    call is that large. Merged answers come back together, so the clients that sent them
    wait for each other and then send their next requests together while the device
    idles: on an H200 with the Llama-3.1-8B shape, two clients of 4 x 2048-token hidden
    requests (8 each) kept 0.85-0.90x of in process when their requests merged (budget
    16,384) and 0.89-0.93x when none did, in three rounds (docs/benchmarks.md). Small
    requests still merge, where one call of its own would leave the device half empty.
    """

    def __init__(
        self,
        loader: Callable[[], Eagle3TargetModel],
        *,
        max_batch_tokens: int,
        merge_below_tokens: int | None = None,
        on_ready: Callable[[Eagle3TargetModel], None] | None = None,
        on_failed: Callable[[BaseException], None] | None = None,
        on_batch: Callable[[str, int, int, int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        on_oom: Callable[[], None] | None = None,
    ):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self._loader = loader
        self.max_batch_tokens = max_batch_tokens
        if merge_below_tokens is not None and not 1 <= merge_below_tokens <= max_batch_tokens:
            raise ValueError(f"merge_below_tokens must be in 1..{max_batch_tokens}, got {merge_below_tokens}")
        self.merge_below_tokens = max(1, max_batch_tokens // 2) if merge_below_tokens is None else merge_below_tokens
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._on_oom = on_oom
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._started = False
        self._copy_streams: dict[torch.device, Any] = {}
        self._float_bytes: dict[str, int] = {}
        self.state = "loading"  # loading | ready | failed | stopped
        self.error: BaseException | None = None
        self.target: Eagle3TargetModel | None = None
        self._thread = threading.Thread(target=self._main, name="eagle3-engine", daemon=True)

    # -- public ---------------------------------------------------------------------
    def start(self) -> None:
        """Starts loading in the worker thread. Idempotent."""
        with self._cv:
            if self._started:
                return
            self._started = True
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def supports_hidden(self) -> bool:
        return self.target is not None and isinstance(self.target.runner, HiddenRunner)

    def float_bytes(self, kind: str) -> int | None:
        """Bytes per element of the floating outputs of a ``kind`` forward (``logits``
        or ``hidden``), learnt from the first one that ran; None before. The answers'
        byte budget counts ``dtype=auto`` floats at this size: counted at 4 bytes, a
        bf16 ``logits`` answer at the 8B shape takes twice its room and two no longer
        fit the default budget together."""
        return self._float_bytes.get(kind)

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._pending)

    def submit(self, job: Job) -> Future:
        """Queues ``job``; its future resolves to the response tensors (CPU)."""
        with self._cv:
            if self.state != "ready" or self._stopping:
                raise WorkerUnavailable(f"engine is {self.state if not self._stopping else 'stopping'}")
            self._pending.append(job)
            self._notify_queue()
            self._cv.notify()
        return job.future

    def stop(self, timeout: float | None = None) -> None:
        """Finishes the queued jobs, then closes the target. Idempotent."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- thread ---------------------------------------------------------------------
    def _notify_queue(self) -> None:
        if self._on_queue is not None:
            self._on_queue(len(self._pending))

    def _main(self) -> None:
        try:
            self.target = self._loader()
        except BaseException as e:  # the server reports it and exits
            self.error = e
            self.state = "failed"
            log.error("engine failed to load: %s: %s", type(e).__name__, e)
            if self._on_failed is not None:
                self._on_failed(e)
            return
        with self._cv:
            self.state = "ready" if not self._stopping else "stopped"
        if self._on_ready is not None and self.state == "ready":
            self._on_ready(self.target)
        try:
            while True:
                with self._cv:
                    while not self._pending and not self._stopping:
                        self._cv.wait()
                    if not self._pending:
                        break
                    batch = self._take_batch_locked()
                    self._notify_queue()
                if batch:
                    self._run(batch)
        finally:
            with self._cv:
                self.state = "stopped"
                leftover = list(self._pending)
                self._pending.clear()
            for job in leftover:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(WorkerUnavailable("server is stopping"))
            try:
                self.target.close()
            except Exception as e:  # closing must not mask the shutdown
                log.warning("closing the engine raised %s: %s", type(e).__name__, e)

    def _take_batch_locked(self) -> list[Job]:
        """The oldest live job plus every queued job of its kind that fits the budget."""
        batch: list[Job] = []
        rows = seq = 0
        kind = None
        keep: collections.deque[Job] = collections.deque()
        while self._pending:
            job = self._pending.popleft()
            # A job asked to run alone neither joins a batch nor lets one join it.
            if (kind is not None and job.kind != kind) or (batch and (job.alone or batch[0].alone)):
                keep.append(job)
                continue
            new_rows, new_seq = rows + job.rows, max(seq, job.seq_len)
            if batch and (rows * seq >= self.merge_below_tokens or new_rows * new_seq > self.max_batch_tokens):
                keep.append(job)
                continue
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away before its turn
            batch.append(job)
            rows, seq, kind = new_rows, new_seq, job.kind
        self._pending = keep
        return batch

    def _forward(self, kind: str, ids: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.target is not None
        runner = self.target.runner
        if kind == "hidden":
            return runner.forward_eagle3_hidden(ids, mask)  # type: ignore[attr-defined]
        return runner.forward_eagle3(ids, mask)

    def _run(self, batch: list[Job]) -> None:
        kind = batch[0].kind
        rows = sum(j.rows for j in batch)
        seq = max(j.seq_len for j in batch)
        # Each job's rows as sent (its own pads included), right-padded to the longest.
        ids = right_pad([r for job in batch for r in job.input_ids], 0)
        mask = right_pad([r for job in batch for r in job.attention_mask], 0)
        spans = []
        r = 0
        for job in batch:
            spans.append((r, r + job.rows))
            r += job.rows
        t0 = time.perf_counter()
        try:
            out, aux = self._forward(kind, ids, mask)
        except BaseException as e:
            out = aux = None
            self._recover(batch, e)
            return
        if kind not in self._float_bytes:
            sizes = [t.element_size() for t in (out, aux) if t.dtype.is_floating_point]
            if sizes:
                self._float_bytes[kind] = max(sizes)
        for job, (r0, r1) in zip(batch, spans):
            job.batch_requests = len(batch)
            try:
                res = postprocess(job, out[r0:r1, :job.seq_len], aux[r0:r1, :job.seq_len])
                res, job.host_ready = self._to_host(res)
            except BaseException as e:
                self._fail(job, e)
                continue
            job.future.set_result(res)
        del out, aux
        dt = time.perf_counter() - t0
        if self._on_batch is not None:
            self._on_batch(kind, len(batch), rows * seq, int(mask.sum()), dt)

    def _recover(self, batch: list[Job], exc: BaseException) -> None:
        if isinstance(exc, _OOM_TYPES):
            self._free_memory()
        if len(batch) > 1:
            log.warning("merged engine call of %d requests raised %s; running them one by one",
                        len(batch), type(exc).__name__)
            for job in batch:
                self._run([job])
            return
        self._fail(batch[0], exc)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, _OOM_TYPES):
            self._free_memory()
            if self._on_oom is not None:
                self._on_oom()
            err: BaseException = EngineOverloaded(
                f"engine out of memory on {job.rows}x{job.seq_len} tokens")
        elif isinstance(exc, (ValueError, EngineOverloaded, EngineFailed)):
            err = exc
        else:
            log.exception("engine error on a %dx%d %s request", job.rows, job.seq_len, job.mode,
                          exc_info=exc)
            err = EngineFailed(f"{type(exc).__name__}: {exc}")
        job.future.set_exception(err)

    def _to_host(self, res: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """Starts copying a GPU result to pinned host memory on a side stream, so the
        next engine call is launched while the copy engine drains this one; the handler
        waits on the returned event. CPU results come back as they are."""
        on_gpu = [v for v in res.values() if v.is_cuda]
        if not on_gpu:
            return {k: v.to("cpu") for k, v in res.items()}, None
        dev = on_gpu[0].device
        stream = self._copy_streams.get(dev)
        if stream is None:
            stream = self._copy_streams[dev] = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        host: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(stream):
            for k, v in res.items():
                if not v.is_cuda:
                    host[k] = v.to("cpu")
                    continue
                h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                h.copy_(v, non_blocking=True)
                v.record_stream(stream)  # keep the device memory until the copy is done
                host[k] = h
            done = torch.cuda.Event()
            done.record(stream)
        return host, done

    @staticmethod
    def _free_memory() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
