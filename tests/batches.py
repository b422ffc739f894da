"""Batch builders shared by the engine tests."""

from __future__ import annotations

import torch


def right_padded_batch(lengths: list[int], vocab: int, seed: int = 0, pad_id: int = 0):
    """``(input_ids, attention_mask)`` each ``[B, max(lengths)] int64``, right-padded."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), s), generator=g)
    mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), mask
