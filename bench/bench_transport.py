"""Loopback throughput of one large ``/v1/supervision``-shaped answer, server send and
client read, old path vs new, without an engine in the way.

    python bench/bench_transport.py                  # 8B hidden-mode shape, 4 x 2048: 268 MB
    python bench/bench_transport.py --batch 1 --http h11
    python bench/bench_transport.py --http guarded   # the connection protocol `serve` runs

A uvicorn process (``--http`` implementation) serves fixed bf16 tensors shaped like an
8B model's hidden-mode answer (``aux_hidden_states [B,S,3H]`` + ``final_hidden [B,S,H]``)
two ways: ``bytes`` serialises them per request with ``encode_safetensors`` (the server
before streaming) and ``stream`` sends header + tensor memory (``SafetensorsStream``,
the server now). Clients, each timed over ``--runs`` requests on one keep-alive
connection (median): ``httpx+st_load`` (the client before: ``.content`` then
``safetensors.torch.load``), ``urllib3+st_load``, and ``readinto+views`` (the client now:
``HttpPool`` reading into one buffer, ``decode_buffer`` views). Prints MB/s of body
(1 MB = 1e6 bytes), from request sent to tensors in hand.
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch


def _tensors(args) -> dict[str, torch.Tensor]:
    h = args.hidden
    return {"aux_hidden_states": torch.ones(args.batch, args.seq_len, 3 * h, dtype=torch.bfloat16),
            "final_hidden": torch.ones(args.batch, args.seq_len, h, dtype=torch.bfloat16)}


def serve(args) -> None:
    import uvicorn
    from starlette.responses import Response

    from eagle3_target.server.routes_v1 import SafetensorsStream
    from eagle3_target.wire.v1 import encode_safetensors, safetensors_parts

    tensors = _tensors(args)
    meta = {"protocol": "1", "mode": "hidden", "aux_layer_ids": "[1, 15, 28]"}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["path"] == "/bytes":
            resp = Response(encode_safetensors(tensors, meta), media_type="application/octet-stream")
        else:
            header, pieces = safetensors_parts(tensors, meta)
            resp = SafetensorsStream(header, pieces, headers={})
        await resp(scope, receive, send)

    http: object = args.http
    if args.http == "guarded":  # the server's own connection protocol, with serve's defaults
        from eagle3_target.server.protocol import guarded_protocol, limits_from
        from eagle3_target.server.settings import ServerSettings

        http = guarded_protocol(limits_from(ServerSettings()))
    uvicorn.run(app, host="127.0.0.1", port=args.port, http=http, log_level="warning",
                access_log=False)


def free_port() -> int:
    """A loopback port nothing listens on now (for a server started next)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for_port(port: int, seconds: float = 30.0) -> None:
    """Returns once something accepts on loopback ``port``; raises after ``seconds``."""
    for _ in range(int(seconds * 10)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server came up on port {port} within {seconds:g} s")


def client_httpx(url: str, path: str, runs: int) -> tuple[list[float], int]:
    import httpx
    from safetensors.torch import load

    out = []
    with httpx.Client(base_url=url, trust_env=False, timeout=600) as c:
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            r = c.post(path, content=b"x")
            t = load(r.content)
            out.append(time.perf_counter() - t0)
            n = len(r.content)
            del t, r
    return out[1:], n


def client_urllib3(url: str, path: str, runs: int) -> tuple[list[float], int]:
    import urllib3
    from safetensors.torch import load

    out = []
    pool = urllib3.PoolManager(maxsize=1)
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        r = pool.request("POST", url + path, body=b"x")
        t = load(r.data)
        out.append(time.perf_counter() - t0)
        n = len(r.data)
        del t, r
    pool.clear()
    return out[1:], n


def client_readinto(url: str, path: str, runs: int) -> tuple[list[float], int]:
    from eagle3_target.client.http_pool import HttpPool
    from eagle3_target.wire.st_stream import decode_buffer

    out = []
    pool = HttpPool(url, timeout=600, connect_timeout=10)
    alloc = lambda n: torch.empty(n, dtype=torch.uint8)  # noqa: E731 (CPU: not pinned)
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        r = pool.request("POST", path, body=b"x", into=alloc, max_body=4 << 30)
        t, _ = decode_buffer(r.buffer)
        out.append(time.perf_counter() - t0)
        n = r.nbytes
        del t, r
    pool.close()
    return out[1:], n


CLIENTS = {"httpx+st_load": client_httpx, "urllib3+st_load": client_urllib3,
           "readinto+views": client_readinto}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--http", default="httptools", choices=["httptools", "h11", "guarded"],
                   help="uvicorn's parser as it ships, or guarded: the one `serve` runs "
                        "(httptools under the server's connection limits)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", "--port", str(port), "--http", args.http,
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--hidden", str(args.hidden)]
    srv = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_for_port(port)
        combos = [("bytes", "httpx+st_load"), ("stream", "httpx+st_load"),
                  ("stream", "urllib3+st_load"), ("stream", "readinto+views"),
                  ("bytes", "readinto+views")]
        for path, client in combos:
            times, n = CLIENTS[client](url, "/" + path, args.runs)
            med = statistics.median(times)
            rows.append((path, client, n, med))
            print(f"server {path:6s} client {client:16s}: {n / med / 1e6:8.0f} MB/s "
                  f"({med * 1e3:.0f} ms per {n / 1e6:.0f} MB)", file=sys.stderr, flush=True)
    finally:
        srv.terminate()
        srv.wait(30)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"uvicorn --http {args.http}, body {rows[0][2] / 1e6:.0f} MB, median of {args.runs}")
    print("| server sends | client reads | MB/s | ms per body |")
    print("|---|---|---:|---:|")
    for path, client, n, med in rows:
        print(f"| {path} | {client} | {n / med / 1e6:,.0f} | {med * 1e3:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
