"""The server's settings: :class:`ServerSettings`, the one source of the server's
defaults (``serve``'s flags read theirs from it). Imports nothing heavy, so building the
command line stays instant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["ServerSettings", "HTTP_IMPLEMENTATIONS", "LOG_LEVELS", "default_response_bytes",
           "memory_limit"]

# Both name uvicorn's httptools parser under the server's guarded connection protocol
# (:mod:`.protocol`): h11 is not offered, since the limits below live in that protocol.
HTTP_IMPLEMENTATIONS = ("auto", "httptools")
LOG_LEVELS = ("debug", "info", "warning", "error")


def memory_limit() -> int | None:
    """Bytes of memory this process may use: the host's physical memory, or its cgroup's
    limit where one is set and lower; None where neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def default_response_bytes(memory: int | None = None) -> int:
    """The default ``--max-response-bytes``: an eighth of ``memory`` (default
    :func:`memory_limit`), at least 4 GiB. On a 128 GiB GPU host that is 16 GiB: room for
    six ``logits`` answers of 4 x 2048 tokens at the Llama-3.1-8B shape (2.3 GB each in
    bf16), where a fixed 4 GiB held one at a time, so no forward ran while an answer was
    being sent: two clients kept 0.24x of in process on the H200 under 4 GiB and 0.32x
    under 16 GiB (docs/benchmarks.md)."""
    memory = memory_limit() if memory is None else memory
    return max(4 << 30, (memory or 0) // 8)


@dataclass
class ServerSettings:
    """One server: what ``serve``'s flags fill in, with their defaults."""

    host: str = "127.0.0.1"
    """Bind address; a non-loopback one needs a token (or ``insecure``)."""
    port: int = 8000
    """0 picks a free port."""
    token: str | None = None
    insecure: bool = False
    """Allow a non-loopback bind without a token."""
    max_request_bytes: int = 64 << 20
    max_batch_tokens: int = 16384
    """Rows x longest row per engine call; also the per-request token cap."""
    merge_below_tokens: int | None = None
    """A request joins a merged engine call only while that call holds fewer padded
    tokens than this; None: half of ``max_batch_tokens``. Merging small requests fills
    the device; merging large ones makes their clients wait for one another (see
    :class:`~.worker.EngineWorker`)."""
    exit_on_disconnect: bool = False
    """Shut down when a NeMo client POSTs /disconnect (NeMo's own server does)."""
    max_mappings: int = 64
    model_name: str = ""
    engine: str = ""
    retry_after_s: int = 2
    log_level: str = "warning"
    http: str = "auto"
    """The HTTP/1.1 parser: ``auto`` = ``httptools`` (the only one; kept for old scripts)."""
    # -- connection bounds (:class:`~.protocol.HttpLimits`; docs/protocol.md) ----------
    max_header_bytes: int = 64 << 10
    """Request line plus headers; 431 above."""
    max_headers: int = 100
    """Request headers; 431 above."""
    header_timeout_s: float = 10.0
    """A request's headers must arrive within this (408 and close otherwise)."""
    body_timeout_s: float = 120.0
    """A request's body must arrive within this after its headers (close otherwise)."""
    send_timeout_s: float = 30.0
    """A client that reads nothing of its answer for this long is cut off."""
    idle_timeout_s: float = 5.0
    """A keep-alive connection with no request for this long is closed."""
    shutdown_timeout_s: float = 5.0
    """On SIGTERM/SIGINT: how long a client may still take to read its answer or send
    its body before it is cut off."""
    drain_timeout_s: float = 60.0
    """On SIGTERM/SIGINT: requests still on the engine after this are cancelled (503)."""
    max_response_bytes: int = field(default_factory=default_response_bytes)
    """Result bytes held for answers not yet sent, over all connections; a request
    waits for room before it runs (one request larger than this runs alone). Default:
    an eighth of the memory, at least 4 GiB (:func:`default_response_bytes`)."""

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535 (0 picks a free one), got {self.port!r}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        if self.merge_below_tokens is not None and not 1 <= self.merge_below_tokens <= self.max_batch_tokens:
            raise ValueError(f"--merge-below-tokens must be in 1..--max-batch-tokens ({self.max_batch_tokens}; "
                             f"1 never merges), got {self.merge_below_tokens}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_header_bytes < 1024 or self.max_headers < 8:
            raise ValueError(f"--max-header-bytes must be >= 1024 and --max-headers >= 8, got "
                             f"{self.max_header_bytes} and {self.max_headers}")
        for name in ("header_timeout_s", "body_timeout_s", "send_timeout_s", "idle_timeout_s",
                     "shutdown_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                flag = "--" + name[:-2].replace("_", "-")
                raise ValueError(f"{flag} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_response_bytes < 1 << 20:
            raise ValueError(f"--max-response-bytes must be >= 1 MiB, got {self.max_response_bytes}")
