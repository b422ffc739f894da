"""``eagle3-target bench``: in-process supervision tokens/s on random ids."""

from __future__ import annotations

import argparse
import json
import sys

from eagle3_target.benchmark import FORWARDS, BenchConfig
from eagle3_target.cli.common import add_model_args, load_target

__all__ = ["register"]


def _max_positions(model: str | None) -> int | None:
    """The model's ``max_position_embeddings`` from its config (None when it has none)."""
    from transformers import AutoConfig

    from eagle3_target.engines.common import text_config
    from eagle3_target.tiny import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model(model), local_files_only=True)
    n = getattr(text_config(cfg), "max_position_embeddings", None)
    return int(n) if n else None


def _cmd_bench(args: argparse.Namespace) -> int:
    from eagle3_target.benchmark import run_inprocess

    cfg = BenchConfig(batch=args.batch, seq_len=args.seq_len, runs=args.runs, warmup=args.warmup,
                      mode=args.mode, ragged=args.ragged, seed=args.seed)
    limit = _max_positions(args.model)
    if limit is not None and cfg.seq_len > limit:
        print(f"warning: --seq-len {cfg.seq_len} is above the model's max_position_embeddings {limit}: "
              f"positions past it are outside what the model supports, so this times no real workload",
              file=sys.stderr)
    target = load_target(args)
    try:
        result = run_inprocess(target, cfg)
    finally:
        target.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"engine={args.engine} mode={cfg.mode} B x S = {cfg.batch} x {cfg.seq_len} "
              f"({result['tokens']} real tokens{', ragged' if cfg.ragged else ''})")
        print(f"median of {cfg.runs}: {result['median_s'] * 1e3:.1f} ms, "
              f"{result['tokens_per_s']:,.0f} tokens/s "
              f"(min {result['min_s'] * 1e3:.1f} ms, max {result['max_s'] * 1e3:.1f} ms)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = BenchConfig()
    p = sub.add_parser("bench", help="in-process supervision tokens/s",
                       description="Times generate_batch on random token ids; prints the median "
                                   "of --runs after --warmup.")
    add_model_args(p)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--mode", default=d.mode, choices=list(FORWARDS),
                   help="logits: aux + all-position logits; hidden: aux + final hidden (no LM head)")
    p.add_argument("--ragged", action="store_true", help="row lengths drawn from [S/16, S]")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_bench)
