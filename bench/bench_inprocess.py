"""In-process supervision throughput on one machine, as a Markdown table.

    python bench/bench_inprocess.py [--model DIR] [--device cpu] [--dtype float32]
                                    [--shapes 4x512,8x1024] [--runs 5]

Without --model it uses the built-in tiny model. Each row is the median of --runs
generate_batch (mode logits) or generate_hidden (mode hidden) calls after 2 warm-ups;
the last column is the ratio to the first row's tokens/s.
"""

from __future__ import annotations

import argparse
import platform

import torch

from eagle3_target.benchmark import BenchConfig, run_inprocess
from eagle3_target.cli.common import add_model_args, load_target


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--shapes", default="4x512,8x1024", help="comma-separated BxS")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    target = load_target(args)
    dev = target.runner.device if hasattr(target.runner, "device") else "?"
    name = torch.cuda.get_device_name() if str(dev).startswith("cuda") else cpu_name()
    print(f"model {args.model or 'built-in tiny'}: {target.num_hidden_layers} layers, hidden "
          f"{target.hidden_size}, vocab {target.vocab_size}; engine {args.engine} on {dev} ({name}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| B x S | mode | ragged | real tokens | median ms | tokens/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    base = None
    try:
        for shape in args.shapes.split(","):
            b, s = (int(x) for x in shape.lower().split("x"))
            for mode, ragged in (("logits", False), ("hidden", False), ("logits", True)):
                r = run_inprocess(target, BenchConfig(batch=b, seq_len=s, runs=args.runs, mode=mode,
                                                      ragged=ragged))
                base = base or r["tokens_per_s"]
                print(f"| {b} x {s} | {mode} | {'yes' if ragged else 'no'} | {r['tokens']} | "
                      f"{r['median_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                      f"{r['tokens_per_s'] / base:.2f} |", flush=True)
    finally:
        target.close()


if __name__ == "__main__":
    main()
