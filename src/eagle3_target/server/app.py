"""The HTTP application: native ``/v1`` endpoints, NeMo-compatible root endpoints,
``/health`` and ``/metrics``, with auth, limits and JSON errors.

FastAPI (on Starlette) routes the requests; bodies are raw bytes (safetensors on
``/v1``, NMET on the root endpoints), so no pydantic models are involved. One pure-ASGI
middleware, :class:`Guard`, checks the token (constant-time, Bearer or HTTP Basic
password; ``/health`` stays open) and records metrics for every response, 401s and
404s included. Handlers validate fully before queueing work on the
:class:`~eagle3_target.server.engine.EngineWorker`; decoding and encoding run in
worker threads so the event loop never blocks on a large body.

Status codes: 400 malformed body, 401 auth, 404 unknown path, 405 wrong method,
409 NeMo ``/generate`` before ``/set_vocab_mapping``, 413 body or token cap, 415 wrong
content type, 422 invalid field or parameter, 501 capability the engine lacks,
503 loading / out of memory (with ``Retry-After``), 500 engine error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from eagle3_target.contract import HiddenRunner
from eagle3_target.server import nmet
from eagle3_target.server.engine import (
    EngineFailed,
    EngineOverloaded,
    EngineWorker,
    Job,
    WorkerUnavailable,
)
from eagle3_target.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from eagle3_target.server.protocol import (
    MAX_TOPK,
    MODES,
    OUTPUT_DTYPES,
    PROTOCOL_VERSION,
    ApiError,
    check_inputs,
    decode_safetensors,
    encode_safetensors,
    parse_supervision_params,
    safetensors_parts,
)
from eagle3_target.vocab import VocabMapping

__all__ = ["ServerSettings", "create_app"]

log = logging.getLogger("eagle3_target.server")

OCTET = "application/octet-stream"
_BINARY_TYPES = {"", OCTET, "application/x-safetensors"}
# A body over the cap is read and dropped up to this many bytes, so the client sees
# the 413 instead of a reset connection; beyond it the connection is closed.
_DRAIN_LIMIT = 256 << 20


@dataclass
class ServerSettings:
    """What the HTTP layer needs to know; the CLI fills it from flags."""

    token: str | None = None
    max_request_bytes: int = 64 << 20
    max_batch_tokens: int = 16384
    """Also the per-request token cap: a request must fit one engine call."""
    exit_on_disconnect: bool = False
    max_mappings: int = 64
    model_name: str = ""
    engine: str = ""
    retry_after_s: int = 2


# --------------------------------------------------------------------------- guard


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def token_matches(authorization: str | None, token_digest: bytes) -> bool:
    """Bearer ``<token>`` or Basic ``base64(user:<token>)``, compared in constant time."""
    if not authorization:
        return False
    scheme, _, cred = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        presented = cred.strip()
    elif scheme == "basic":
        try:
            decoded = base64.b64decode(cred.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        _user, sep, presented = decoded.partition(":")
        if not sep:
            return False
    else:
        return False
    # Hashing first makes the comparison length-independent too.
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), token_digest)


async def _drain(receive: Callable, limit: int) -> None:
    """Reads and drops the request body (up to ``limit`` bytes)."""
    seen = 0
    while seen <= limit:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


class Guard:
    """Auth and metrics around the whole app (pure ASGI: no per-request task or copy)."""

    def __init__(self, app: Any, *, token: str | None, metrics: ServerMetrics,
                 known_paths: Callable[[], set[str]]):
        self.app = app
        self.metrics = metrics
        self._digest = hashlib.sha256(token.encode()).digest() if token else None
        self._known = known_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self._known() else "other"
        t0 = time.perf_counter()
        status = {"code": 500}
        sent = {"bytes": 0}

        async def send_wrapper(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            elif msg["type"] == "http.response.body":
                sent["bytes"] += len(msg.get("body", b""))
            await send(msg)

        counted = path not in ("/health", "/metrics")
        if counted:
            self.metrics.in_flight.inc()
        try:
            if (self._digest is not None and path != "/health"
                    and not token_matches(_header(scope, b"authorization"), self._digest)):
                await _drain(receive, _DRAIN_LIMIT)
                body = json.dumps({"error": "unauthorized", "detail":
                                   "missing or wrong token: send 'Authorization: Bearer <token>' "
                                   "or HTTP Basic auth with the token as the password"}).encode()
                await send_wrapper({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="eagle3-target", Basic realm="eagle3-target"'),
                ]})
                await send_wrapper({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                self.metrics.in_flight.dec()
            self.metrics.observe_request(endpoint, scope.get("method", "?"), status["code"],
                                         time.perf_counter() - t0, sent["bytes"])


# --------------------------------------------------------------------------- streaming


class SafetensorsStream(Response):
    """A safetensors body sent as its header and then the tensors' own memory.

    ``/v1/supervision`` answers hundreds of MB per request on a GPU (268 MB for a
    4x2048 hidden-mode request of an 8B model); building one ``bytes`` object first
    costs a full copy into fresh memory (about 1.5 GB/s there). Here Content-Length is
    known from the header, and the body goes out as ``chunk``-sized memoryviews of the
    (pinned, contiguous) result tensors, which uvicorn's httptools protocol hands
    straight to the transport (its h11 protocol joins each chunk into bytes: one copy
    of ``chunk`` bytes at a time, never of the whole body). Chunking also keeps the
    transport's write buffer small: uvicorn waits for it to drain before the next one.
    """

    media_type = OCTET

    def __init__(self, header: bytes, pieces: list[memoryview], *, headers: dict[str, str],
                 chunk: int = 1 << 20):
        self._header, self._pieces, self._chunk = header, pieces, chunk
        super().__init__(b"", media_type=OCTET, headers=headers)
        self.headers["content-length"] = str(len(header) + sum(p.nbytes for p in pieces))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self._header, "more_body": True})
        for piece in self._pieces:
            for off in range(0, piece.nbytes, self._chunk):
                await send({"type": "http.response.body", "body": piece[off:off + self._chunk],
                            "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# --------------------------------------------------------------------------- state


class _State:
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
                await _drain(request.receive, _DRAIN_LIMIT)
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
                await _drain(request.receive, _DRAIN_LIMIT)
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
                    await _drain(request.receive, _DRAIN_LIMIT)
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


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(obj, status_code=status, headers=headers)


def _model_info(target) -> dict[str, Any]:
    return {
        "num_hidden_layers": int(target.num_hidden_layers),
        "hidden_size": int(target.hidden_size),
        "vocab_size": int(target.vocab_size),
        "aux_layer_ids": list(target.aux_layer_ids),
    }


def _mapping_from(tensors: dict[str, torch.Tensor | None], vocab_size: int) -> VocabMapping:
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


# --------------------------------------------------------------------------- app


def create_app(settings: ServerSettings, worker: EngineWorker, metrics: ServerMetrics,
               *, request_shutdown: Callable[[], None] | None = None) -> Any:
    """The ASGI app. ``worker`` is started with the app and stopped (drained) with it."""
    state = _State(settings, worker, metrics, request_shutdown)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        yield
        state.stopping = True
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="eagle3-target", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.eagle3 = state

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return _json(e.body(), e.status, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        names = {404: "not_found", 405: "method_not_allowed"}
        detail = {404: f"no endpoint {request.url.path}",
                  405: f"{request.method} is not allowed on {request.url.path}"}
        return _json({"error": names.get(e.status_code, "http_error"),
                      "detail": detail.get(e.status_code, str(e.detail))},
                     e.status_code, dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=e)
        return _json({"error": "internal", "detail": f"{type(e).__name__}"}, 500)

    # ------------------------------------------------------------------ health, metrics
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.stopping:
            return _json({"status": "stopping"}, 503)
        s = worker.state
        if s == "ready":
            return _json({"status": "ok"})
        return _json({"status": s}, 503, {"Retry-After": str(settings.retry_after_s)})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.queue_depth.set(worker.queue_depth())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ native /v1
    @app.get("/v1/model_info")
    async def v1_model_info() -> JSONResponse:
        target = state.target
        runner = target.runner
        modes = [m for m in MODES if m != "hidden" or isinstance(runner, HiddenRunner)]
        try:
            p = next(iter(target.model.parameters()))
            dtype, device = str(p.dtype).replace("torch.", ""), str(p.device)
        except Exception:
            dtype = device = "unknown"
        return _json({
            "protocol": PROTOCOL_VERSION,
            "model": settings.model_name,
            "engine": settings.engine,
            **_model_info(target),
            "dtype": dtype,
            "device": device,
            "modes": modes,
            "output_dtypes": list(OUTPUT_DTYPES),
            "max_topk": MAX_TOPK,
            "max_batch_tokens": settings.max_batch_tokens,
            "max_request_tokens": settings.max_batch_tokens,
            "max_request_bytes": settings.max_request_bytes,
        })

    @app.get("/v1/input_embeddings")
    async def v1_input_embeddings() -> Response:
        target = state.target

        def build() -> bytes:
            w = target.get_input_embeddings().weight
            return encode_safetensors({"weight": w})

        return Response(await run_in_threadpool(build), media_type=OCTET)

    @app.get("/v1/lm_head")
    async def v1_lm_head() -> Response:
        target = state.target
        if not isinstance(target.runner, HiddenRunner):
            raise ApiError(501, "not_supported", f"engine {settings.engine!r} does not expose its "
                                                 "LM head (hidden mode unavailable)")

        def build() -> bytes:
            head = target.lm_head()
            t = {"weight": head.weight,
                 "logit_scale": torch.tensor(float(head.scale), dtype=torch.float64)}
            if head.bias is not None:
                t["bias"] = head.bias
            if head.softcap is not None:
                t["logit_softcap"] = torch.tensor(float(head.softcap), dtype=torch.float64)
            return encode_safetensors(t)

        return Response(await run_in_threadpool(build), media_type=OCTET)

    @app.post("/v1/vocab_mapping")
    async def v1_vocab_mapping(request: Request) -> JSONResponse:
        target = state.target
        body = await state.read_body(request)
        tensors = await run_in_threadpool(decode_safetensors, body)
        mapping = await run_in_threadpool(_mapping_from, tensors, target.vocab_size)
        mid = state.register(mapping)
        return _json({"mapping_id": mid, "draft_vocab_size": mapping.draft_vocab_size,
                      "target_vocab_size": mapping.target_vocab_size})

    @app.post("/v1/supervision")
    async def v1_supervision(request: Request) -> Response:
        target = state.target
        query = request.query_params
        dup = [k for k in set(query.keys()) if len(query.getlist(k)) > 1]
        if dup:
            raise ApiError(422, "invalid_parameter", f"query parameter {dup[0]!r}: given more "
                                                     "than once", field=dup[0])
        params = parse_supervision_params(dict(query))
        if params.mode == "hidden" and not isinstance(target.runner, HiddenRunner):
            raise ApiError(501, "not_supported", f"engine {settings.engine!r} has no hidden mode")
        mapping = None
        if params.mode == "draft":
            mapping = state.mappings.get(params.mapping_id or "")
            if mapping is None:
                raise ApiError(422, "unknown_mapping", f"mapping_id {params.mapping_id!r} is not "
                               "registered here: POST it to /v1/vocab_mapping first",
                               field="mapping_id")
        body = await state.read_body(request)

        def prepare():
            tensors = decode_safetensors(body)
            return check_inputs(tensors, vocab_size=target.vocab_size,
                                need_loss_mask=params.mode == "draft",
                                max_tokens=settings.max_batch_tokens)

        ids, mask, loss = await run_in_threadpool(prepare)
        job = Job(mode=params.mode, input_ids=ids, attention_mask=mask, loss_mask=loss,
                  mapping=mapping, out_dtype=OUTPUT_DTYPES[params.dtype], k=params.k)
        res = await state.run(job)
        meta = {"protocol": str(PROTOCOL_VERSION), "mode": params.mode,
                "aux_layer_ids": json.dumps(list(target.aux_layer_ids))}
        header, pieces = await run_in_threadpool(safetensors_parts, res, meta)
        metrics.tokens.labels(params.mode).inc(job.real_tokens)
        return SafetensorsStream(header, pieces,
                                 headers={"X-Eagle3-Batch-Requests": str(job.batch_requests)})

    # ------------------------------------------------------------------ NeMo root
    @app.post("/model_info")
    async def nemo_model_info(request: Request) -> JSONResponse:
        target = state.target
        await state.read_body(request, binary=False)
        return _json(_model_info(target))

    @app.post("/input_embeddings")
    async def nemo_input_embeddings(request: Request) -> Response:
        target = state.target
        await state.read_body(request, binary=False)

        def build() -> bytes:
            w = target.get_input_embeddings().weight
            return nmet.encode({"weight": w.detach().to("cpu")})

        return Response(await run_in_threadpool(build), media_type=OCTET)

    def _nmet(body: bytes) -> dict[str, torch.Tensor | None]:
        try:
            return nmet.decode(body)
        except nmet.NMETError as e:
            raise ApiError(400, "bad_body", f"body is not a valid NMET blob: {e}") from None

    @app.post("/set_vocab_mapping")
    async def nemo_set_vocab_mapping(request: Request) -> JSONResponse:
        target = state.target
        body = await state.read_body(request, binary=False)
        tensors = await run_in_threadpool(_nmet, body)
        mapping = await run_in_threadpool(_mapping_from, tensors, target.vocab_size)
        state.nemo_mapping = mapping
        state.register(mapping)
        return _json({"status": "ok"})

    @app.post("/generate")
    async def nemo_generate(request: Request) -> Response:
        target = state.target
        body = await state.read_body(request, binary=False)
        mapping = state.nemo_mapping

        def prepare():
            tensors = _nmet(body)
            checked = check_inputs(tensors, vocab_size=target.vocab_size, need_loss_mask=True,
                                   max_tokens=settings.max_batch_tokens)
            return checked, tensors["input_ids"].dtype, tensors["loss_mask"].dtype

        (ids, mask, loss), ids_dtype, loss_dtype = await run_in_threadpool(prepare)
        if mapping is None:
            raise ApiError(409, "no_vocab_mapping", "POST /set_vocab_mapping before /generate")
        job = Job(mode="nemo", input_ids=ids, attention_mask=mask, loss_mask=loss, mapping=mapping)
        res = await state.run(job)
        # NeMo's in-process path shifts the tensors it was given, keeping their dtype.
        res["input_ids"] = res["input_ids"].to(ids_dtype)
        res["loss_mask"] = res["loss_mask"].to(loss_dtype)
        data = await run_in_threadpool(nmet.encode, res)
        metrics.tokens.labels("nemo").inc(job.real_tokens)
        return Response(data, media_type=OCTET,
                        headers={"X-Eagle3-Batch-Requests": str(job.batch_requests)})

    @app.post("/init_nccl")
    async def nemo_init_nccl(request: Request) -> JSONResponse:
        await state.read_body(request, binary=False)
        return _json({"status": "disabled"})

    @app.post("/heartbeat")
    async def nemo_heartbeat(request: Request) -> JSONResponse:
        await state.read_body(request, binary=False)
        return _json({"status": "ok"})

    @app.post("/disconnect")
    async def nemo_disconnect(request: Request) -> JSONResponse:
        await state.read_body(request, binary=False)
        if settings.exit_on_disconnect and state.request_shutdown is not None:
            log.info("client disconnected; shutting down (--exit-on-disconnect)")
            asyncio.get_running_loop().call_later(0.05, state.request_shutdown)
        return _json({"status": "ok"})

    paths = {r.path for r in app.routes if hasattr(r, "path")}
    return Guard(app, token=settings.token, metrics=metrics, known_paths=lambda: paths)
