"""Keep-alive HTTP/1.1 connections to one server, reading large bodies into a buffer
the caller allocates: the client's transport.

Why not httpx (the rest of the project's HTTP client) for this: a ``/v1/supervision``
answer is hundreds of MB on a GPU host (268 MB for a 4x2048 hidden-mode request of an
8B model), and there httpx's ``.content`` read 0.44-0.59 GB/s on loopback (its
``iter_raw`` into a buffer 0.5 GB/s), while ``http.client``'s ``HTTPResponse.readinto``
into a preallocated buffer read 1.0-1.06 GB/s (scripts/gpu/diag_io.py). urllib3 has
pooling but its ``readinto`` goes through ``read()`` (a temporary ``bytes`` and a copy).
So the standard library's ``http.client`` carries the bytes, straight from the socket
into the caller's buffer (pinned host memory when the client's device is CUDA), and
this module adds what httpx gave: a pool of keep-alive connections, a connect timeout,
a transparent retry on a pooled connection the server had closed, and one error type
for "no answer" (:class:`TransportError`).

Two bounds httpx does not give either:

- **A deadline per request**, not a timeout per socket read: a server that drips one
  byte a second would otherwise hold a read "timeout" of 2 s for ever. One watchdog
  thread (:class:`_Watchdog`, shared by every pool) shuts a request's socket down when
  its deadline passes, which ends any read or write in progress; the request then
  raises :class:`TransportError` saying the deadline passed.
- **A cap on what a body may cost**: a declared ``Content-Length`` above the caller's
  ``max_body`` (the most the request can legitimately bring back) is refused before
  anything is allocated, and a body without a length is read only up to the cap.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import torch

from eagle3_target.errors import RemoteTargetError, TransportError

__all__ = ["HttpPool", "Reply", "TransportError", "MAX_SMALL_BODY"]

# The largest body read without a caller's own cap (model info, mapping ids, errors).
MAX_SMALL_BODY = 16 << 20


class _Watchdog:
    """One daemon thread that shuts sockets down when their request's deadline passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: dict[int, bool] = {}  # token -> expired
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, when: float) -> int:
        with self._cv:
            token = next(self._ids)
            self._live[token] = False
            heapq.heappush(self._heap, (when, token, sock))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="eagle3-deadlines",
                                                daemon=True)
                self._thread.start()
            if self._heap[0][1] == token:
                self._cv.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Forgets ``token``; True when its deadline had passed (the socket is shut)."""
        with self._cv:
            return self._live.pop(token, False)

    def _main(self) -> None:
        with self._cv:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # disarmed
                if not self._heap:
                    self._cv.wait()
                    continue
                when, token, sock = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cv.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                self._live[token] = True
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed


_WATCHDOG = _Watchdog()


@dataclass
class Reply:
    """A complete response. The body is in ``body`` (bytes) or, when the caller asked
    for it and the answer was a 200 with a Content-Length, in ``buffer`` (``[n] uint8``)."""

    method: str
    url: str  # without the query
    status_code: int
    headers: Mapping[str, str]
    body: bytes | None = None
    buffer: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() if self.buffer is not None else len(self.body or b"")

    @property
    def content(self) -> bytes:
        if self.buffer is not None:
            return bytes(memoryview(self.buffer.numpy()))
        return self.body or b""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class HttpPool:
    """Connections to one ``http(s)://host:port[/prefix]`` server, reused across requests
    and threads (one request per connection at a time; at most ``max_idle`` kept).

    Args:
        url: the server's base URL (no userinfo; the caller turns that into a header).
        headers: sent with every request (auth).
        timeout: seconds one request may take once connected: a deadline for sending it
            and reading its whole answer, not a limit per socket read.
        connect_timeout: seconds to establish a connection.
    """

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 timeout: float, connect_timeout: float, max_idle: int = 8):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL {url!r}: expected http(s)://host:port")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = {"User-Agent": "eagle3-target-client", **(headers or {})}
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ connections
    def _new(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self._connect_timeout)
        conn.connect()
        conn.sock.settimeout(self._timeout)
        # Headers and a small body go out in one write, but make sure Nagle never holds
        # a request back waiting for an ACK.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _take(self) -> tuple[http.client.HTTPConnection | None, bool]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the connection pool is closed")
            if self._idle:
                return self._idle.pop(), True
        return None, False

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Closes idle connections; those in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------ requests
    def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                body: bytes | None = None, headers: Mapping[str, str] | None = None,
                into: Callable[[int], torch.Tensor] | None = None,
                max_body: int = MAX_SMALL_BODY) -> Reply:
        """One request and its complete response, within one deadline of ``timeout``
        seconds from now (connecting, sending, the headers and the whole body).

        ``into(n)`` (optional) returns a ``[n] uint8`` CPU tensor: a 200 answer with a
        Content-Length of ``n`` is read straight into it (no other copy). A body over
        ``max_body`` bytes raises :class:`RemoteTargetError` (``bad_response``) before
        anything is allocated. Raises :class:`TransportError` when no complete answer
        came within the deadline.
        """
        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        hdrs = {**self._headers, **(headers or {})}
        if body is None and method in ("POST", "PUT"):
            hdrs["Content-Length"] = "0"
        url = self.url + path
        deadline = time.monotonic() + self._timeout
        for attempt in (0, 1):
            conn, reused = self._take()
            token = None
            answered = False
            try:
                if conn is not None and conn.sock is None:
                    conn.close()  # http.client dropped its socket
                    conn, reused = None, False
                if conn is None:
                    conn = self._new()
                token = _WATCHDOG.arm(conn.sock, deadline)
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                conn.request(method, target, body=body, headers=hdrs)
                resp = conn.getresponse()
                answered = True
                reply = self._read(resp, method, url, into, max_body)
            except (OSError, http.client.HTTPException, TransportError, RemoteTargetError) as e:
                expired = token is not None and _WATCHDOG.disarm(token)
                if conn is not None:
                    conn.close()
                if isinstance(e, RemoteTargetError):
                    raise
                if expired or time.monotonic() >= deadline:
                    raise TransportError(f"{method} {url}: no complete answer within the "
                                         f"{self._timeout:g} s deadline") from e
                # A pooled connection the server closed while idle (its keep-alive
                # timeout) fails on first use: that is no answer from the server, so
                # try once more on a fresh connection before reporting anything.
                if reused and attempt == 0 and not answered and not isinstance(e, TimeoutError):
                    continue
                if isinstance(e, TransportError):
                    raise
                what = "reading the response: " if answered else ""
                raise TransportError(f"{method} {url}: {what}{type(e).__name__}: {e}") from e
            except BaseException:
                if token is not None:
                    _WATCHDOG.disarm(token)
                if conn is not None:
                    conn.close()
                raise
            if _WATCHDOG.disarm(token):
                conn.close()  # shut at the very end: never reuse it
            elif resp.will_close:
                conn.close()
            else:
                self._give(conn)
            return reply
        raise AssertionError("unreachable")

    @staticmethod
    def _read(resp: http.client.HTTPResponse, method: str, url: str,
              into: Callable[[int], torch.Tensor] | None, max_body: int) -> Reply:
        headers = {k.lower(): v for k, v in resp.getheaders()}
        n = resp.length
        if n is not None and n > max_body:
            raise RemoteTargetError(
                f"{method} {url}: the answer declares a {n}-byte body, more than the "
                f"{max_body} bytes this request can bring back", status=resp.status,
                error="bad_response", detail=f"Content-Length {n} exceeds {max_body}", url=url)
        if n is None:  # chunked or ended by closing: read up to the cap
            parts, total = [], 0
            while piece := resp.read(1 << 16):  # IncompleteRead on a cut-off chunk
                total += len(piece)
                if total > max_body:
                    raise RemoteTargetError(
                        f"{method} {url}: the answer's body exceeds the {max_body} bytes this "
                        f"request can bring back", status=resp.status, error="bad_response",
                        detail=f"body exceeds {max_body} bytes", url=url)
                parts.append(piece)
            return Reply(method, url, resp.status, headers, body=b"".join(parts))
        if into is None or resp.status != 200:
            body = resp.read()  # raises IncompleteRead on a cut-off body
            return Reply(method, url, resp.status, headers, body=body)
        buf = into(n)
        if buf.dtype != torch.uint8 or buf.numel() != n:
            raise ValueError(f"into({n}) returned {buf.dtype} [{buf.numel()}]")
        mv = memoryview(buf.numpy())
        got = 0
        while got < n:
            k = resp.readinto(mv[got:])
            if not k:
                raise TransportError(f"{method} {url}: the connection closed after {got} of "
                                     f"{n} body bytes")
            got += k
        return Reply(method, url, resp.status, headers, buffer=buf)
