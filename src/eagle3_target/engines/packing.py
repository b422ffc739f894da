"""Rows in and out of batches: the one right-padder, row spans, extend plans, and the
gather/scatter between padded ``[B,S,...]`` tensors and packed real tokens ``[T,...]``.

Every place that builds a right-padded batch (the CLI's ``forward``, the dump, the
server's batching worker, the dataset collate) calls :func:`right_pad`; every place
that moves between padded and packed layouts calls :func:`gather_rows` or
:func:`scatter_rows`. Free functions with shapes in their signatures, testable alone.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["right_pad", "lengths_mask", "row_spans", "plan_extends", "gather_rows", "scatter_rows"]


def right_pad(rows: Sequence[Any], fill: int | float | bool = 0, *,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``[L_i, ...]`` -> ``[B, max L_i, ...]``, each row at the start of its line and
    ``fill`` after it.

    Rows of Python ints (lists or numpy arrays) are packed in numpy and handed to torch
    whole: a torch op per row drops and retakes the GIL each time, which slowed a GPU
    engine's launching thread while the dump packed hundreds of rows a batch. Tensor
    rows (any dtype, any trailing shape) are copied with torch.
    """
    if not len(rows):
        raise ValueError("right_pad needs at least one row")
    s_max = max(len(r) for r in rows)
    if isinstance(rows[0], torch.Tensor):
        first = rows[0]
        out = torch.full((len(rows), s_max, *first.shape[1:]), fill, dtype=dtype or first.dtype,
                         device=first.device)
        for r, row in enumerate(rows):
            out[r, : row.shape[0]] = row
        return out
    np_dtype = torch.empty((), dtype=dtype or torch.int64).numpy().dtype
    out_np = np.full((len(rows), s_max), fill, dtype=np_dtype)
    for r, row in enumerate(rows):
        out_np[r, : len(row)] = row
    return torch.from_numpy(out_np)


def lengths_mask(lengths: Sequence[int], s_max: int | None = None) -> torch.Tensor:
    """``[B, S] int64`` attention mask of right-padded rows of these lengths."""
    n = torch.as_tensor(list(lengths), dtype=torch.int64)
    s = int(n.max()) if s_max is None else s_max
    return (torch.arange(s)[None, :] < n[:, None]).to(torch.int64)


def row_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Checks ``[B,S]`` inputs; returns each row's ``(start, length)`` of real tokens.

    Real tokens must be one contiguous run per row (right or left padding).
    """
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 2-D integer tensor [B,S], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                         f"has shape {tuple(input_ids.shape)}")
    m = attention_mask.detach().to("cpu", torch.int64)
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    lengths = m.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"attention_mask rows {(lengths == 0).nonzero().flatten().tolist()[:5]} "
                         f"have no real token")
    starts = m.argmax(dim=1)
    pos = torch.arange(m.shape[1])[None, :]
    expected = ((pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])).to(torch.int64)
    if not torch.equal(m, expected):
        bad = (m != expected).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {bad[:5]} have real tokens that are not one "
                         f"contiguous run; pad on one side only")
    return starts.tolist(), lengths.tolist()


def plan_extends(lengths: Sequence[int], max_tokens: int, max_rows: int, page_size: int = 1) -> list[list[int]]:
    """Splits rows (in order) into the fewest consecutive groups whose page-rounded
    token count fits ``max_tokens`` and row count fits ``max_rows``."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        need = -(-n // page_size) * page_size
        if need > max_tokens:
            raise ValueError(f"row {i} has {n} real tokens, more than this runner's extend budget "
                             f"of {max_tokens} tokens: build it with a larger max_batch_tokens")
        if groups and used + need <= max_tokens and len(groups[-1]) < max_rows:
            groups[-1].append(i)
            used += need
        else:
            groups.append([i])
            used = need
    return groups


def gather_rows(padded: Mapping[str, torch.Tensor], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: [B,S,...]}`` -> ``{name: [T,...]}``: the real tokens (where
    ``attention_mask [B,S]`` is 1), rows back to back, each on its tensor's device. One
    index for all of them, one ``index_select`` each: a GPU then sends only real tokens
    to the host (the dump's batches were about half padding on the sample chats)."""
    b, s = attention_mask.shape
    idx = attention_mask.reshape(-1).nonzero().squeeze(1)
    on: dict[torch.device, torch.Tensor] = {}
    out = {}
    for k, v in padded.items():
        if v.device not in on:
            on[v.device] = idx.to(v.device, non_blocking=True)
        out[k] = v.detach().reshape(b * s, *v.shape[2:]).index_select(0, on[v.device])
    return out


def scatter_rows(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``packed [T,D]`` (rows' real tokens, row-major) -> ``[B,S,D]`` with zeros at pads."""
    B, S = mask.shape
    if packed.shape[0] == B * S:  # no pad at all: a view, no copy
        return packed.view(B, S, packed.shape[-1])
    out = packed.new_zeros(B, S, packed.shape[-1])
    out[mask.to(packed.device, torch.bool)] = packed
    return out
