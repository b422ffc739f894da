"""``eagle3-target serve``: the target over HTTP (:func:`eagle3_target.server.run.run_server`).
Every default comes from :class:`~eagle3_target.server.settings.ServerSettings`."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from eagle3_target.cli.common import add_model_args, check_model_args, engine_options, load_target
from eagle3_target.server.settings import HTTP_IMPLEMENTATIONS, LOG_LEVELS, ServerSettings
from eagle3_target.wire import TOKEN_ENV

__all__ = ["register"]


def _cmd_serve(args: argparse.Namespace) -> int:
    from eagle3_target.server.run import check_bind, read_token, run_server
    from eagle3_target.tiny import resolve_model

    token = read_token(args.token_file)
    check_bind(args.host, token, args.insecure)  # before any heavy import or model build
    check_model_args(args)  # usage errors before the server listens, not as a failed load
    engine_kwargs: dict[str, Any] = {}
    if args.engine == "sglang" and "max_batch_tokens" not in engine_options(args):
        # Size SGLang's KV pool for the largest engine call this server will make.
        engine_kwargs["max_batch_tokens"] = args.max_batch_tokens
    # Settings are checked before the model is resolved: a bad flag builds nothing.
    settings = ServerSettings(
        host=args.host, port=args.port, token=token, insecure=args.insecure,
        max_batch_tokens=args.max_batch_tokens, merge_below_tokens=args.merge_below_tokens,
        max_request_bytes=args.max_request_bytes,
        exit_on_disconnect=args.exit_on_disconnect, engine=args.engine,
        log_level=args.log_level, http=args.http, max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, send_timeout_s=args.send_timeout,
        idle_timeout_s=args.idle_timeout, shutdown_timeout_s=args.shutdown_timeout,
        drain_timeout_s=args.drain_timeout,
        max_response_bytes=args.max_response_bytes)
    args.model = settings.model_name = resolve_model(args.model)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_server(lambda: load_target(args, **engine_kwargs), settings)


def register(sub: argparse._SubParsersAction) -> None:
    d = ServerSettings()
    p = sub.add_parser(
        "serve", help="serve supervision over HTTP (native /v1 protocol + NeMo-compatible endpoints)",
        description="Runs the target in this process and serves EAGLE-3 supervision to trainers: "
                    "the native /v1 protocol (docs/protocol.md) and NeMo Automodel's remote-target "
                    "endpoints. Binds 127.0.0.1 by default; a non-loopback --host needs a token "
                    f"(--token-file or ${TOKEN_ENV}) unless --insecure is given.")
    add_model_args(p)
    p.add_argument("--host", default=d.host, help=f"bind address (default: {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (0 picks a free one; default {d.port})")
    p.add_argument("--token-file", default=None,
                   help=f"file whose first line is the access token (else ${TOKEN_ENV})")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without a token")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="rows x longest row per engine call; also the per-request cap (413 above)")
    p.add_argument("--merge-below-tokens", type=int, default=d.merge_below_tokens,
                   help="a request joins a merged engine call only while it holds fewer padded "
                        "tokens than this (default: half of --max-batch-tokens; 1 never merges, "
                        "--max-batch-tokens merges up to the cap)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"request body cap in bytes (413 above; default {d.max_request_bytes >> 20} MiB)")
    p.add_argument("--exit-on-disconnect", action="store_true",
                   help="shut down when a NeMo client POSTs /disconnect (NeMo's own server does)")
    p.add_argument("--log-level", default=d.log_level, choices=list(LOG_LEVELS), help="server log level")
    p.add_argument("--http", default=d.http, choices=list(HTTP_IMPLEMENTATIONS),
                   help="HTTP/1.1 parser (auto = httptools, under the server's connection limits)")
    g = p.add_argument_group("connection limits (docs/protocol.md)")
    g.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help=f"request line + headers cap (431 above; default {d.max_header_bytes})")
    g.add_argument("--max-headers", type=int, default=d.max_headers,
                   help=f"request header count cap (431 above; default {d.max_headers})")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help=f"seconds for a request's headers to arrive (default {d.header_timeout_s:g})")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help=f"seconds for a body to arrive after its headers (default {d.body_timeout_s:g})")
    g.add_argument("--send-timeout", type=float, default=d.send_timeout_s,
                   help="seconds a client may leave its answer unread before it is cut off "
                        f"(default {d.send_timeout_s:g})")
    g.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                   help=f"seconds a keep-alive connection may sit idle (default {d.idle_timeout_s:g})")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s,
                   help="after SIGTERM, seconds a client may still take to read its answer or "
                        f"send its body (default {d.shutdown_timeout_s:g})")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help="after SIGTERM, seconds requests on the engine get before they are "
                        f"cancelled (default {d.drain_timeout_s:g})")
    g.add_argument("--max-response-bytes", type=int, default=d.max_response_bytes,
                   help="result bytes held for unsent answers over all clients; requests wait "
                        f"for room (default: an eighth of this host's memory, at least 4 GiB; here "
                        f"{d.max_response_bytes / (1 << 30):.1f} GiB)")
    p.set_defaults(func=_cmd_serve)
