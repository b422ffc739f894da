"""A draft vocabulary from chat data (behind ``eagle3-target vocab``).

Renders the data exactly as ``dump`` does (same chat template, loss mask, truncation and
reasoning masking), counts the supervised tokens, keeps the tokenizer's special tokens
first and writes the mapping (:class:`~eagle3_target.vocab.VocabMapping`:
``selected_token_ids``, ``selected_token_mask``, ``d2t``, ``t2d`` and its content hash)
atomically. Needs the tokenizer and the model's config only, never the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["VocabStats", "build_vocab_from_data", "target_vocab_size"]


@dataclass
class VocabStats:
    samples: int
    supervised_tokens: int
    unique_tokens: int
    covered_tokens: int
    """Supervised tokens whose id is in the draft vocabulary."""


def target_vocab_size(model_dir: str) -> int:
    """The model's vocabulary size (embedding rows), from its config alone."""
    from transformers import AutoConfig

    from eagle3_target.engines.common import text_config

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return int(text_config(cfg).vocab_size)


def build_vocab_from_data(
    data: Sequence[str], tokenizer: Any, target_vocab_size: int, draft_vocab_size: int, *,
    max_length: int | None = None, mask_reasoning: bool = False, strict: bool = False,
    max_row_bytes: int | None = None,
):
    """``(VocabMapping, VocabStats, DataReport)`` for the supervised tokens of ``data``
    (rows read up to ``max_row_bytes``; None: the default cap)."""
    from eagle3_target.data.chat import ChatEncoder
    from eagle3_target.data.samples import scan
    from eagle3_target.data.tokenizer import special_token_ids
    from eagle3_target.vocab import build_vocab_mapping

    from eagle3_target.data.rows import MAX_ROW_BYTES

    encoder = ChatEncoder(tokenizer, max_length=max_length, mask_reasoning=mask_reasoning,
                          vocab_size=target_vocab_size, max_row_bytes=max_row_bytes or MAX_ROW_BYTES)
    counts = torch.zeros(target_vocab_size, dtype=torch.int64)

    def add(sample) -> None:
        ids = torch.tensor(sample.input_ids[1:], dtype=torch.int64)
        mask = torch.tensor(sample.loss_mask[1:], dtype=torch.bool)
        counts.add_(torch.bincount(ids[mask], minlength=target_vocab_size))

    n, report = scan(data, encoder, on_sample=add)
    if strict and (msg := report.strict_error(max_length)) is not None:
        raise ValueError(msg)
    if n == 0:
        raise ValueError("no usable sample in the data: " + "; ".join(report.lines()))
    specials = [t for t in special_token_ids(tokenizer) if t < target_vocab_size]
    mapping = build_vocab_mapping(counts, draft_vocab_size, specials)
    stats = VocabStats(samples=n, supervised_tokens=int(counts.sum()), unique_tokens=int((counts > 0).sum()),
                       covered_tokens=int(counts[mapping.selected_token_ids].sum()))
    return mapping, stats, report
