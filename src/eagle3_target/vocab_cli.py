"""``eagle3-target vocab``: choose a draft vocabulary from chat data.

Renders the data exactly as ``dump`` does (same chat template, loss mask, truncation and
reasoning masking), counts the supervised tokens, keeps the tokenizer's special tokens
first and writes the mapping (:class:`~eagle3_target.vocab.VocabMapping`:
``selected_token_ids``, ``selected_token_mask``, ``d2t``, ``t2d`` and its content hash)
atomically. Needs the tokenizer and the model's config only, never the weights.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["VocabStats", "build_vocab_from_data", "register"]


@dataclass
class VocabStats:
    samples: int
    supervised_tokens: int
    unique_tokens: int
    covered_tokens: int
    """Supervised tokens whose id is in the draft vocabulary."""


def _target_vocab_size(model_dir: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    text = getattr(cfg, "text_config", None) or cfg
    return int(text.vocab_size)


def build_vocab_from_data(
    data: Sequence[str], tokenizer: Any, target_vocab_size: int, draft_vocab_size: int, *,
    max_length: int | None = None, mask_reasoning: bool = False, strict: bool = False,
):
    """``(VocabMapping, VocabStats, DataReport)`` for the supervised tokens of ``data``."""
    from eagle3_target.data.chat import ChatEncoder, scan, special_token_ids
    from eagle3_target.vocab import build_vocab_mapping

    encoder = ChatEncoder(tokenizer, max_length=max_length, mask_reasoning=mask_reasoning,
                          vocab_size=target_vocab_size)
    counts = torch.zeros(target_vocab_size, dtype=torch.int64)

    def add(sample) -> None:
        ids = torch.tensor(sample.input_ids[1:], dtype=torch.int64)
        mask = torch.tensor(sample.loss_mask[1:], dtype=torch.bool)
        counts.add_(torch.bincount(ids[mask], minlength=target_vocab_size))

    n, report = scan(data, encoder, on_sample=add)
    if strict and (msg := report.strict_error()) is not None:
        raise ValueError(msg)
    if n == 0:
        raise ValueError("no usable sample in the data: " + "; ".join(report.lines()))
    specials = [t for t in special_token_ids(tokenizer) if t < target_vocab_size]
    mapping = build_vocab_mapping(counts, draft_vocab_size, specials)
    stats = VocabStats(samples=n, supervised_tokens=int(counts.sum()), unique_tokens=int((counts > 0).sum()),
                       covered_tokens=int(counts[mapping.selected_token_ids].sum()))
    return mapping, stats, report


def _cmd_vocab(args: argparse.Namespace) -> int:
    from eagle3_target.cli import _quiet_transformers, resolve_model
    from eagle3_target.data.chat import check_data_files, load_tokenizer, sample_data_path

    _quiet_transformers()
    data = [str(p) for p in check_data_files(args.data or [str(sample_data_path())])]
    model = resolve_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or model)
    v = _target_vocab_size(model)
    if not 0 < args.draft_vocab_size <= v:
        raise ValueError(f"--draft-vocab-size must be in [1, {v}] (the target's vocab size), got "
                         f"{args.draft_vocab_size}")
    mapping, stats, report = build_vocab_from_data(
        data, tokenizer, v, args.draft_vocab_size, max_length=args.max_length or None,
        mask_reasoning=args.mask_reasoning, strict=args.strict)
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
    for line in report.lines():
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
    p.add_argument("--max-length", type=int, default=2048, help="truncate as dump does (0: never)")
    p.add_argument("--mask-reasoning", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on any malformed or unsupervised row")
    p.set_defaults(func=_cmd_vocab)
