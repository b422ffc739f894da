"""``eagle3-target forward``: supervision for a JSONL file of rows, in one batch, written
to one safetensors file."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from eagle3_target.cli.common import add_model_args, check_writable, load_target
from eagle3_target.errors import InputError

__all__ = ["register", "read_jsonl_inputs"]


def read_jsonl_inputs(path: str, tokenizer: Any, no_tokenizer: str | None = None) -> list[list[int]]:
    """Rows of ``{"input_ids": [...]}`` or ``{"text": "..."}`` -> token id lists;
    ``no_tokenizer`` says why ``tokenizer`` is None (for a text row's error)."""
    rows: list[list[int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not JSON ({e})")
            if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                ids = row["input_ids"]
                if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                    raise InputError(f"{path}:{lineno}: input_ids must be a non-empty list of ints")
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                if tokenizer is None:
                    raise InputError(f"{path}:{lineno}: a text row needs the model's tokenizer"
                                     + (f", and {no_tokenizer}" if no_tokenizer else ""))
                ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
                if not ids:
                    raise InputError(f"{path}:{lineno}: text tokenizes to nothing")
            else:
                raise InputError(f'{path}:{lineno}: expected {{"input_ids": [...]}} or {{"text": "..."}}')
            rows.append(ids)
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _cmd_forward(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from eagle3_target.data.tokenizer import check_tokenizer_fits, load_tokenizer
    from eagle3_target.dump.summary import human_bytes
    from eagle3_target.engines.packing import lengths_mask, right_pad
    from eagle3_target.tiny import resolve_model

    if not Path(args.input).is_file():
        raise InputError(f"--input {args.input}: no such file")
    check_writable(args.out, "--out")
    target = load_target(args)
    try:
        path = resolve_model(args.model)
        try:
            tokenizer = load_tokenizer(path)
            check_tokenizer_fits(tokenizer, target.vocab_size, f"the tokenizer in {path}")
            no_tokenizer = None
        except InputError as e:  # a model folder without a tokenizer still takes input_ids rows
            tokenizer, no_tokenizer = None, str(e)
        rows = read_jsonl_inputs(args.input, tokenizer, no_tokenizer)
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        input_ids = right_pad(rows, pad_id)
        attention_mask = lengths_mask([len(r) for r in rows])
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forward", help="supervision for a JSONL file of rows, written as safetensors",
                       description='Reads rows of {"input_ids": [...]} or {"text": "..."}, pads them '
                                   "into one batch, runs the target once and writes the shifted "
                                   "supervision (logits, aux_hidden_states, input_ids, "
                                   "attention_mask, loss_mask) to a safetensors file.")
    add_model_args(p)
    p.add_argument("--input", required=True, help="JSONL input")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.set_defaults(func=_cmd_forward)
