"""Paired A/B of the send-and-read path: this checkout against another one, on a loaded
machine. Run-to-run noise on a shared CPU (tens of percent) hides a few-percent change
between separate runs of ``bench_transport.py``; here both stacks are up at once and one
client alternates requests between them, so each pair meets the same load.

    git worktree add ../before <commit>
    python bench/bench_transport_pairs.py --before ../before --pairs 40

Before: ``bench_transport.py --serve --http httptools`` from the other checkout (uvicorn's
parser as shipped), read by that checkout's ``HttpPool``. After: ``--http guarded`` (the
connection protocol ``serve`` runs) from this checkout, read by this ``HttpPool``. Each
request is one ``stream`` answer (``SafetensorsStream``) read into one buffer and
decoded as views. Prints every pair's MB/s (1 MB = 1e6 bytes) and the median ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "bench"))
from bench_transport import free_port, wait_for_port  # noqa: E402


def _pool_class(tree: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, tree / "src/eagle3_target/client/http_pool.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.HttpPool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the other checkout (its bench/ and src/)")
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    args = p.parse_args(argv)
    sides = {"before": (Path(args.before).resolve(), "httptools"), "after": (HERE, "guarded")}
    procs, pools = [], {}
    try:
        for name, (tree, http) in sides.items():
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "bench/bench_transport.py", "--serve", "--port", str(port), "--http", http,
                 "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--hidden", str(args.hidden)],
                cwd=tree, env={"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"}))
            wait_for_port(port, seconds=60)
            pools[name] = _pool_class(tree, f"http_pool_{name}")(f"http://127.0.0.1:{port}", timeout=600,
                                                                   connect_timeout=10)
        from eagle3_target.wire.st_stream import decode_buffer

        def one(name: str) -> float:
            pool = pools[name]
            kw = {"max_body": 4 << 30} if "max_body" in type(pool).request.__code__.co_varnames else {}
            t0 = time.perf_counter()
            r = pool.request("POST", "/stream", body=b"x", into=lambda n: torch.empty(n, dtype=torch.uint8), **kw)
            decode_buffer(r.buffer)
            return r.nbytes / (time.perf_counter() - t0) / 1e6

        for name in pools:
            one(name)  # warm-up
        rows = []
        for i in range(args.pairs):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            got = {name: one(name) for name in order}
            rows.append(got)
            print(f"pair {i:2d}: before {got['before']:6.0f} MB/s  after {got['after']:6.0f} MB/s  "
                  f"ratio {got['after'] / got['before']:.3f}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    ratios = [r["after"] / r["before"] for r in rows]
    q = statistics.quantiles(ratios, n=4)
    print(f"median before {statistics.median(r['before'] for r in rows):.0f} MB/s, after "
          f"{statistics.median(r['after'] for r in rows):.0f} MB/s, median pair ratio "
          f"{statistics.median(ratios):.3f} (quartiles {q[0]:.3f}..{q[2]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
