"""``eagle3-target`` command line: one subcommand per job.

Each subcommand lives in a module that exposes ``register(subparsers)``; this file only
lists them (``SUBCOMMAND_MODULES``) and dispatches. Heavy imports (torch, transformers,
engines, web frameworks) happen inside the handlers, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import import_module
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "SUBCOMMAND_MODULES", "add_model_args", "load_target", "parse_engine_args",
           "resolve_model"]

# Modules with a `register(subparsers)` function, in --help order.
SUBCOMMAND_MODULES: list[str] = [
    "eagle3_target.cli",
    "eagle3_target.demo",
    "eagle3_target.server.cli",
    "eagle3_target.vocab_cli",
    "eagle3_target.dump",
    "eagle3_target.verify",
]


# --------------------------------------------------------------------------- shared


def add_model_args(p: argparse.ArgumentParser, *, engine: bool = True) -> None:
    """``--model/--engine/--device/--dtype/--aux-layers``, the same on every subcommand."""
    p.add_argument("--model", default=None,
                   help="local model directory (default: the built-in tiny model, built on first use)")
    if engine:
        p.add_argument("--engine", default="hf", choices=["hf", "sglang"], help="inference engine")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", default=None,
                   help="float32|bfloat16|float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--aux-layers", default=None,
                   help="three comma-separated decoder layer ids (default: 1,N/2-1,N-4)")
    if engine:
        p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="engine option passed to the engine's build(), e.g. "
                            "attention_backend=triton (repeatable; VALUE parsed as JSON when it parses)")


def parse_aux_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--aux-layers must be comma-separated integers, got {text!r}")


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


def resolve_model(path: str | None) -> str:
    """The model directory, or the built-in tiny model's cache folder when ``path`` is None."""
    if path is None:
        from eagle3_target.tiny import tiny_model_path

        return str(tiny_model_path())
    if not Path(path).is_dir():
        raise SystemExit(f"--model {path}: not a directory (models are loaded from local folders)")
    return path


def load_target(args: argparse.Namespace, **engine_kwargs: Any):
    """Builds an :class:`~eagle3_target.Eagle3TargetModel` from the shared model args;
    ``--engine-arg`` options, then ``engine_kwargs`` (which win), go to the engine."""
    from eagle3_target import Eagle3TargetModel

    _quiet_transformers()
    return Eagle3TargetModel.from_pretrained(
        resolve_model(args.model),
        engine=getattr(args, "engine", "hf"),
        device=args.device,
        dtype=args.dtype,
        aux_layer_ids=parse_aux_layers(args.aux_layers),
        **{**parse_engine_args(getattr(args, "engine_arg", None) or []), **engine_kwargs},
    )


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - older transformers
        pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------------- subcommands


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from eagle3_target.tiny import TinyModelConfig, make_tiny_model

    _quiet_transformers()
    cfg = TinyModelConfig(layers=args.layers, hidden=args.hidden, heads=args.heads,
                          kv_heads=args.kv_heads, intermediate=args.intermediate,
                          vocab=args.vocab, seed=args.seed, head_scale=args.head_scale)
    out = make_tiny_model(args.dir, cfg)
    print(f"wrote tiny Llama ({cfg.layers} layers, hidden {cfg.hidden}) to {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from eagle3_target.contract import default_aux_layer_ids

    _quiet_transformers()
    path = resolve_model(args.model)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    text = getattr(cfg, "text_config", None) or cfg
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


def read_jsonl_inputs(path: str, tokenizer: Any) -> list[list[int]]:
    """Rows of ``{"input_ids": [...]}`` or ``{"text": "..."}`` -> token id lists."""
    rows: list[list[int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: not JSON ({e})")
            if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                ids = row["input_ids"]
                if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                    raise SystemExit(f"{path}:{lineno}: input_ids must be a non-empty list of ints")
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                if tokenizer is None:
                    raise SystemExit(f"{path}:{lineno}: a text row needs the model's tokenizer")
                ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
                if not ids:
                    raise SystemExit(f"{path}:{lineno}: text tokenizes to nothing")
            else:
                raise SystemExit(f'{path}:{lineno}: expected {{"input_ids": [...]}} or {{"text": "..."}}')
            rows.append(ids)
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-pads id lists -> ``(input_ids [B,S] int64, attention_mask [B,S] int64)``."""
    import torch

    s = max(len(r) for r in rows)
    ids = torch.full((len(rows), s), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), s), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, : len(r)] = 1
    return ids, mask


def _cmd_forward(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    target = load_target(args)
    try:
        path = resolve_model(args.model)
        tokenizer = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # a model folder without a tokenizer still takes input_ids rows
            tokenizer = None
        rows = read_jsonl_inputs(args.input, tokenizer)
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        input_ids, attention_mask = pad_rows(rows, pad_id)
        loss_mask = attention_mask.clone()
        t0 = time.perf_counter()
        batch = target.generate_batch(input_ids, attention_mask, loss_mask)
        dt = time.perf_counter() - t0
        tensors = {
            "aux_hidden_states": batch.aux_hidden_states,
            "logits": batch.logits,
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "loss_mask": batch.loss_mask,
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {"aux_layer_ids": json.dumps(target.aux_layer_ids), "model": path,
                "shifted": "logits,input_ids,loss_mask"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, args.out, metadata=meta)
        n_tok = int(attention_mask.sum())
        for k, v in tensors.items():
            print(f"{k:<18} {str(list(v.shape)):<16} {str(v.dtype).replace('torch.', '')}")
        size = os.path.getsize(args.out)
        print(f"{len(rows)} rows, {n_tok} tokens in {dt:.3f} s ({n_tok / dt:,.0f} tokens/s); "
              f"wrote {human_bytes(size)} to {args.out} ({size / n_tok:,.0f} bytes/token)")
    finally:
        target.close()
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from eagle3_target.benchmark import BenchConfig, run_inprocess

    cfg = BenchConfig(batch=args.batch, seq_len=args.seq_len, runs=args.runs, warmup=args.warmup,
                      mode=args.mode, ragged=args.ragged, seed=args.seed)
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
    p = sub.add_parser("make-tiny-model", help="write the deterministic built-in tiny Llama",
                       description="Writes a small Llama (random weights, fixed seed) and a locally "
                                   "trained tokenizer with a chat template. Nothing is downloaded.")
    p.add_argument("dir", help="output directory (must be empty or absent)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (embedding rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-scale", type=float, default=1.0,
                   help="multiply the LM head (>1 gives peaked next-token distributions)")
    p.set_defaults(func=_cmd_make_tiny_model)

    p = sub.add_parser("info", help="print a model's layers, hidden size, vocab and default aux ids")
    add_model_args(p, engine=False)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("forward", help="supervision for a JSONL file of rows, written as safetensors",
                       description='Reads rows of {"input_ids": [...]} or {"text": "..."}, pads them '
                                   "into one batch, runs the target once and writes the shifted "
                                   "supervision (logits, aux_hidden_states, input_ids, "
                                   "attention_mask, loss_mask) to a safetensors file.")
    add_model_args(p)
    p.add_argument("--input", required=True, help="JSONL input")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.set_defaults(func=_cmd_forward)

    p = sub.add_parser("bench", help="in-process supervision tokens/s",
                       description="Times generate_batch on random token ids; prints the median "
                                   "of --runs after --warmup.")
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", default="logits", choices=["logits", "hidden"],
                   help="logits: aux + all-position logits; hidden: aux + final hidden (no LM head)")
    p.add_argument("--ragged", action="store_true", help="row lengths drawn from [S/16, S]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eagle3-target",
        description="Supervision for EAGLE-3 draft training: all-position logits and aux "
                    "hidden states from a target LLM.")
    from eagle3_target import __version__

    parser.add_argument("--version", action="version", version=f"eagle3-target {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"eagle3-target {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
