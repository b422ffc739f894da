"""What the routes share: the server's state (settings, the worker, the registered
mappings, body reading, running a job) and the helpers both protocols use (model info,
a mapping from request tensors, JSON answers).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from eagle3_target.engines.common import text_config
from eagle3_target.errors import ApiError, EngineFailed, EngineOverloaded, WorkerUnavailable
from eagle3_target.server.metrics import ServerMetrics
from eagle3_target.server.settings import ServerSettings
from eagle3_target.server.worker import EngineWorker, Job
from eagle3_target.vocab import VocabMapping
from eagle3_target.wire.v1 import NEMO_GENERATE, response_spec

__all__ = ["ServerState", "ByteBudget", "HeldResponse", "OCTET", "answer_bytes", "json_response",
           "model_info", "mapping_from", "context_length"]

log = logging.getLogger("eagle3_target.server")

OCTET = "application/octet-stream"
_BINARY_TYPES = {"", OCTET, "application/x-safetensors"}
# An answer given before the request body was read ends the connection (the protocol
# lingers so the client still reads it): the unread body must not be parsed as the
# next request, and reading it first would let anyone hold the connection.
_CLOSE = {"Connection": "close"}


class ByteBudget:
    """Bytes of results held for answers not yet sent, over all connections.

    A request takes its answer's size (from the protocol's :func:`response_spec`) before
    it runs and gives it back once the answer is sent or dropped; while the budget is
    spent, new requests wait, so clients that stop reading slow the server down instead
    of filling its memory (each is cut off after ``send_timeout_s``). A request larger
    than the whole budget takes all of it and runs alone. Used from the event loop only.
    """

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self, n: int) -> int:
        """Waits for room for ``n`` bytes; returns what was taken (for :meth:`release`)."""
        n = max(0, min(n, self.total))
        while self.used + n > self.total:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        waiters, self._waiters = self._waiters, collections.deque()
        for fut in waiters:  # each re-checks; the ones that still do not fit queue again
            if not fut.done():
                fut.set_result(None)


def answer_bytes(mode: str, ids: torch.Tensor, target: Any, *, dtype: str = "auto",
                 k: int | None = None, mapping: VocabMapping | None = None,
                 float_bytes: int | None = None) -> int:
    """What a ``[B,S]`` request's answer holds, in bytes. Floats under ``auto`` keep the
    engine's dtype: they are counted at ``float_bytes`` (the worker's
    :meth:`~.worker.EngineWorker.float_bytes`), at 4 bytes while it is unknown (the
    budget errs towards holding more)."""
    b, s = ids.shape
    nemo = mode == NEMO_GENERATE.name
    spec = response_spec("draft" if nemo else mode, rows=b, seq=s, info=model_info(target),
                         dtype=dtype, k=k, draft_vocab=mapping.draft_vocab_size if mapping else None)
    total = sum(math.prod(shape) * (dt.itemsize if dt is not None else float_bytes or 4)
                for shape, dt in spec.values())
    return total + (16 * b * s if nemo else 0)  # NeMo's shifted input_ids and loss_mask


class HeldResponse(Response):
    """A response that gives its result bytes back to the :class:`ByteBudget` once it
    was sent (or the client went away)."""

    def __init__(self, content: bytes, release: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class ServerState:
    """One app's state: its settings, worker, metrics and the registered mappings."""

    def __init__(self, settings: ServerSettings, worker: EngineWorker, metrics: ServerMetrics,
                 request_shutdown: Callable[[], None] | None):
        self.settings = settings
        self.worker = worker
        self.metrics = metrics
        self.request_shutdown = request_shutdown
        self.mappings: collections.OrderedDict[str, VocabMapping] = collections.OrderedDict()
        self.nemo_mapping: VocabMapping | None = None
        self.stopping = False
        self.budget = ByteBudget(settings.max_response_bytes)

    @property
    def target(self):
        if self.stopping:
            raise ApiError(503, "stopping", "the server is shutting down",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        w = self.worker
        if w.state == "loading":
            raise ApiError(503, "loading", "the model is still loading; retry shortly",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if w.state != "ready" or w.target is None:
            raise ApiError(503, "unavailable", f"the engine is {w.state}",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        return w.target

    def register(self, mapping: VocabMapping) -> str:
        mid = mapping.mapping_id
        self.mappings[mid] = mapping
        self.mappings.move_to_end(mid)
        while len(self.mappings) > self.settings.max_mappings:
            self.mappings.popitem(last=False)
        return mid

    async def read_body(self, request: Request, *, binary: bool = True) -> bytes:
        if binary:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in _BINARY_TYPES:
                raise ApiError(415, "unsupported_media_type",
                               f"content-type {ctype!r}: send application/octet-stream",
                               headers=_CLOSE)
        limit = self.settings.max_request_bytes
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                declared = int(cl)
            except ValueError:
                raise ApiError(400, "bad_request", f"Content-Length {cl[:32]!r} is not an integer",
                               headers=_CLOSE)
            if declared > limit:  # from the headers: the body is never read
                raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds this "
                                                      f"server's limit of {limit} bytes",
                               headers=_CLOSE)
        chunks, total, more = [], 0, True
        while more:
            msg = await request.receive()
            if msg["type"] != "http.request":
                raise ApiError(400, "client_disconnected", "the client went away mid-body")
            chunk, more = msg.get("body", b""), msg.get("more_body", False)
            total += len(chunk)
            if total > limit:
                raise ApiError(413, "body_too_large",
                               f"body exceeds this server's limit of {limit} bytes",
                               headers=_CLOSE if more else None)
            chunks.append(chunk)
        return b"".join(chunks)

    async def run(self, job: Job) -> dict[str, torch.Tensor]:
        try:
            fut = self.worker.submit(job)
        except WorkerUnavailable as e:
            raise ApiError(503, "unavailable", str(e),
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        try:
            res = await asyncio.wrap_future(fut)
            if job.host_ready is not None:
                await run_in_threadpool(job.wait_host)
            return res
        except EngineOverloaded as e:
            raise ApiError(503, "engine_out_of_memory", f"{e}; retry later or send fewer tokens",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except WorkerUnavailable as e:
            raise ApiError(503, "unavailable", str(e),
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineFailed as e:
            raise ApiError(500, "engine_error", str(e)) from None
        except ValueError as e:
            raise ApiError(422, "invalid_input", str(e)) from None


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON answer (errors use ``ApiError.body()``)."""
    return JSONResponse(obj, status_code=status, headers=headers)


def context_length(target: Any) -> int | None:
    """The longest row the model takes (its ``max_position_embeddings``), or None when
    the engine's config does not say."""
    value = getattr(target, "max_context", None)
    if value is None:
        config = getattr(getattr(target, "model", None), "config", None)
        value = getattr(text_config(config), "max_position_embeddings", None) if config else None
    return int(value) if isinstance(value, int) and value > 0 else None


def model_info(target: Any) -> dict[str, Any]:
    """The shapes a client checks: the same keys on ``/v1/model_info`` and NeMo's ``/model_info``."""
    return {
        "num_hidden_layers": int(target.num_hidden_layers),
        "hidden_size": int(target.hidden_size),
        "vocab_size": int(target.vocab_size),
        "aux_layer_ids": list(target.aux_layer_ids),
    }


def mapping_from(tensors: dict[str, torch.Tensor | None], vocab_size: int) -> VocabMapping:
    """A draft vocabulary from request tensors (``selected_token_ids`` and optionally
    ``selected_token_mask``); ApiError 422 naming the field otherwise."""
    ids = tensors.get("selected_token_ids")
    if ids is None:
        raise ApiError(422, "missing_input", "selected_token_ids: missing",
                       field="selected_token_ids")
    unknown = sorted(set(tensors) - {"selected_token_ids", "selected_token_mask"})
    if unknown:
        raise ApiError(422, "invalid_input", f"{unknown[0]}: unknown tensor (expected "
                       "selected_token_ids and optionally selected_token_mask)", field=unknown[0])
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1 or ids.numel() == 0:
        raise ApiError(422, "invalid_input", f"selected_token_ids: must be a non-empty 1-D integer "
                       f"tensor, got shape {list(ids.shape)} dtype {ids.dtype}",
                       field="selected_token_ids")
    mask = tensors.get("selected_token_mask")
    try:
        mapping = VocabMapping.from_ids(ids.to(torch.int64), vocab_size)
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (vocab_size,):
                raise ValueError(f"selected_token_mask: must be a [{vocab_size}] bool tensor, got "
                                 f"shape {list(mask.shape)} dtype {mask.dtype}")
            if not torch.equal(mask, mapping.selected_token_mask):
                raise ValueError("selected_token_mask: does not mark exactly selected_token_ids")
    except ValueError as e:
        raise ApiError(422, "invalid_input", f"vocab mapping: {e}") from None
    return mapping
