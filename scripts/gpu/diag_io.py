"""What moving supervision costs on a GPU host, primitive by primitive (no model needed).

    python scripts/gpu/diag_io.py [--dir /tmp] [--mb 2048]

Prints one line per measurement: disk writes (with and without fsync, 1 and 4 threads),
sha256, host memcpy, device-to-host copies (pageable, pinned), and loopback HTTP: a
uvicorn server returning one large body, read by httpx, by http.client into a
preallocated buffer, and by a raw socket. These set the ceilings the dump and the
server can reach on that machine; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import torch


def line(name: str, nbytes: int, secs: float) -> None:
    print(f"{name:<58} {nbytes / secs / 1e9:7.2f} GB/s  ({nbytes / 1e6:,.0f} MB in {secs:.3f} s)", flush=True)


def disk(d: str, mb: int, threads: int, fsync: bool) -> None:
    chunk = os.urandom(1 << 20) * 64  # 64 MiB
    per = mb // threads

    def work(i: int) -> None:
        p = os.path.join(d, f"diag-{i}.bin")
        with open(p, "wb") as f:
            for _ in range(max(1, per // 64)):
                f.write(chunk)
            f.flush()
            if fsync:
                os.fsync(f.fileno())

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    secs = time.perf_counter() - t0
    line(f"disk {d} write {threads} thread(s) fsync={fsync}", threads * max(1, per // 64) * 64 << 20, secs)
    for i in range(threads):
        os.unlink(os.path.join(d, f"diag-{i}.bin"))


def sha(threads: int, mb: int = 1024) -> None:
    buf = os.urandom(1 << 20) * 256
    n = max(1, mb // 256 // threads)

    def work() -> None:
        for _ in range(n):
            hashlib.sha256(buf).hexdigest()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    line(f"sha256 {threads} thread(s)", threads * n * len(buf), time.perf_counter() - t0)


def memcpy() -> None:
    a = torch.empty(512 << 20, dtype=torch.uint8)
    a.fill_(1)
    for th in (1, 8):
        torch.set_num_threads(th)
        b = torch.empty_like(a)
        b.copy_(a)
        t0 = time.perf_counter()
        b.copy_(a)
        line(f"host memcpy torch {th} thread(s)", a.numel(), time.perf_counter() - t0)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bytes(memoryview(a.numpy()))
    line("host bytes(memoryview) copy", a.numel(), time.perf_counter() - t0)


def d2h() -> None:
    if not torch.cuda.is_available():
        return
    g = torch.randn(16384, 4 * 4096, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    n = g.numel() * 2
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.to("cpu")
        line("d2h pageable .to('cpu')", n, time.perf_counter() - t0)
    t0 = time.perf_counter()
    h = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
    line("pinned alloc (cudaHostAlloc)", n, time.perf_counter() - t0)
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h.copy_(g, non_blocking=True)
        torch.cuda.synchronize()
        line("d2h pinned copy_", n, time.perf_counter() - t0)
    t0 = time.perf_counter()
    h.clone()
    line("pinned -> pageable clone (1 thread)", n, time.perf_counter() - t0)
    mask = torch.rand(16384, device="cuda") < 0.5
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    sel = g[mask]
    torch.cuda.synchronize()
    line("device masked gather (half the rows)", sel.numel() * 2, time.perf_counter() - t0)


SERVER = r'''
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
body = b"x" * int(sys.argv[2])
async def big(request):
    return Response(body, media_type="application/octet-stream")
app = Starlette(routes=[Route("/big", big)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http=sys.argv[3], loop=sys.argv[4])
'''


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def read_httpx(url: str) -> int:
    import httpx
    with httpx.Client(timeout=60) as c:
        c.get(url)
        t0 = time.perf_counter()
        n = len(c.get(url).content)
        return n, time.perf_counter() - t0


def read_httpx_stream(url: str) -> int:
    import httpx
    with httpx.Client(timeout=60) as c:
        c.get(url)
        t0 = time.perf_counter()
        with c.stream("GET", url) as r:
            size = int(r.headers["content-length"])
            buf = bytearray(size)
            pos = 0
            for chunk in r.iter_raw(1 << 20):
                buf[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
        return pos, time.perf_counter() - t0


def read_httpclient(url: str) -> int:
    import http.client
    from urllib.parse import urlsplit
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port)
    for i in range(2):
        t0 = time.perf_counter()
        c.request("GET", u.path)
        r = c.getresponse()
        size = int(r.getheader("content-length"))
        buf = bytearray(size)
        mv = memoryview(buf)
        pos = 0
        while pos < size:
            k = r.readinto(mv[pos:])
            if not k:
                break
            pos += k
    return pos, time.perf_counter() - t0


def http_bench(size: int) -> None:
    for http, loop in (("h11", "asyncio"), ("httptools", "asyncio"), ("httptools", "uvloop")):
        if loop == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                print("uvloop: not installed", flush=True)
                continue
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(size), http, loop])
        url = f"http://127.0.0.1:{port}/big"
        try:
            import httpx
            for _ in range(100):
                try:
                    httpx.get(url.replace("/big", "/none"), timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            for name, fn in (("httpx .content", read_httpx), ("httpx iter_raw into buffer", read_httpx_stream),
                             ("http.client readinto", read_httpclient)):
                n, secs = fn(url)
                line(f"http {http}/{loop} -> {name}", n, secs)
        finally:
            proc.terminate()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--mb", type=int, default=2048)
    p.add_argument("--http-mb", type=int, default=256)
    p.add_argument("--skip", default="")
    a = p.parse_args()
    print(f"cpus {os.cpu_count()}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    subprocess.run(["df", "-h", a.dir, "/dev/shm"])
    skip = a.skip.split(",")
    if "disk" not in skip:
        for threads, fs in ((1, False), (1, True), (4, True), (8, True)):
            disk(a.dir, a.mb, threads, fs)
    for th in (1, 4):
        sha(th)
    memcpy()
    d2h()
    if "http" not in skip:
        http_bench(a.http_mb << 20)


if __name__ == "__main__":
    main()
