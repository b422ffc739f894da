"""``eagle3-target info``: a model's layers, hidden size, vocabulary and default aux ids,
read from its config alone (no weights are loaded)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from eagle3_target.cli.common import add_model_args

__all__ = ["register"]


def _cmd_info(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from eagle3_target.contract import default_aux_layer_ids
    from eagle3_target.engines.common import quiet_transformers, text_config
    from eagle3_target.tiny import resolve_model

    quiet_transformers()
    path = resolve_model(args.model)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    text = text_config(cfg)
    n = int(text.num_hidden_layers)
    try:
        aux: Any = default_aux_layer_ids(n)
    except ValueError as e:
        aux = f"none ({e})"
    info = {
        "model": path,
        "architecture": (getattr(cfg, "architectures", None) or ["?"])[0],
        "num_hidden_layers": n,
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(text.vocab_size),
        "default_aux_layer_ids": aux,
        "dtype": str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)),
    }
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's layers, hidden size, vocab and default aux ids")
    add_model_args(p, engine=False)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_cmd_info)
