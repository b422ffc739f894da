"""What several subcommands share: the model flags, their parsing, and loading the
target they describe."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from eagle3_target.engines import ENGINES
from eagle3_target.errors import InputError

__all__ = ["add_model_args", "parse_aux_layers", "parse_engine_args", "engine_options", "load_target",
           "check_model_args", "check_writable"]


def check_writable(path: str | os.PathLike, flag: str, *, folder: bool = False) -> None:
    """Raises :class:`InputError` naming ``flag`` unless ``path`` (a file to write, or with
    ``folder`` a folder to write into) can be written: checked before any model loads, so
    a read-only place costs no minutes of loading and leaves nothing behind. Creates
    nothing: a probe file is made and removed in the nearest folder that exists."""
    p = Path(path).absolute()
    if folder and p.exists() and not p.is_dir():
        raise InputError(f"{flag} {path}: exists and is not a folder")
    if not folder and p.is_dir():
        raise InputError(f"{flag} {path}: is a folder; give a file name")
    anc = p if folder else p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"{flag} {path}: {anc} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=anc, prefix=".eagle3-target-probe-"):
            pass
    except OSError as e:
        raise InputError(f"{flag} {path}: the folder {anc} is not writable ({e.strerror or e}); "
                         f"choose a folder you can write to") from None


def add_model_args(p: argparse.ArgumentParser, *, engine: bool = True) -> None:
    """``--model/--engine/--device/--dtype/--aux-layers``, the same on every subcommand."""
    p.add_argument("--model", default=None,
                   help="local model directory (default: the built-in tiny model, built on first use)")
    if engine:
        p.add_argument("--engine", default="hf", choices=list(ENGINES), help="inference engine")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", default=None,
                   help="float32|bfloat16|float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--aux-layers", default=None,
                   help="three comma-separated decoder layer ids (default: 1,N/2-1,N-4)")
    if engine:
        p.add_argument("--tp-size", type=int, default=1,
                       help="tensor-parallel ranks, one GPU each (--engine sglang; default 1)")
        p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="engine option passed to the engine's build(), e.g. "
                            "attention_backend=triton (repeatable; VALUE parsed as JSON when it parses)")


def parse_aux_layers(text: str | None) -> list[int] | None:
    """``"1,3,4"`` -> ``[1, 3, 4]``; None stays None (the model's default ids)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--aux-layers must be comma-separated integers, got {text!r}") from None


def parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{"key": value}``; values parsed as JSON when they parse,
    dashes in keys become underscores."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
    return out


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """What the model flags give the engine's ``build()``: ``--engine-arg`` options and
    ``--tp-size`` (when above 1)."""
    out = parse_engine_args(getattr(args, "engine_arg", None) or [])
    tp = getattr(args, "tp_size", 1)
    if tp != 1:
        out["tp_size"] = tp
    return out


def check_model_args(args: argparse.Namespace) -> None:
    """The model flags' own checks, without loading anything: the ``--aux-layers`` and
    ``--engine-arg`` syntax, the options the engine takes, ``--dtype``, and for the
    transformers engine ``--device`` (for ``serve``, which listens before it loads)."""
    from eagle3_target.engines import check_options, parse_dtype
    from eagle3_target.engines.common import resolve_device

    parse_aux_layers(args.aux_layers)
    engine = getattr(args, "engine", "hf")
    check_options(engine, engine_options(args))
    parse_dtype(args.dtype)
    if engine == "hf":
        resolve_device(args.device)


def load_target(args: argparse.Namespace, **engine_kwargs: Any):
    """Builds an :class:`~eagle3_target.Eagle3TargetModel` from the shared model args;
    the engine options (:func:`engine_options`), then ``engine_kwargs`` (which win), go
    to the engine."""
    from eagle3_target import Eagle3TargetModel
    from eagle3_target.engines.common import quiet_transformers
    from eagle3_target.tiny import resolve_model

    quiet_transformers()
    return Eagle3TargetModel.from_pretrained(
        resolve_model(args.model),
        engine=getattr(args, "engine", "hf"),
        device=args.device,
        dtype=args.dtype,
        aux_layer_ids=parse_aux_layers(args.aux_layers),
        aux_ids_name="--aux-layers",
        **{**engine_options(args), **engine_kwargs},
    )
