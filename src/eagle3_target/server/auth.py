"""Who may ask: the token check and the ASGI guard around the whole app.

:class:`Guard` is pure ASGI (no per-request task or copy): it checks the token
(constant-time, Bearer or HTTP Basic password; ``/health`` stays open) from the headers
alone, so no token is needed to be refused but none to hold a connection either, and
records metrics for every response, 401s and 404s included.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from eagle3_target.server.metrics import ServerMetrics

__all__ = ["Guard", "token_matches"]

log = logging.getLogger("eagle3_target.server")


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


class Guard:
    """Auth and metrics around the whole app (pure ASGI: no per-request task or copy)."""

    def __init__(self, app: Any, *, token: str | None, metrics: ServerMetrics,
                 known_paths: Callable[[], set[str]], retry_after_s: int = 1):
        self.app = app
        self._retry_after = str(retry_after_s).encode()
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
                status["started"] = 1
            elif msg["type"] == "http.response.body":
                sent["bytes"] += len(msg.get("body", b""))
            await send(msg)

        counted = path not in ("/health", "/metrics")
        if counted:
            self.metrics.in_flight.inc()
        try:
            if (self._digest is not None and path != "/health"
                    and not token_matches(_header(scope, b"authorization"), self._digest)):
                # Decided from the headers alone: the body is never read (the connection
                # closes after the answer; the protocol lingers so the client reads it).
                body = json.dumps({"error": "unauthorized", "detail":
                                   "missing or wrong token: send 'Authorization: Bearer <token>' "
                                   "or HTTP Basic auth with the token as the password"}).encode()
                await send_wrapper({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="eagle3-target", Basic realm="eagle3-target"'),
                    (b"connection", b"close"),
                ]})
                await send_wrapper({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # Only the shutdown cancels a request (one still waiting on the engine after
            # the grace period): one line instead of a traceback, and a 503 the client
            # may retry elsewhere when nothing was answered yet.
            log.warning("%s %s cancelled by the shutdown", scope.get("method", "?"), path)
            if status["code"] == 500 and not sent["bytes"] and not status.get("started"):
                body = json.dumps({"error": "stopping", "detail": "the server shut down before "
                                   "this request was answered; retry"}).encode()
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"connection", b"close"),
                    (b"retry-after", self._retry_after),  # as every other 503 of ours
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                status["code"] = 503
        finally:
            if counted:
                self.metrics.in_flight.dec()
            self.metrics.observe_request(endpoint, scope.get("method", "?"), status["code"],
                                         time.perf_counter() - t0, sent["bytes"])
