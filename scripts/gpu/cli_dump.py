"""Runs ``eagle3-target dump`` exactly as the CLI does (stage ``cli-dump`` of
sglang_device.sh), then prints torch's pinned-pool figures for the process and, with
``CLI_BREAKDOWN=1``, where the dump's main thread spent its time (bench_dump's
``Breakdown``) and a timeline of the engine calls: what a plain CLI run cannot show.
With ``CLI_STACKS=PATH`` as well, every thread's stack goes to ``PATH.<pid>`` each 2 s
over the first 20 forwards (how flashinfer's rmsnorm build in the first forward was
found)."""
import os
import sys
import time
from pathlib import Path

import torch

from eagle3_target.cli import main

calls: list[tuple[float, float, int]] = []  # (start, seconds, tokens) of each engine call
breakdown = None
if os.environ.get("CLI_BREAKDOWN") == "1":
    import dataclasses

    import eagle3_target.dump as d

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from bench_dump import Breakdown

    breakdown = Breakdown()

    stacks = os.environ.get("CLI_STACKS")  # a file: every thread's stack each 2 s over the first calls
    stack_file = open(f"{stacks}.{os.getpid()}", "w") if stacks else None

    def timed(compute):
        def run(source, ids, *rest):
            if stack_file is not None and len(calls) in (0, 20):
                import faulthandler

                if not calls:
                    faulthandler.dump_traceback_later(2, repeat=True, file=stack_file)
                else:
                    faulthandler.cancel_dump_traceback_later()
            t0 = time.perf_counter()
            out = compute(source, ids, *rest)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the engine's own time, not its launch
            calls.append((t0, time.perf_counter() - t0, int(ids.numel())))
            return out
        return run

    for mode, spec in list(d.MODES.items()):
        d.MODES[mode] = dataclasses.replace(spec, compute=timed(spec.compute))

t_start = time.perf_counter()
rc = main(sys.argv[1:])
t_end = time.perf_counter()
if torch.cuda.is_available():
    st = torch.cuda.host_memory_stats()
    print(f"pinned pool (whole process): {st.get('allocated_bytes.peak', 0) / 2**30:.1f} GiB at peak, "
          f"grown by {st.get('num_host_alloc', 0)} allocations in {st.get('host_alloc_time.total', 0) / 1e6:.2f} s",
          flush=True)
if breakdown is not None and calls:
    first = calls[0][0]
    print(f"first engine call {first - t_start:.2f} s after the start; from there to the end: {t_end - first:.2f} s; "
          + breakdown.report(t_end - first, host_pool=False))  # the pool: the line above
    n = len(calls)
    step = max(1, n // 10)
    print("first 20 calls (s): " + " ".join(f"{c[1]:.2f}" for c in calls[:20]))
    print(f"engine calls ({n}, padded tokens): [from s, to s] engine s, wall s, engine padded tok/s")
    for i in range(0, n, step):
        part = calls[i:i + step]
        wall_end = calls[i + step][0] if i + step < n else t_end
        eng = sum(c[1] for c in part)
        print(f"  calls {i:4d}-{i + len(part) - 1:4d}: [{part[0][0] - first:7.2f}, {wall_end - first:7.2f}] "
              f"engine {eng:6.2f} s, wall {wall_end - part[0][0]:6.2f} s, {sum(c[2] for c in part) / eng:,.0f} tok/s")
sys.exit(rc)
