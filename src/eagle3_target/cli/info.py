"""``eagle3-target info``: a model's layers, hidden size, vocabulary and default aux ids,
read from its config alone (no weights are loaded)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from eagle3_target.cli.common import add_model_args, parse_aux_layers

__all__ = ["register"]


def _tokenizer_info(path: str, vocab_size: int) -> str:
    """The tokenizer a dump of this folder would use, or why there is none that fits."""
    from eagle3_target.data.tokenizer import check_tokenizer_fits, load_tokenizer
    from eagle3_target.errors import InputError

    try:
        tok = load_tokenizer(path)
        check_tokenizer_fits(tok, vocab_size)
    except InputError as e:
        return f"UNUSABLE: {e}"
    return f"{type(tok).__name__}, {len(tok)} tokens"


def _cmd_info(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from eagle3_target.contract import default_aux_layer_ids, validate_aux_layer_ids
    from eagle3_target.engines.common import parse_dtype, quiet_transformers, resolve_device, text_config
    from eagle3_target.tiny import resolve_model

    quiet_transformers()
    # The flags a target would be built with are checked as loading checks them.
    if args.device is not None:
        resolve_device(args.device)
    parse_dtype(args.dtype)
    path = resolve_model(args.model)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    text = text_config(cfg)
    n = int(text.num_hidden_layers)
    given = parse_aux_layers(args.aux_layers)
    default: list[int] | None
    try:
        default = default_aux_layer_ids(n, name="--aux-layers")
        note = None
    except ValueError as e:
        default, note = None, str(e)
    # The ids a target built with these flags would capture; checked as loading checks them.
    aux = validate_aux_layer_ids(given, n, name="--aux-layers") if given is not None else default
    info: dict[str, Any] = {
        "model": path,
        "architecture": (getattr(cfg, "architectures", None) or ["?"])[0],
        "num_hidden_layers": n,
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(text.vocab_size),
        "aux_layer_ids": aux,
        "default_aux_layer_ids": default,
        "dtype": str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)),
        "tokenizer": _tokenizer_info(path, int(text.vocab_size)),
    }
    if note is not None and given is None:
        info["note"] = note
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {'none' if v is None else v}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's layers, hidden size, vocab and default aux ids")
    add_model_args(p, engine=False)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_cmd_info)
