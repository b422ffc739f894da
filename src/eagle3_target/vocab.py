"""Draft vocabulary: which target tokens the draft head predicts, and the target
distribution projected onto them.

The convention all peers share (NeMo Automodel, SpecForge, vLLM/SGLang draft loaders):

- ``selected_token_ids [Vd] int64``: target ids of the draft vocabulary, in draft order
  (special tokens first, then by descending supervised frequency, ties by lower id);
- ``selected_token_mask [V] bool``: True where a target id is in the draft vocabulary;
- ``d2t [Vd] int64``: offsets, ``target_id = draft_id + d2t[draft_id]``;
- ``t2d [V] bool``: the same set as ``selected_token_mask`` (the name vLLM/SGLang use).

Mappings rest as safetensors with a content hash (``mapping_id``) so a server can hold
several at once, addressed by id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["VocabMapping", "build_vocab_mapping", "compute_target_distribution", "count_tokens"]


@dataclass(frozen=True)
class VocabMapping:
    """A draft vocabulary over a target vocabulary of size ``V``.

    Attributes:
        selected_token_ids: ``[Vd] int64`` target ids in draft order.
        selected_token_mask: ``[V] bool``.
    """

    selected_token_ids: torch.Tensor
    selected_token_mask: torch.Tensor

    def __post_init__(self) -> None:
        ids, mask = self.selected_token_ids, self.selected_token_mask
        if ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() == 0:
            raise ValueError(
                f"selected_token_ids must be a non-empty 1-D int64 tensor, got "
                f"shape {tuple(ids.shape)} dtype {ids.dtype}"
            )
        if mask.dim() != 1 or mask.dtype != torch.bool:
            raise ValueError(
                f"selected_token_mask must be a 1-D bool tensor, got shape {tuple(mask.shape)} "
                f"dtype {mask.dtype}"
            )
        v = mask.numel()
        if int(ids.min()) < 0 or int(ids.max()) >= v:
            raise ValueError(f"selected_token_ids must lie in [0, {v}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("selected_token_ids holds duplicate ids")
        expected = torch.zeros(v, dtype=torch.bool)
        expected[ids.cpu()] = True
        if not torch.equal(expected, mask.cpu()):
            raise ValueError("selected_token_mask does not mark exactly the selected_token_ids")

    @classmethod
    def from_ids(cls, selected_token_ids: torch.Tensor, target_vocab_size: int) -> "VocabMapping":
        ids = torch.as_tensor(selected_token_ids).to(torch.int64).flatten().cpu()
        mask = torch.zeros(target_vocab_size, dtype=torch.bool)
        if ids.numel() and int(ids.min()) >= 0 and int(ids.max()) < target_vocab_size:
            mask[ids] = True
        return cls(ids, mask)

    @property
    def draft_vocab_size(self) -> int:
        return int(self.selected_token_ids.numel())

    @property
    def target_vocab_size(self) -> int:
        return int(self.selected_token_mask.numel())

    @property
    def d2t(self) -> torch.Tensor:
        """``[Vd] int64`` offsets: ``target = draft + d2t[draft]``."""
        return self.selected_token_ids - torch.arange(self.draft_vocab_size, dtype=torch.int64)

    @property
    def t2d(self) -> torch.Tensor:
        """``[V] bool``."""
        return self.selected_token_mask.clone()

    @property
    def mapping_id(self) -> str:
        """Content hash (sha256 of V and the ordered ids), the same on every machine."""
        h = hashlib.sha256()
        h.update(f"eagle3-vocab-v1:{self.target_vocab_size}:".encode())
        h.update(self.selected_token_ids.cpu().contiguous().numpy().astype("<i8").tobytes())
        return h.hexdigest()[:32]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "selected_token_ids": self.selected_token_ids.contiguous(),
            "selected_token_mask": self.selected_token_mask.contiguous(),
            "d2t": self.d2t.contiguous(),
            "t2d": self.t2d.contiguous(),
        }

    def save(self, path: str | Path) -> None:
        save_file(self.tensors(), str(path), metadata={"mapping_id": self.mapping_id,
                                                       "format": "eagle3-vocab-v1"})

    @classmethod
    def load(cls, path: str | Path) -> "VocabMapping":
        t = load_file(str(path))
        for key in ("selected_token_ids", "selected_token_mask"):
            if key not in t:
                raise ValueError(f"{path}: not a vocab mapping, missing tensor {key!r}")
        m = cls(t["selected_token_ids"], t["selected_token_mask"])
        if "d2t" in t and not torch.equal(t["d2t"], m.d2t):
            raise ValueError(f"{path}: d2t disagrees with selected_token_ids")
        return m


def count_tokens(
    streams: Iterable[Iterable[int] | torch.Tensor], target_vocab_size: int
) -> torch.Tensor:
    """``[V] int64`` counts of the ids in ``streams`` (each an iterable of ids, e.g. the
    supervised tokens of one sample). Ids outside ``[0, V)`` raise ValueError."""
    counts = torch.zeros(target_vocab_size, dtype=torch.int64)
    for s in streams:
        ids = torch.as_tensor(s if isinstance(s, torch.Tensor) else list(s), dtype=torch.int64)
        ids = ids.flatten().cpu()
        if ids.numel() == 0:
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= target_vocab_size:
            raise ValueError(f"token id out of range [0, {target_vocab_size}): "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        counts += torch.bincount(ids, minlength=target_vocab_size)
    return counts


def build_vocab_mapping(
    token_counts: torch.Tensor | Iterable[Iterable[int]],
    draft_vocab_size: int,
    special_ids: Iterable[int] = (),
    *,
    target_vocab_size: int | None = None,
) -> VocabMapping:
    """Chooses the draft vocabulary.

    Args:
        token_counts: ``[V] int`` counts, or token streams (then ``target_vocab_size``
            is required).
        draft_vocab_size: ``Vd``, 1..V.
        special_ids: always kept, first, in the order given (duplicates dropped).

    Order: specials, then tokens by descending count (ties: lower id first), then unseen
    ids in id order if the seen ones do not fill ``Vd``.
    """
    if isinstance(token_counts, torch.Tensor):
        counts = token_counts.to(torch.int64).flatten().cpu()
        if target_vocab_size is not None and counts.numel() != target_vocab_size:
            raise ValueError(f"token_counts has {counts.numel()} entries, expected {target_vocab_size}")
    else:
        if target_vocab_size is None:
            raise ValueError("target_vocab_size is required when token_counts are token streams")
        counts = count_tokens(token_counts, target_vocab_size)
    v = counts.numel()
    if isinstance(draft_vocab_size, bool) or not isinstance(draft_vocab_size, int) \
            or not 0 < draft_vocab_size <= v:
        raise ValueError(f"draft_vocab_size must be an integer in [1, {v}], got {draft_vocab_size!r}")
    if bool((counts < 0).any()):
        raise ValueError("token_counts must be non-negative")
    selected: list[int] = []
    seen: set[int] = set()
    for s in special_ids:
        s = int(s)
        if not 0 <= s < v:
            raise ValueError(f"special id {s} out of range [0, {v})")
        if s not in seen:
            selected.append(s)
            seen.add(s)
    if len(selected) > draft_vocab_size:
        raise ValueError(f"{len(selected)} special ids do not fit a draft vocabulary of "
                         f"{draft_vocab_size}")
    # Stable sort on -count keeps lower ids first among ties: deterministic everywhere.
    order = torch.argsort(-counts, stable=True).tolist()
    for tid in order:
        if len(selected) >= draft_vocab_size or counts[tid] == 0:
            break
        if tid not in seen:
            selected.append(tid)
            seen.add(tid)
    for tid in range(v):
        if len(selected) >= draft_vocab_size:
            break
        if tid not in seen:
            selected.append(tid)
            seen.add(tid)
    return VocabMapping.from_ids(torch.tensor(selected, dtype=torch.int64), v)


def compute_target_distribution(
    logits: torch.Tensor,
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projects target logits onto the draft vocabulary (NeMo's convention).

    Args:
        logits: ``[B,S,V]`` any float dtype (already shifted).
        selected_token_ids: ``[Vd] int64``.
        selected_token_mask: ``[V] bool``.
        loss_mask: ``[B,S]`` 0/1 (already shifted).

    Returns:
        ``target_probs [B,S,Vd] fp32`` (softmax over the draft-vocab logits) and
        ``position_mask [B,S,1] bool`` (target argmax is in the draft vocab AND loss_mask).
    """
    dev = logits.device
    top = logits.argmax(dim=-1)
    position_mask = (selected_token_mask.to(dev)[top] & loss_mask.to(dev).bool()).unsqueeze(-1)
    draft_logits = logits.index_select(-1, selected_token_ids.to(dev))
    target_probs = torch.softmax(draft_logits.float(), dim=-1)
    return target_probs, position_mask
