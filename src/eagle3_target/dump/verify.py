"""Checking a dump against its manifests (behind ``eagle3-target verify DIR``).

Owns :func:`verify_dump`: every shard of every worker's manifest is checked for size
and sha256, header, tensor names, dtypes and shapes, offsets and row indices, token and
supervised-token counts, NaN/Inf, and the mode's invariants; the workers of a split dump
must all be present and agree on their configuration. Exit code 0 when all is sound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eagle3_target.dump.format import check_shard_file, expected_fields, manifest_paths, read_manifest

__all__ = ["VerifyReport", "verify_dump"]


@dataclass
class VerifyReport:
    ok: bool
    lines: list[str]
    problems: list[str]


def verify_dump(path: str | Path, *, hash_shards: bool = True) -> VerifyReport:
    """Checks every shard of every manifest in ``path``: file size and sha256, header,
    dtypes and shapes, offsets and row indices, token and supervised-token counts,
    NaN/Inf, and mode invariants (probabilities sum to 1, position_mask within the
    loss mask). ``ok`` is False on any problem or an unfinished dump."""
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
        next_sample, next_row = 0, 0
        for entry in m["shards"]:
            name = entry["file"]
            why = check_shard_file(d / name, entry, hash_it=hash_shards)
            errs = [why] if why else []
            if not errs:
                try:
                    with safe_open(str(d / name), framework="pt") as f:
                        errs += _check_shard_tensors(f, entry, cfg, fields, k, i)
                except Exception as e:
                    errs.append(f"unreadable ({e})")
            if entry["first_sample"] != next_sample or entry["rows"][0] != next_row:
                errs.append(f"does not follow the previous shard (first sample {entry['first_sample']}, "
                            f"expected {next_sample}; first row {entry['rows'][0]}, expected {next_row})")
            next_sample = entry["first_sample"] + entry["num_samples"]
            next_row = entry["rows"][1]
            if errs:
                problems += [f"{name}: {e}" for e in errs]
                lines.append(f"FAIL {name}: {'; '.join(errs)}")
            else:
                lines.append(f"ok   {name}: {entry['num_samples']} samples, {entry['tokens']} tokens")
        listed = {e["file"] for e in m["shards"]}
        tag = "" if k == 1 else f"-{i:05d}-of-{k:05d}"
        for extra in sorted(p.name for p in d.glob(f"shard{tag}-*.safetensors") if p.name not in listed):
            lines.append(f"note {extra}: not in {mpath.name} (a rerun adopts or replaces it)")
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
                         fields: dict[str, tuple[str, int | None]], k: int, i: int) -> list[str]:
    errs: list[str] = []
    keys = set(f.keys())
    want = set(fields) | {"offsets", "row_index"}
    if keys != want:
        return [f"tensors {sorted(keys)}, expected {sorted(want)}"]
    n, t_total = entry["num_samples"], entry["tokens"]
    offsets, rows = f.get_tensor("offsets"), f.get_tensor("row_index")
    if tuple(offsets.shape) != (n + 1,) or tuple(rows.shape) != (n,):
        return [f"offsets {tuple(offsets.shape)} / row_index {tuple(rows.shape)} for {n} samples"]
    if int(offsets[0]) != 0 or int(offsets[-1]) != t_total or bool((offsets[1:] <= offsets[:-1]).any()):
        errs.append(f"offsets do not split {t_total} tokens into {n} non-empty samples")
    r0, r1 = entry["rows"]
    if n and (bool((rows[1:] <= rows[:-1]).any()) or int(rows[0]) < r0 or int(rows[-1]) >= r1
              or bool((rows % k != i).any())):
        errs.append(f"row_index not increasing within rows [{r0}, {r1}) of worker {i} of {k}")
    for name, (dt, width) in fields.items():
        meta = f.get_slice(name)
        shape = tuple(meta.get_shape())
        want_shape = (t_total,) if width is None else (t_total, width)
        got_dt = str(meta.get_dtype())
        want_dt = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
                   "uint8": "U8", "bool": "BOOL"}[dt]
        if shape != want_shape or got_dt != want_dt:
            errs.append(f"{name} is {shape} {got_dt}, expected {want_shape} {want_dt}")
    if errs:
        return errs
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
