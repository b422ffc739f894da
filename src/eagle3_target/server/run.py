"""Running a server: the bind-safety rule, the token, the socket, and the process
lifecycle (:func:`run_server`; the ``serve`` subcommand fills its settings).

Order of events: check flags and the token, bind the socket (loopback by default;
a non-loopback address needs a token or ``--insecure``), print one ``listening`` line,
start uvicorn (``/health`` answers 503 while the engine worker loads the model), print
one ``ready`` line, serve. SIGTERM/SIGINT stop accepting connections, let in-flight
requests finish (a client that stalls its answer or body is cut off after
``shutdown_timeout_s``; requests still on the engine after ``drain_timeout_s`` are
cancelled with a 503), close the engine, print ``stopped`` and exit 0. A model that fails to load exits 1.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from eagle3_target.wire import TOKEN_ENV, read_token

if TYPE_CHECKING:
    from eagle3_target.server.settings import ServerSettings

__all__ = ["run_server", "is_loopback", "read_token", "check_bind", "bind_socket", "TOKEN_ENV", "PREFIX"]
PREFIX = "eagle3-target serve:"


def _say(msg: str) -> None:
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname we would have to resolve: treat as exposed


def check_bind(host: str, token: str | None, insecure: bool) -> None:
    if token is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on non-loopback address {host!r} without a token: set "
            f"--token-file or ${TOKEN_ENV}, or pass --insecure to serve unauthenticated")


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
    # proto says TCP, and without it every keep-alive response waits ~40 ms on Nagle
    # plus delayed ACK (headers and body go out as two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # A restarted server must be able to take its port back while old connections
    # sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        # Listening before the "listening" line: a client that connects while uvicorn
        # is still starting waits in the backlog instead of being refused.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run_server(loader: Callable[[], Any], settings: "ServerSettings") -> int:
    """Serves the target ``loader()`` builds until SIGTERM/SIGINT; returns the exit code.

    ``loader`` runs in the engine worker thread, after the socket is listening.
    """
    import uvicorn

    from eagle3_target.server.app import create_app
    from eagle3_target.server.metrics import ServerMetrics
    from eagle3_target.server.protocol import guarded_protocol, limits_from
    from eagle3_target.server.worker import EngineWorker

    s = settings
    check_bind(s.host, s.token, s.insecure)
    sock = bind_socket(s.host, s.port)
    bound = sock.getsockname()[1]
    shown = f"[{s.host}]" if ":" in s.host else s.host
    url = f"http://{shown}:{bound}"

    metrics = ServerMetrics()
    holder: dict[str, Any] = {"failed": None}

    def on_ready(target: Any) -> None:
        metrics.ready.set(1)
        _say(f"ready on {url} (model {s.model_name or '?'}, engine {s.engine or '?'}, "
             f"{target.num_hidden_layers} layers, hidden {target.hidden_size}, vocab "
             f"{target.vocab_size}, aux layers {target.aux_layer_ids}, "
             f"auth {'on' if s.token else 'OFF'}, max batch tokens {s.max_batch_tokens})")

    def on_failed(exc: BaseException) -> None:
        holder["failed"] = exc
        _say(f"error: the model failed to load: {type(exc).__name__}: {exc}")
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    worker = EngineWorker(
        loader,
        max_batch_tokens=s.max_batch_tokens,
        merge_below_tokens=s.merge_below_tokens,
        on_ready=on_ready,
        on_failed=on_failed,
        on_batch=metrics.observe_batch,
        on_queue=metrics.queue_depth.set,
        on_oom=metrics.oom.inc,
    )

    def request_shutdown() -> None:
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    app = create_app(s, worker, metrics, request_shutdown=request_shutdown)
    protocol = guarded_protocol(limits_from(s))
    # The protocol bounds what clients may still take at shutdown (shutdown_timeout_s);
    # uvicorn's limit, which cancels the handlers, bounds what the engine may still take.
    config = uvicorn.Config(app, log_level=s.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=s.drain_timeout_s, server_header=False,
                            http=protocol, timeout_keep_alive=s.idle_timeout_s)
    server = uvicorn.Server(config)
    holder["server"] = server
    # uvicorn re-raises the signal it caught once it has shut down gracefully; with our
    # handler in place that re-raise is a no-op and the process exits 0.
    stop_signals: list[int] = []
    previous = {sig: signal.signal(sig, lambda sg, _f: stop_signals.append(sg))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    _say(f"listening on {url} (loading the model; /health answers 503 until ready)")
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if holder["failed"] is not None:
        return 1
    _say("stopped")
    return 0
