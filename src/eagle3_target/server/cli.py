"""``eagle3-target serve``: flags, the bind-safety rule, and the process lifecycle.

Order of events: check flags and the token, bind the socket (loopback by default;
a non-loopback address needs a token or ``--insecure``), print one ``listening`` line,
start uvicorn (``/health`` answers 503 while the engine worker loads the model), print
one ``ready`` line, serve. SIGTERM/SIGINT stop accepting connections, let in-flight
requests finish (queued jobs drain through the engine), close the engine, print
``stopped`` and exit 0. A model that fails to load exits 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["register", "run_server", "is_loopback", "read_token", "bind_socket"]

TOKEN_ENV = "EAGLE3_TARGET_TOKEN"
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


def read_token(token_file: str | None, env: dict[str, str] | None = None) -> str | None:
    """The token from ``--token-file`` (first line, stripped) or ``$EAGLE3_TARGET_TOKEN``."""
    env = os.environ if env is None else env
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise ValueError(f"--token-file {token_file}: no such file")
        token = path.read_text(encoding="utf-8").strip().splitlines()
        value = token[0].strip() if token else ""
        if not value:
            raise ValueError(f"--token-file {token_file}: the file is empty")
        return value
    value = env.get(TOKEN_ENV)
    if value is not None:
        value = value.strip()
        if not value:
            raise ValueError(f"${TOKEN_ENV} is set but empty")
        return value
    return None


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


def run_server(
    loader: Callable[[], Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    insecure: bool = False,
    max_batch_tokens: int = 16384,
    max_request_bytes: int = 64 << 20,
    exit_on_disconnect: bool = False,
    model_name: str = "",
    engine: str = "",
    log_level: str = "warning",
    http: str = "auto",
) -> int:
    """Serves the target ``loader()`` builds until SIGTERM/SIGINT; returns the exit code.

    ``loader`` runs in the engine worker thread, after the socket is listening.
    """
    import uvicorn

    from eagle3_target.server.app import ServerSettings, create_app
    from eagle3_target.server.engine import EngineWorker
    from eagle3_target.server.metrics import ServerMetrics

    check_bind(host, token, insecure)
    if max_batch_tokens < 1:
        raise ValueError(f"--max-batch-tokens must be >= 1, got {max_batch_tokens}")
    if max_request_bytes < 1024:
        raise ValueError(f"--max-request-bytes must be >= 1024, got {max_request_bytes}")
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}"

    metrics = ServerMetrics()
    holder: dict[str, Any] = {"failed": None}

    def on_ready(target: Any) -> None:
        metrics.ready.set(1)
        _say(f"ready on {url} (model {model_name or '?'}, engine {engine or '?'}, "
             f"{target.num_hidden_layers} layers, hidden {target.hidden_size}, vocab "
             f"{target.vocab_size}, aux layers {target.aux_layer_ids}, "
             f"auth {'on' if token else 'OFF'}, max batch tokens {max_batch_tokens})")

    def on_failed(exc: BaseException) -> None:
        holder["failed"] = exc
        _say(f"error: the model failed to load: {type(exc).__name__}: {exc}")
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    worker = EngineWorker(
        loader,
        max_batch_tokens=max_batch_tokens,
        on_ready=on_ready,
        on_failed=on_failed,
        on_batch=metrics.observe_batch,
        on_queue=metrics.queue_depth.set,
        on_oom=metrics.oom.inc,
    )
    settings = ServerSettings(token=token, max_request_bytes=max_request_bytes,
                              max_batch_tokens=max_batch_tokens,
                              exit_on_disconnect=exit_on_disconnect, model_name=model_name,
                              engine=engine)

    def request_shutdown() -> None:
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    app = create_app(settings, worker, metrics, request_shutdown=request_shutdown)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=60, server_header=False, http=http)
    server = uvicorn.Server(config)
    holder["server"] = server
    # uvicorn re-raises the signal it caught once it has shut down gracefully; with our
    # handler in place that re-raise is a no-op and the process exits 0.
    stop_signals: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stop_signals.append(s))
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from eagle3_target.cli import load_target, parse_engine_args, resolve_model

    token = read_token(args.token_file)
    check_bind(args.host, token, args.insecure)  # before any heavy import or model build
    engine_kwargs: dict[str, Any] = {}
    if args.engine == "sglang" and "max_batch_tokens" not in parse_engine_args(args.engine_arg):
        # Size SGLang's KV pool for the largest engine call this server will make.
        engine_kwargs["max_batch_tokens"] = args.max_batch_tokens
    model = resolve_model(args.model)
    args.model = model
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_server(
        lambda: load_target(args, **engine_kwargs),
        host=args.host,
        port=args.port,
        token=token,
        insecure=args.insecure,
        max_batch_tokens=args.max_batch_tokens,
        max_request_bytes=args.max_request_bytes,
        exit_on_disconnect=args.exit_on_disconnect,
        model_name=model,
        engine=args.engine,
        log_level=args.log_level,
        http=args.http,
    )


def register(sub: argparse._SubParsersAction) -> None:
    from eagle3_target.cli import add_model_args

    p = sub.add_parser(
        "serve", help="serve supervision over HTTP (native /v1 protocol + NeMo-compatible endpoints)",
        description="Runs the target in this process and serves EAGLE-3 supervision to trainers: "
                    "the native /v1 protocol (docs/protocol.md) and NeMo Automodel's remote-target "
                    "endpoints. Binds 127.0.0.1 by default; a non-loopback --host needs a token "
                    f"(--token-file or ${TOKEN_ENV}) unless --insecure is given.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--token-file", default=None,
                   help=f"file whose first line is the access token (else ${TOKEN_ENV})")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without a token")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="rows x longest row per engine call; also the per-request cap (413 above)")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20,
                   help="request body cap in bytes (413 above; default 64 MiB)")
    p.add_argument("--exit-on-disconnect", action="store_true",
                   help="shut down when a NeMo client POSTs /disconnect (NeMo's own server does)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"], help="server log level")
    p.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"],
                   help="uvicorn's HTTP/1.1 implementation (auto: httptools, the faster one, "
                        "when installed)")
    p.set_defaults(func=_cmd_serve)
