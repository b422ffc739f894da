"""The exception tree: every error the package raises on purpose derives from
:class:`Eagle3TargetError`, so a caller can catch ours apart from bugs.

::

    Eagle3TargetError
    ├── InputError (ValueError)            bad input or settings, found before any work:
    │   │                                  nothing was changed; the message names the fix
    │   ├── MalformedRow                   one data row cannot become a sample (data/)
    │   └── FormatError                    bytes that break a format's rules (wire/, dump/)
    │       ├── SafetensorsFormatError
    │       └── NMETError
    ├── ApiError                           what the server answers a bad request with
    │                                      (HTTP status, stable code, detail; wire.v1)
    ├── RemoteTargetError (RuntimeError)   the server refused a request (client/)
    │   └── RemoteTargetUnavailable        no server answered within the retries
    ├── TransportError                     no complete HTTP answer; safe to retry (client/)
    ├── EngineError (RuntimeError)         the engine could not serve a request (server/)
    │   ├── EngineOverloaded               out of memory on this request alone
    │   ├── EngineFailed                   the engine raised on this request alone
    │   └── WorkerUnavailable              loading, failed to load, or stopping
    └── DumpError (RuntimeError)           a dump stopped part-way (I/O, the target);
                                           finished shards are kept, a rerun continues

``InputError`` and ``FormatError`` are ValueErrors and the runtime errors RuntimeErrors,
so code written against the standard types keeps working. The command line maps
``InputError`` (and ValueError) to exit code 2 and the rest to 1, one line each.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Eagle3TargetError", "InputError", "MalformedRow", "FormatError", "SafetensorsFormatError",
    "NMETError", "ApiError", "RemoteTargetError", "RemoteTargetUnavailable", "TransportError",
    "EngineError", "EngineOverloaded", "EngineFailed", "WorkerUnavailable", "DumpError",
]


class Eagle3TargetError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(Eagle3TargetError, ValueError):
    """Bad input or settings, detected before any work; nothing was changed."""


class MalformedRow(InputError):
    """A data row that cannot become a training sample; ``reason`` is a short category
    used for counting, ``detail`` says what exactly was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FormatError(InputError):
    """Bytes that break a format's rules; the message names the rule and the field."""


class SafetensorsFormatError(FormatError):
    """A body that is not valid safetensors."""


class NMETError(FormatError):
    """A body that is not a well-formed NMET blob (NeMo Automodel's tensor codec)."""


class ApiError(Eagle3TargetError):
    """An error the server answers with ``status`` and JSON ``{"error", "detail"}``."""

    def __init__(self, status: int, error: str, detail: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "detail": self.detail}
        if self.field is not None:
            out["field"] = self.field
        return out


class RemoteTargetError(Eagle3TargetError, RuntimeError):
    """The server answered with an error (not retried), or an answer that breaks the
    protocol; ``status``, ``error`` and ``detail`` say which."""

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None,
                 detail: str | None = None, url: str | None = None):
        super().__init__(message)
        self.status = status
        self.error = error
        self.detail = detail
        self.url = url


class RemoteTargetUnavailable(RemoteTargetError):
    """No server answered the request within the retries."""


class TransportError(Eagle3TargetError):
    """No complete answer: connection refused or reset, timeout, malformed or cut-off
    response. Safe to retry (every request the client sends is idempotent)."""


class EngineError(Eagle3TargetError, RuntimeError):
    """The engine could not serve one request."""


class EngineOverloaded(EngineError):
    """The engine ran out of memory on this request alone; retry later or split it."""


class EngineFailed(EngineError):
    """The engine raised on this request alone (logged server-side)."""


class WorkerUnavailable(EngineError):
    """The worker is loading, failed to load, or is stopping."""


class DumpError(Eagle3TargetError, RuntimeError):
    """A dump stopped part-way; what was finished stays, and the same command continues."""
