"""What the routes share: the server's state (settings, the worker, the registered
mappings, body reading, running a job) and the helpers both protocols use (model info,
a mapping from request tensors, JSON answers).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from eagle3_target.errors import ApiError, EngineFailed, EngineOverloaded, WorkerUnavailable
from eagle3_target.server.auth import DRAIN_LIMIT, drain
from eagle3_target.server.metrics import ServerMetrics
from eagle3_target.server.settings import ServerSettings
from eagle3_target.server.worker import EngineWorker, Job
from eagle3_target.vocab import VocabMapping

__all__ = ["ServerState", "OCTET", "json_response", "model_info", "mapping_from"]

log = logging.getLogger("eagle3_target.server")

OCTET = "application/octet-stream"
_BINARY_TYPES = {"", OCTET, "application/x-safetensors"}


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
                await drain(request.receive, DRAIN_LIMIT)
                raise ApiError(415, "unsupported_media_type",
                               f"content-type {ctype!r}: send application/octet-stream")
        limit = self.settings.max_request_bytes
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                declared = int(cl)
            except ValueError:
                raise ApiError(400, "bad_request", f"Content-Length {cl[:32]!r} is not an integer")
            if declared > limit:
                await drain(request.receive, DRAIN_LIMIT)
                raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds this "
                                                      f"server's limit of {limit} bytes")
        chunks, total, more = [], 0, True
        while more:
            msg = await request.receive()
            if msg["type"] != "http.request":
                raise ApiError(400, "client_disconnected", "the client went away mid-body")
            chunk, more = msg.get("body", b""), msg.get("more_body", False)
            total += len(chunk)
            if total > limit:
                if more:
                    await drain(request.receive, DRAIN_LIMIT)
                raise ApiError(413, "body_too_large",
                               f"body exceeds this server's limit of {limit} bytes")
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
