"""Reading a dump back for training: :class:`Eagle3Dataset` and :func:`collate_eagle3`.

Owns the trainer's side of the on-disk format (:mod:`.format`) a dump writes.
Shards are opened with ``safetensors.safe_open`` (memory-mapped; no pickle anywhere) and
a sample is sliced out of the packed tensors on access, so opening a dataset of any
size reads only headers, offsets and row indices. Opening checks what slicing relies
on (:mod:`.integrity`): the manifest accounts for every shard and row, and each shard's
offsets, row indices and counts are sound; an error names the file. Bit flips inside
tensor data are ``verify``'s to find (sha256). The workers of a split dump (several manifests in
one folder) are merged back into the single-worker order (by data row).

A sample is what ``Eagle3TargetModel.generate_batch`` returns for that sample alone
(a batch of one), without the batch dimension: ``input_ids``, ``loss_mask`` (shifted
left, zero tail), ``attention_mask`` (ones), ``aux_hidden_states`` (unshifted), and by
mode ``logits``, or ``target_probs`` + ``position_mask``, or (``hidden`` mode)
``hidden_states`` -- or, given an LM head, the logits (and with a vocab mapping the
draft distribution) rebuilt from them. :func:`rebuild_supervision` does the same for a
collated batch on the trainer's device, which is where it is cheapest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from eagle3_target.contract import LMHead, shift_left_with_zero, zero_tail
from eagle3_target.dump.format import LM_HEAD_FILE, expected_fields, load_lm_head, manifest_paths, read_manifest
from eagle3_target.dump.integrity import header_entry_problem, manifest_problems, shard_structure_problems
from eagle3_target.engines.packing import right_pad

__all__ = ["Eagle3Dataset", "collate_eagle3", "rebuild_supervision", "load_lm_head"]

_FIX = "; `eagle3-target verify DIR` lists every problem, and rerunning the same dump command repairs them"

# Per-token float fields and the value right padding fills them with.
_PAD = {"input_ids": 0, "attention_mask": 0, "loss_mask": 0, "aux_hidden_states": 0,
        "hidden_states": 0, "logits": 0, "target_probs": 0, "position_mask": False}


class Eagle3Dataset(Dataset):
    """The samples of a dump folder, in data order.

    Args:
        path: the dump folder (``--out`` of ``eagle3-target dump``).
        lm_head: ``hidden`` mode only: an :class:`LMHead`, or True for the one stored in
            the dump; then samples carry rebuilt ``logits [L,V]`` instead of
            ``hidden_states``.
        vocab_mapping: with rebuilt or stored logits, also project onto this draft
            vocabulary: samples carry ``target_probs [L,Vd] fp32`` and
            ``position_mask [L,1] bool`` instead of ``logits``.
        device: where rebuilt supervision is computed (and returned).
        allow_incomplete: read a dump whose workers have not all finished (only the
            finished shards are served).
    """

    def __init__(self, path: str | os.PathLike, *, lm_head: LMHead | bool | None = None,
                 vocab_mapping: Any = None, device: str | torch.device | None = None,
                 allow_incomplete: bool = False):
        self.path = Path(path)
        paths = manifest_paths(self.path)
        manifests = [read_manifest(p) for p in paths]
        if not manifests:
            raise ValueError(f"{self.path}: no manifest*.json (not a dump folder)")
        base = {k: v for k, v in manifests[0]["config"].items() if k != "shard_index"}
        for m in manifests[1:]:
            if {k: v for k, v in m["config"].items() if k != "shard_index"} != base:
                raise ValueError(f"{self.path}: its manifests come from different configurations")
        k = base["num_shards"]
        have = sorted(m["config"]["shard_index"] for m in manifests)
        unfinished = [m["config"]["shard_index"] for m in manifests if not m.get("complete")]
        if not allow_incomplete and (have != list(range(k)) or unfinished):
            raise ValueError(f"{self.path}: incomplete dump (workers present {have} of {k}, unfinished "
                             f"{unfinished}); finish it or pass allow_incomplete=True")
        self.config: dict[str, Any] = dict(manifests[0]["config"])
        self.mode: str = self.config["mode"]
        self.aux_layer_ids: list[int] = list(self.config["aux_layer_ids"])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if lm_head is not None and lm_head is not False and self.mode != "hidden":
            raise ValueError(f"lm_head applies to hidden-mode dumps; this one is {self.mode!r}")
        if lm_head is True:
            lm_head = load_lm_head(self.path / LM_HEAD_FILE, self.device)
        self.lm_head: LMHead | None = lm_head or None
        if vocab_mapping is not None and self.mode == "draft":
            raise ValueError("this dump already holds draft-vocab target_probs; vocab_mapping is not needed")
        if vocab_mapping is not None and self.mode == "hidden" and self.lm_head is None:
            raise ValueError("a vocab_mapping on a hidden-mode dump needs lm_head to rebuild the logits")
        self.vocab_mapping = vocab_mapping

        # (row, shard number, sample within shard), sorted by data row.
        self._files: list[Path] = []
        index: list[tuple[int, int, int]] = []
        self._offsets: list[torch.Tensor] = []
        from safetensors import safe_open

        fields = expected_fields(self.config)
        for mpath, m in zip(paths, manifests):
            # An unlisted shard is an error in a finished dump; in one still being
            # written (allow_incomplete) it is the writer's next shard.
            problems = manifest_problems(m, self.path, mpath.name, unlisted_ok=not m.get("complete"))
            if problems:
                more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
                raise ValueError("; ".join(str(self.path / p) for p in problems[:3]) + more + _FIX)
            cfg = m["config"]
            for entry in m["shards"]:
                fpath = self.path / entry["file"]
                if not fpath.is_file():
                    raise ValueError(f"{fpath}: missing (listed in {mpath.name}){_FIX}")
                try:
                    with safe_open(str(fpath), framework="pt") as f:
                        errs = shard_structure_problems(f, entry, fields, cfg["num_shards"], cfg["shard_index"])
                        errs += [why] if (why := header_entry_problem(f, entry)) else []
                        offsets, rows = f.get_tensor("offsets"), f.get_tensor("row_index")
                except Exception as e:  # not safetensors, truncated, ...: say which file
                    raise ValueError(f"{fpath}: unreadable ({e}){_FIX}") from None
                if errs:
                    raise ValueError(f"{fpath}: {'; '.join(errs)}{_FIX}")
                s = len(self._files)
                self._files.append(fpath)
                self._offsets.append(offsets)
                index += [(int(r), s, j) for j, r in enumerate(rows.tolist())]
        index.sort()
        self._index = index
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._index)

    def row_index(self, i: int) -> int:
        """The data row sample ``i`` came from."""
        return self._index[i][0]

    def _handle(self, s: int) -> Any:
        from safetensors import safe_open

        if os.getpid() != self._pid:  # a DataLoader worker: open its own maps
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(s)
        if h is None:
            try:
                h = self._handles[s] = safe_open(str(self._files[s]), framework="pt")
            except Exception as e:  # removed or replaced since the dataset was opened
                raise ValueError(f"{self._files[s]}: unreadable ({e})") from None
        return h

    def length(self, i: int) -> int:
        """Sample ``i``'s tokens (from the shard's offsets; no tensor is read)."""
        if not 0 <= i < len(self._index):
            raise IndexError(f"sample {i} out of range [0, {len(self._index)})")
        _, s, j = self._index[i]
        return int(self._offsets[s][j + 1] - self._offsets[s][j])

    def raw(self, i: int, fields: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Sample ``i`` as stored: unshifted ``input_ids``/``loss_mask`` and the
        per-token supervision fields (only ``fields`` when given: the others are not read)."""
        if not 0 <= i < len(self._index):
            raise IndexError(f"sample {i} out of range [0, {len(self._index)})")
        _, s, j = self._index[i]
        a, b = (int(x) for x in self._offsets[s][j: j + 2])
        f = self._handle(s)
        names = [n for n in f.keys() if n not in ("offsets", "row_index")]
        if fields is not None:
            missing = sorted(set(fields) - set(names))
            if missing:
                raise KeyError(f"{self._files[s].name} has no field {missing}; it holds {names}")
            names = [n for n in names if n in fields]
        return {name: f.get_slice(name)[a:b] for name in names}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        raw = self.raw(i)
        ids = raw.pop("input_ids")[None]
        lm = raw.pop("loss_mask").to(torch.int64)[None]
        out = {"input_ids": shift_left_with_zero(ids)[0], "attention_mask": torch.ones_like(ids[0]),
               "loss_mask": shift_left_with_zero(lm)[0]}
        if "position_mask" in raw:
            raw["position_mask"] = raw["position_mask"].reshape(-1, 1)
        out.update(raw)
        if self.lm_head is not None or self.vocab_mapping is not None:
            batch = {k: v[None] for k, v in out.items()}
            out = {k: v[0] for k, v in rebuild_supervision(batch, self.lm_head, self.vocab_mapping,
                                                           device=self.device).items()}
        return out


def collate_eagle3(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pads samples of :class:`Eagle3Dataset` into a batch: ``[B,S,...]`` tensors,
    pads are 0 (False for ``position_mask``), ``attention_mask`` marks real tokens."""
    if not samples:
        raise ValueError("collate_eagle3 got no samples")
    return {name: right_pad([x[name] for x in samples], _PAD.get(name, 0)) for name in samples[0]}


@torch.no_grad()
def rebuild_supervision(batch: dict[str, torch.Tensor], lm_head: LMHead | None, vocab_mapping: Any = None,
                        *, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Turns ``hidden_states [B,S,H]`` into ``logits [B,S,V]`` with ``lm_head`` (zero at
    each row's tail and on pads, as ``generate_batch`` gives), and logits into
    ``target_probs [B,S,Vd] fp32`` + ``position_mask [B,S,1] bool`` when a vocab mapping
    is given. Other fields pass through (moved to ``device`` when given)."""
    from eagle3_target.vocab import compute_target_distribution

    dev = torch.device(device) if device is not None else batch["input_ids"].device
    out = {k: v.to(dev) for k, v in batch.items()}
    if "hidden_states" in out and lm_head is not None:
        hidden = out.pop("hidden_states")
        # Zero tail: positions from each row's last real token on (rows are right-padded).
        out["logits"] = zero_tail(lm_head(hidden), out["attention_mask"].sum(dim=1))
    if vocab_mapping is not None and "logits" in out:
        logits = out.pop("logits")
        probs, pmask = compute_target_distribution(
            logits, vocab_mapping.selected_token_ids, vocab_mapping.selected_token_mask, out["loss_mask"])
        out["target_probs"], out["position_mask"] = probs, pmask
    return out
