"""Which server takes the next request: health as seen from the client, least in flight
first, cool-downs that grow with failures, and the credentials in a URL.

:class:`Servers` is the set :class:`~eagle3_target.client.remote.RemoteTarget` spreads
its requests over. A server that fails to answer (or answers 502/503/504) is cooled
down for ``0.5 * 2**(failures-1)`` seconds, at most 30 (or its ``Retry-After``, also
capped at 30: one answer must not bench a server for hours);
while none is healthy, the one whose cool-down ends first is tried.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from eagle3_target.client.http_pool import HttpPool

__all__ = ["Server", "Servers", "split_userinfo", "MAX_COOL_DOWN"]

MAX_COOL_DOWN = 30.0
"""The longest a server is left untried, whatever it or its failures say (seconds)."""


def split_userinfo(url: str) -> tuple[str, str | None]:
    """``(URL without userinfo, Basic Authorization header value or None)``."""
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server URL {url!r}: expected http(s)://host:port")
    auth = None
    if parts.username is not None or parts.password is not None:
        cred = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(cred.encode("utf-8")).decode("ascii")
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), auth


class Server:
    """One server: its connections and health as seen from here."""

    def __init__(self, url: str, *, token: str | None, timeout: float, pool: int):
        self.url, basic = split_userinfo(url)
        auth = f"Bearer {token}" if token else basic
        # Direct peers: no ambient HTTP(S) proxy is consulted (http.client never does).
        self.http = HttpPool(self.url, headers={"Authorization": auth} if auth else None,
                             timeout=timeout, connect_timeout=min(10.0, timeout),
                             max_idle=pool)
        self.in_flight = 0
        self.down_until = 0.0
        self.failures = 0
        self.verified = False
        self.mappings: set[str] = set()

    def healthy(self, now: float) -> bool:
        return now >= self.down_until

    def mark_down(self, retry_after: float | None = None) -> None:
        self.failures += 1
        self.verified = False  # it may come back serving something else
        cool = retry_after if retry_after is not None else 0.5 * 2 ** (self.failures - 1)
        cool = min(MAX_COOL_DOWN, max(0.0, cool))
        self.down_until = time.monotonic() + cool

    def mark_up(self) -> None:
        self.failures = 0
        self.down_until = 0.0


class Servers:
    """The servers of one client; :meth:`pick` and :meth:`release` bracket a request."""

    def __init__(self, urls: Sequence[str], *, token: str | None, timeout: float, pool: int):
        self.all = [Server(u, token=token, timeout=timeout, pool=pool) for u in urls]
        self._lock = threading.Lock()
        self._rr = 0

    def __iter__(self):
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def pick(self) -> Server:
        """The healthy server with the fewest requests in flight (round robin among
        ties), or, with none healthy, the one whose cool-down ends first."""
        with self._lock:
            now = time.monotonic()
            healthy = [s for s in self.all if s.healthy(now)]
            pool = healthy or [min(self.all, key=lambda s: s.down_until)]
            low = min(s.in_flight for s in pool)
            ties = [s for s in pool if s.in_flight == low]
            self._rr += 1
            srv = ties[self._rr % len(ties)]
            srv.in_flight += 1
            return srv

    def release(self, srv: Server) -> None:
        with self._lock:
            srv.in_flight -= 1

    def any_healthy(self) -> bool:
        now = time.monotonic()
        return any(s.healthy(now) for s in self.all)

    def close(self) -> None:
        for srv in self.all:
            srv.http.close()
