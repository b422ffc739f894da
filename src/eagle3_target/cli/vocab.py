"""``eagle3-target vocab``: choose a draft vocabulary from the supervised tokens of chat
data (:mod:`eagle3_target.data.draft_vocab`) and write it atomically."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from eagle3_target.cli.common import check_writable
from eagle3_target.data.chat import MAX_LENGTH
from eagle3_target.data.rows import MAX_ROW_BYTES

__all__ = ["register"]


def _cmd_vocab(args: argparse.Namespace) -> int:
    from eagle3_target.data.draft_vocab import build_vocab_from_data, target_vocab_size
    from eagle3_target.data.rows import check_data_files, sample_data_path
    from eagle3_target.data.tokenizer import check_tokenizer_fits, load_tokenizer
    from eagle3_target.engines.common import quiet_transformers
    from eagle3_target.tiny import resolve_model

    quiet_transformers()
    check_writable(args.out, "--out")
    data = [str(p) for p in check_data_files(args.data or [str(sample_data_path())])]
    model = resolve_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or model)
    v = target_vocab_size(model)
    check_tokenizer_fits(tokenizer, v)
    if not 0 < args.draft_vocab_size <= v:
        raise ValueError(f"--draft-vocab-size must be in [1, {v}] (the target's vocab size), got "
                         f"{args.draft_vocab_size}")
    mapping, stats, report = build_vocab_from_data(
        data, tokenizer, v, args.draft_vocab_size, max_length=args.max_length or None,
        mask_reasoning=args.mask_reasoning, strict=args.strict, max_row_bytes=_row_bytes(args.max_row_mb))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"
    mapping.save(tmp)
    os.replace(tmp, out)
    cover = stats.covered_tokens / stats.supervised_tokens if stats.supervised_tokens else 0.0
    print(f"draft vocabulary: {mapping.draft_vocab_size} of {v} target tokens -> {out} "
          f"(mapping_id {mapping.mapping_id})")
    print(f"  {stats.samples} samples, {stats.supervised_tokens:,} supervised tokens, "
          f"{stats.unique_tokens:,} distinct; the draft vocabulary covers {cover:.2%} of them")
    for line in report.lines() + report.truncation_lines(args.max_length or None, stats.supervised_tokens):
        print(f"  {line}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vocab", help="choose a draft vocabulary from the supervised tokens of chat data",
                       description="Counts the tokens under the loss mask (rendered as `dump` renders "
                                   "them), keeps the special tokens first, then the most frequent, and "
                                   "writes selected_token_ids, selected_token_mask, d2t, t2d and a "
                                   "content hash to a safetensors file.")
    p.add_argument("--model", default=None, help="model folder (tokenizer + config; default: built-in tiny model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    p.add_argument("--data", nargs="+", default=None, help="chat files (default: the bundled sample chats)")
    p.add_argument("--draft-vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output mapping .safetensors")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH,
                   help=f"truncate as dump does (default {MAX_LENGTH}; 0: never)")
    p.add_argument("--max-row-mb", type=float, default=MAX_ROW_BYTES / 2**20,
                   help="skip (or with --strict refuse) a data row larger than this many MiB, as dump does")
    p.add_argument("--mask-reasoning", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on any malformed, unsupervised or truncated row")
    p.set_defaults(func=_cmd_vocab)


def _row_bytes(mb: float) -> int:
    if not mb * 2**20 >= 1:
        raise ValueError(f"--max-row-mb must be positive, got {mb}")
    return int(mb * 2**20)
