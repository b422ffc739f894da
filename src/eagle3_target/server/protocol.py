"""The HTTP/1.1 connection: uvicorn's httptools protocol with the bounds it lacks.

uvicorn (0.54) bounds neither a request's headers (with httptools a 64 MiB header value
or 500k headers are parsed and answered 200; h11's 16 KiB event cap is its only limit)
nor how long a client may take to send them or its body, nor how long a response may
wait for a client that stopped reading; its only timers are the keep-alive idle and
the graceful-shutdown limit. h11 would add the header-size cap but not the timers, and
its pure-Python parser joins every chunk of a streamed body into ``bytes``. So the
server keeps httptools (its C parser hands our memoryviews to the socket untouched)
and this subclass adds, per connection (:class:`HttpLimits`):

- **header bytes and count caps**: bytes received before the end of the headers are
  counted as they arrive (httptools buffers a header value until it ends, so counting
  at ``on_header`` alone would come too late); over the cap the answer is ``431``;
- **a header deadline** from the connection's first byte wait (or the end of the
  previous response) to the end of the headers, and **a body deadline** from the end
  of the headers to the last body byte: past either the connection is closed (``408``
  when nothing was answered yet);
- **a send stall limit**: a client that stops reading (the transport's buffer stays
  above its high-water mark) for ``send_timeout_s`` is cut off, so the result it holds
  is freed;
- **a shutdown bound**: after SIGTERM a client has ``shutdown_s`` to read its answer or
  finish its body;
- **lingering close**: a response that ends a connection before its request body was
  read (``401``, ``413``, ``431``) shuts the write side and discards what still comes
  for ``linger_s``, so the client reads the answer instead of a reset.

Per connection at most one request is served at a time (uvicorn pauses reading behind
a pipelined request), and the transport holds at most one send chunk above its
high-water mark; the bytes of results waiting for slow clients are bounded across all
connections by :class:`~.state.ByteBudget`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from eagle3_target.server.settings import ServerSettings

__all__ = ["HttpLimits", "GuardedProtocol", "guarded_protocol", "limits_from"]


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection bounds; :class:`~.settings.ServerSettings` holds their defaults."""

    max_header_bytes: int
    """Request line plus headers."""
    max_headers: int
    header_timeout_s: float
    """From waiting for a request to the end of its headers (an idle new connection too)."""
    body_timeout_s: float
    """From the end of the headers to the last body byte."""
    send_timeout_s: float
    """How long a client may leave a response unread before it is cut off."""
    shutdown_s: float = 5.0
    """On shutdown: how long a client may still stall its answer or its body."""
    linger_s: float = 2.0
    """After a response that ends a connection early: how long its unread body is discarded."""


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""


class _Lingering:
    """The transport as a request cycle sees it: ``close()`` becomes a lingering close."""

    def __init__(self, transport: asyncio.Transport, protocol: "GuardedProtocol"):
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.linger_close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` with :class:`HttpLimits` (see the module docstring)."""

    limits: HttpLimits  # set by guarded_protocol()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # bytes that arrive now belong to a request head
        self._head_bytes = 0
        self._n_headers = 0
        self._refused = False
        self._lingering = False
        self._shutting_down = False

    # -- timers ----------------------------------------------------------------------
    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, what: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if what == "head":
            self._refuse(408, "request_timeout", f"the request headers did not arrive within "
                                                 f"{self.limits.header_timeout_s:g} s")
        else:  # the handler may be mid-answer: nothing more can be said on this connection
            self.logger.info("closing a connection whose request body did not arrive within "
                             "%g s", self.limits.body_timeout_s)
            self.transport.close()

    # -- connection ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or self._lingering:
            return  # discarded: the answer is out, the connection is closing
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and not self._refused and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large", f"the request line and headers exceed "
                                                   f"{self.limits.max_header_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal raised in a parser callback was answered already
            self._disarm()
            super().send_400_response(msg)

    # -- parser callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._n_headers = True, 0, 0
        if self._timer is None:
            self._arm(self.limits.header_timeout_s, "head")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._n_headers += 1
        if self._n_headers > self.limits.max_headers:
            self._refuse(431, "too_many_headers", f"more than {self.limits.max_headers} "
                                                  "request headers")
            raise _Refused()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large", f"the request line and headers exceed "
                                                   f"{self.limits.max_header_bytes} bytes")
            raise _Refused()
        if self._has_body():
            self._arm(self.limits.body_timeout_s, "body")
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:
            self.cycle.transport = _Lingering(self.transport, self)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        if self._timer is not None and not self._in_head:
            self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_response_complete()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return True
            if name == b"content-length":
                return value.strip() not in (b"0", b"")
        return False

    # -- writing ---------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            wait = self.limits.shutdown_s if self._shutting_down else self.limits.send_timeout_s
            self._send_timer = self.loop.call_later(wait, self._stalled)

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def _stalled(self) -> None:
        self._send_timer = None
        self.logger.info("cutting off a client that stopped reading its answer")
        self.transport.abort()

    def shutdown(self) -> None:
        """The server stops: idle connections close now (uvicorn); from here on a client
        gets ``shutdown_s`` (not ``send_timeout_s`` or ``body_timeout_s``) to read its
        answer or send its body, so no client can hold the process. A request the
        engine is still computing is not cut off: it finishes (within the server's drain
        limit) and its answer goes out."""
        self._shutting_down = True
        super().shutdown()
        if self.transport.is_closing():
            return
        if self._send_timer is not None:  # stalled right now
            self._send_timer.cancel()
            self._send_timer = self.loop.call_later(self.limits.shutdown_s, self._stalled)
        if self._timer is not None and not self._in_head:  # a body still arriving
            self._arm(self.limits.shutdown_s, "body")

    # -- ending a connection ---------------------------------------------------------
    def _refuse(self, status: int, error: str, detail: str) -> None:
        """Answers ``status`` from the connection itself (no handler ran) and closes."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._disarm()
        body = json.dumps({"error": error, "detail": detail}).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, reason, len(body), body))
        self.linger_close()

    def linger_close(self) -> None:
        """Ends the connection after what was written: shuts the write side, then
        discards incoming bytes until the client closes or ``linger_s`` passes."""
        if self._lingering or self.transport.is_closing():
            return
        self._lingering = True
        self._disarm()
        self.flow.resume_reading()  # keep reading (and dropping) what the client still sends
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(self.limits.linger_s, self.transport.close)
        else:
            self.transport.close()

    def eof_received(self) -> bool | None:
        if self._lingering:
            self.transport.close()
        return None


def guarded_protocol(limits: HttpLimits) -> type[GuardedProtocol]:
    """The protocol class uvicorn builds connections from (``Config(http=...)``)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


def limits_from(s: "ServerSettings") -> HttpLimits:
    """The connection bounds of a server's settings."""
    return HttpLimits(max_header_bytes=s.max_header_bytes, max_headers=s.max_headers,
                      header_timeout_s=s.header_timeout_s, body_timeout_s=s.body_timeout_s,
                      send_timeout_s=s.send_timeout_s, shutdown_s=s.shutdown_timeout_s)
