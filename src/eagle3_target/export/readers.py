"""Reading a trainer's offline data back into our samples: :class:`TrainerDataset`.

One class for the three folders a user may hold (our dump, a NeMo cache, a speculators
export), so switching trainers never means regenerating: a sample is what
:class:`~eagle3_target.dump.reader.Eagle3Dataset` gives for our dump (the real tokens
only, ``input_ids``/``loss_mask`` shifted left with each sample's zero tail,
``attention_mask`` ones, ``aux_hidden_states`` unshifted), plus what the format holds:
NeMo's ``target_probs [L,Vd]`` and ``position_mask [L,1]``; speculators'
``final_prenorm [L,H]`` (unshifted, before the final norm).

Read with the libraries the formats are written with (``safetensors.safe_open``,
``datasets.load_from_disk``); nothing here imports a trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from eagle3_target.contract import shift_left_with_zero

__all__ = ["TrainerDataset", "detect_format"]


def detect_format(path: str | os.PathLike) -> str:
    """``"dump"``, ``"nemo"`` or ``"speculators"`` for a folder, else ValueError."""
    d = Path(path)
    if any(d.glob("manifest*.json")) and not (d / "manifest.json").is_file():
        return "dump"
    if (d / "manifest.json").is_file():
        try:
            m = json.loads((d / "manifest.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{d}/manifest.json: unreadable ({e})") from None
        return "dump" if isinstance(m, dict) and "format_version" not in m else "nemo"
    if (d / "state.json").is_file() and (d / "hidden_states").is_dir():
        return "speculators"
    raise ValueError(f"{d}: neither a dump, a NeMo offline cache nor a speculators export")


class TrainerDataset(Dataset):
    """The samples of a dump, a NeMo offline cache or a speculators export, in our form.

    Args:
        path: the folder.
        allow_incomplete: only for a dump (see :class:`Eagle3Dataset`).
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self.format = detect_format(self.path)
        self._inner: Any = None
        self._handles: dict[int, Any] = {}
        if self.format == "dump":
            from eagle3_target.dump.reader import Eagle3Dataset

            self._inner = Eagle3Dataset(self.path, allow_incomplete=allow_incomplete)
            self._len = len(self._inner)
        elif self.format == "nemo":
            m = json.loads((self.path / "manifest.json").read_text())
            if m.get("format_version") != 2:
                raise ValueError(f"{self.path}: NeMo cache format_version {m.get('format_version')}, expected 2")
            if m.get("target_probs_topk") and 0 < int(m["target_probs_topk"]) < int(m["draft_vocab_size"]):
                raise ValueError(f"{self.path}: a top-k compressed NeMo cache holds no full target_probs")
            self.manifest = m
            self.shard_size, self._len = int(m["shard_size"]), int(m["num_samples"])
            missing = [j for j in range(-(-self._len // self.shard_size))
                       if not (self.path / f"shard-{j:06d}.safetensors").is_file()]
            if missing:
                raise ValueError(f"{self.path}: shards {missing[:5]} missing for {self._len} samples")
        else:
            from datasets import load_from_disk

            self._data = load_from_disk(str(self.path)).with_format(None)
            self._len = len(self._data)

    def __len__(self) -> int:
        return self._len

    def _shard(self, j: int) -> Any:
        from safetensors import safe_open

        h = self._handles.get(j)
        if h is None:
            h = self._handles[j] = safe_open(str(self.path / f"shard-{j:06d}.safetensors"), framework="pt")
        return h

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range [0, {self._len})")
        if self.format == "dump":
            return self._inner[i]
        if self.format == "nemo":
            f = self._shard(i // self.shard_size)
            k = i % self.shard_size
            row = {name: f.get_slice(name)[k] for name in
                   ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "position_mask", "target_probs")}
            n = int(row["attention_mask"].sum())
            ids = row["input_ids"][:n].clone()
            ids[n - 1] = 0  # NeMo's shift leaves the pad id there; ours, each sample's zero tail
            return {"input_ids": ids, "attention_mask": torch.ones(n, dtype=torch.int64),
                    "loss_mask": row["loss_mask"][:n], "aux_hidden_states": row["aux_hidden_states"][:n],
                    "target_probs": row["target_probs"][:n], "position_mask": row["position_mask"][:n]}
        from safetensors import safe_open

        rec = self._data[i]
        with safe_open(str(self.path / "hidden_states" / f"hs_{i}.safetensors"), framework="pt") as f:
            tokens, hs = f.get_tensor("token_ids"), f.get_tensor("hidden_states")
        ids = torch.tensor(rec["input_ids"], dtype=torch.int64)
        if not torch.equal(tokens, ids):
            raise ValueError(f"{self.path}: hs_{i}.safetensors holds other token ids than row {i} of the dataset")
        lm = torch.tensor(rec["loss_mask"], dtype=torch.int64)
        return {"input_ids": shift_left_with_zero(ids[None])[0], "attention_mask": torch.ones_like(ids),
                "loss_mask": shift_left_with_zero(lm[None])[0], "aux_hidden_states": hs[:, :-1].flatten(1),
                "final_prenorm": hs[:, -1]}
