"""The HTTP application: native ``/v1`` endpoints, NeMo-compatible root endpoints,
``/health`` and ``/metrics``, with auth, limits and JSON errors.

FastAPI (on Starlette) routes the requests; bodies are raw bytes (safetensors on
``/v1``, NMET on the root endpoints), so no pydantic models are involved. This module
assembles the app: the worker's lifespan, the error handlers, health and metrics, the
routes of :mod:`.routes_v1` and :mod:`.routes_nemo`, and the :class:`~.auth.Guard`
around it all.

Status codes: 400 malformed body, 401 auth, 404 unknown path, 405 wrong method,
408 headers too slow and 431 headers too large (from the connection, :mod:`.protocol`),
409 NeMo ``/generate`` before ``/set_vocab_mapping`` or a second NeMo mapping, 413 body,
token or context cap, 415 wrong content type, 422 invalid field or parameter, 501
capability the engine lacks, 503 loading / stopping / out of memory (with
``Retry-After``), 500 engine error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from eagle3_target.errors import ApiError
from eagle3_target.server import routes_nemo, routes_v1
from eagle3_target.server.auth import Guard
from eagle3_target.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from eagle3_target.server.settings import ServerSettings
from eagle3_target.server.state import ServerState, json_response
from eagle3_target.server.worker import EngineWorker

__all__ = ["ServerSettings", "create_app"]

log = logging.getLogger("eagle3_target.server")


def create_app(settings: ServerSettings, worker: EngineWorker, metrics: ServerMetrics,
               *, request_shutdown: Callable[[], None] | None = None) -> Any:
    """The ASGI app. ``worker`` is started with the app and stopped (drained) with it."""
    state = ServerState(settings, worker, metrics, request_shutdown)

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
        return json_response(e.body(), e.status, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        names = {404: "not_found", 405: "method_not_allowed"}
        detail = {404: f"no endpoint {request.url.path}",
                  405: f"{request.method} is not allowed on {request.url.path}"}
        return json_response({"error": names.get(e.status_code, "http_error"),
                              "detail": detail.get(e.status_code, str(e.detail))},
                             e.status_code, dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=e)
        return json_response({"error": "internal", "detail": f"{type(e).__name__}"}, 500)

    # ------------------------------------------------------------------ health, metrics
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.stopping:
            return json_response({"status": "stopping"}, 503)
        s = worker.state
        if s == "ready":
            return json_response({"status": "ok"})
        return json_response({"status": s}, 503, {"Retry-After": str(settings.retry_after_s)})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.queue_depth.set(worker.queue_depth())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes_v1.add_routes(app, state)
    routes_nemo.add_routes(app, state)

    paths = {r.path for r in app.routes if hasattr(r, "path")}
    return Guard(app, token=settings.token, metrics=metrics, known_paths=lambda: paths,
                 retry_after_s=settings.retry_after_s)
