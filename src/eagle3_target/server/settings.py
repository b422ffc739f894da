"""The server's settings: :class:`ServerSettings`, the one source of the server's
defaults (``serve``'s flags read theirs from it). Imports nothing heavy, so building the
command line stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServerSettings", "HTTP_IMPLEMENTATIONS", "LOG_LEVELS"]

HTTP_IMPLEMENTATIONS = ("auto", "httptools", "h11")
LOG_LEVELS = ("debug", "info", "warning", "error")


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
    exit_on_disconnect: bool = False
    """Shut down when a NeMo client POSTs /disconnect (NeMo's own server does)."""
    max_mappings: int = 64
    model_name: str = ""
    engine: str = ""
    retry_after_s: int = 2
    log_level: str = "warning"
    http: str = "auto"
    """uvicorn's HTTP/1.1 implementation: ``auto`` (httptools when installed), ``httptools``, ``h11``."""

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535 (0 picks a free one), got {self.port!r}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
