"""``eagle3-target make-tiny-model DIR``: write a built-in model (a deterministic Llama with
a locally trained tokenizer and chat template; nothing is downloaded)."""

from __future__ import annotations

import argparse

from eagle3_target.cli.common import check_writable
from eagle3_target.tiny import TinyModelConfig

__all__ = ["register"]

_FLAGS = {  # flag -> (TinyModelConfig field, type, help)
    "--layers": ("layers", int, None),
    "--hidden": ("hidden", int, None),
    "--heads": ("heads", int, None),
    "--kv-heads": ("kv_heads", int, None),
    "--intermediate": ("intermediate", int, None),
    "--vocab": ("vocab", int, "vocabulary size (embedding rows)"),
    "--seed": ("seed", int, None),
    "--head-scale": ("head_scale", float, "multiply the LM head (>1 gives peaked next-token distributions)"),
}


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from eagle3_target.engines.common import quiet_transformers
    from eagle3_target.tiny import make_tiny_model

    quiet_transformers()
    check_writable(args.dir, "DIR", folder=True)
    cfg = TinyModelConfig(**{field: getattr(args, field) for field, _, _ in _FLAGS.values()})
    out = make_tiny_model(args.dir, cfg)
    print(f"wrote tiny Llama ({cfg.layers} layers, hidden {cfg.hidden}) to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write the deterministic built-in tiny Llama",
                       description="Writes a small Llama (random weights, fixed seed) and a locally "
                                   "trained tokenizer with a chat template. Nothing is downloaded.")
    p.add_argument("dir", help="output directory (must be empty or absent)")
    defaults = TinyModelConfig()
    for flag, (field, kind, help_) in _FLAGS.items():
        p.add_argument(flag, dest=field, type=kind, default=getattr(defaults, field), help=help_)
    p.set_defaults(func=_cmd_make_tiny_model)
