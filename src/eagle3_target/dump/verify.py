"""Checking a dump against its manifests (behind ``eagle3-target verify DIR``).

Owns :func:`verify_dump`: every manifest must account for its worker's rows and shard
files (no unlisted shard, no gap in the row ranges, counts that agree: the rules of
:mod:`.integrity`); every shard it lists is checked for size and sha256, structure
(tensor names, dtypes and shapes, offsets and row indices, the header's entry), token
and supervised-token counts, NaN/Inf, and the mode's invariants; the workers of a split
dump must all be present and agree on their configuration. Exit code 0 when all is sound.
Without the sha256 (``hash_shards=False``) a flipped bit inside tensor data can pass:
structure and counts are checked, the bytes are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eagle3_target.dump.config import shard_file_name
from eagle3_target.dump.format import check_shard_file, expected_fields, manifest_paths, read_manifest
from eagle3_target.dump.integrity import (entry_problem, header_entry_problem, manifest_problems,
                                         shard_structure_problems)

__all__ = ["VerifyReport", "verify_dump"]


@dataclass
class VerifyReport:
    ok: bool
    lines: list[str]
    problems: list[str]


def verify_dump(path: str | Path, *, hash_shards: bool = True) -> VerifyReport:
    """Checks every manifest in ``path`` accounts for its rows and shard files, and
    every shard: file size and sha256 (``hash_shards``), header, dtypes and shapes,
    offsets and row indices, token and supervised-token counts, NaN/Inf, and mode
    invariants (probabilities sum to 1, position_mask within the loss mask). ``ok`` is
    False on any problem or an unfinished dump."""
    from safetensors import safe_open

    d = Path(path)
    lines: list[str] = []
    problems: list[str] = []
    manifests = manifest_paths(d)
    if not manifests:
        return VerifyReport(False, [f"{d}: no manifest*.json"], [f"{d}: not a dump folder"])
    configs = []
    for mpath in manifests:
        try:
            m = read_manifest(mpath)
        except ValueError as e:
            problems.append(str(e))
            continue
        cfg = m["config"]
        configs.append(cfg)
        fields = expected_fields(cfg)
        k, i = cfg["num_shards"], cfg["shard_index"]
        if not m.get("complete"):
            problems.append(f"{mpath.name}: dump not finished (rerun the same dump command)")
        if m.get("lm_head"):
            lh = d / m["lm_head"]["file"]
            why = check_shard_file(lh, m["lm_head"], hash_it=hash_shards)
            if why:
                problems.append(f"{lh.name}: {why}")
        for why in manifest_problems(m, d, mpath.name):
            problems.append(why)
            lines.append(f"FAIL {why}")
        for entry in m["shards"] if isinstance(m.get("shards"), list) else []:
            if entry_problem(entry) is not None or entry["file"] != shard_file_name(k, i, entry["index"]):
                continue  # reported above; nothing to check it against
            name = entry["file"]
            why = check_shard_file(d / name, entry, hash_it=hash_shards)
            errs = [why] if why else []
            if not errs:
                try:
                    with safe_open(str(d / name), framework="pt") as f:
                        errs += shard_structure_problems(f, entry, fields, k, i)
                        if not errs:
                            errs += _check_shard_tensors(f, entry, cfg, fields)
                        if (why := header_entry_problem(f, entry)) is not None:
                            errs.append(why)
                except Exception as e:
                    errs.append(f"unreadable ({e})")
            if errs:
                problems += [f"{name}: {e}" for e in errs]
                lines.append(f"FAIL {name}: {'; '.join(errs)}")
            else:
                lines.append(f"ok   {name}: {entry['num_samples']} samples, {entry['tokens']} tokens")
    if configs:
        base = {k: v for k, v in configs[0].items() if k != "shard_index"}
        if any({k: v for k, v in c.items() if k != "shard_index"} != base for c in configs):
            problems.append("the manifests in this folder come from different configurations")
        k = configs[0]["num_shards"]
        have = sorted(c["shard_index"] for c in configs)
        if have != list(range(k)):
            problems.append(f"workers present {have}, expected all of 0..{k - 1}")
    ok = not problems
    lines.append(f"{'OK' if ok else 'FAILED'}: {d} ({len(manifests)} manifest(s), "
                 f"{sum(1 for x in lines if x.startswith('ok'))} good shard(s), {len(problems)} problem(s))")
    return VerifyReport(ok, lines, problems)


def _check_shard_tensors(f: Any, entry: dict[str, Any], cfg: dict[str, Any],
                         fields: dict[str, tuple[str, int | None]]) -> list[str]:
    """The contents of a structurally sound shard: ids, masks, counts, finite values and
    the mode's invariants."""
    errs: list[str] = []
    offsets = f.get_tensor("offsets")
    ids, lm = f.get_tensor("input_ids"), f.get_tensor("loss_mask")
    if bool(((ids < 0) | (ids >= cfg["vocab_size"])).any()):
        errs.append(f"input_ids outside [0, {cfg['vocab_size']})")
    if bool((lm > 1).any()):
        errs.append("loss_mask holds values other than 0 and 1")
    starts = offsets[:-1]
    sup = int(lm.sum()) - int(lm[starts].sum())  # position 0 of a sample is never a target
    if sup != entry["supervised_tokens"]:
        errs.append(f"{sup} supervised tokens, manifest says {entry['supervised_tokens']}")
    for name, (dt, width) in fields.items():
        if width is None or not dt.startswith(("float", "bfloat")):
            continue
        x = f.get_tensor(name)
        if not bool(torch.isfinite(x).all()):
            errs.append(f"{name} has NaN or Inf")
        if name == "target_probs":
            if bool(((x.sum(-1) - 1).abs() > 1e-3).any()):
                errs.append("target_probs rows do not sum to 1")
    if "position_mask" in fields:
        pm = f.get_tensor("position_mask")
        shifted = torch.zeros_like(lm, dtype=torch.bool)
        shifted[:-1] = lm[1:].bool()
        shifted[offsets[1:] - 1] = False  # each sample's zero tail
        if bool((pm & ~shifted).any()):
            errs.append("position_mask set outside the shifted loss mask")
    return errs
