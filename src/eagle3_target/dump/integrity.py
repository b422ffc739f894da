"""What makes a dump's manifest and shards trustworthy: the one set of accounting and
structure rules that ``verify`` (:mod:`.verify`), the reader (:mod:`.reader`) and a
rerun (:mod:`.repair`) all apply.

Accounting (:func:`manifest_problems`, no shard read): a worker's manifest lists its
shards ``0..n-1`` in order under their own names, each starting at the data row and
sample where the previous one ended; a finished dump's tail starts where the last shard
ends and its summary equals the sums over the shards; and every shard file of the
worker in the folder is listed. A deleted entry otherwise went unnoticed: the reader
served the remaining samples at shifted indices.

Structure (:func:`shard_structure_problems`, headers and two small tensors): the
tensors a shard holds and their shapes and dtypes, ``offsets`` starting at 0, rising
strictly and ending at the token count every per-token tensor has, ``row_index`` rising
strictly (so unique) within the entry's rows and owned by the worker; and
(:func:`header_entry_problem`) the entry the shard's header carries equal to the
manifest's. A duplicated ``row_index`` otherwise
reordered samples silently. Bit flips inside tensor data are the sha256's to find.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from eagle3_target.dump.config import shard_file_name, worker_tag
from eagle3_target.dump.format import read_header_meta

__all__ = ["ENTRY_FILE_KEYS", "entry_problem", "header_entry", "worker_shard_files", "manifest_problems",
           "shard_structure_problems", "header_entry_problem"]

ENTRY_FILE_KEYS = ("file", "bytes", "sha256")
"""Keys of a manifest's shard entry that describe the file (the rest is in its header)."""

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "uint8": "U8", "bool": "BOOL"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def entry_problem(e: Any) -> str | None:
    """None when ``e`` has the shape of a shard entry, else what is wrong with it."""
    if not isinstance(e, dict):
        return f"is a {type(e).__name__}, not an object"
    for key in ("index", "first_sample", "num_samples", "tokens", "supervised_tokens", "bytes"):
        if not _is_int(e.get(key)) or e[key] < 0:
            return f"has {key} {e.get(key)!r}, not a non-negative integer"
    rows = e.get("rows")
    if not (isinstance(rows, list) and len(rows) == 2 and all(_is_int(r) for r in rows) and 0 <= rows[0] < rows[1]):
        return f"has rows {rows!r}, not [first, end) with first < end"
    if not isinstance(e.get("file"), str) or not isinstance(e.get("sha256"), str):
        return "has no file name or sha256"
    return None


def header_entry(f: Any) -> dict[str, Any] | None:
    """The manifest entry a shard's header carries (``safe_open`` handle), or None."""
    entry = read_header_meta(f).get("entry")
    return entry if isinstance(entry, dict) else None


def worker_shard_files(folder: Path, num_shards: int, shard_index: int) -> dict[int, str]:
    """The shard files of one worker in ``folder``, by shard number."""
    pat = re.compile(rf"shard{re.escape(worker_tag(num_shards, shard_index))}-(\d{{5,}})\.safetensors")
    found = {}
    for p in Path(folder).iterdir():
        if (m := pat.fullmatch(p.name)) and p.is_file():
            found[int(m.group(1))] = p.name
    return found


def manifest_problems(manifest: dict[str, Any], folder: Path, name: str, *,
                      unlisted_ok: bool = False) -> list[str]:
    """Where ``manifest`` (read from ``folder/name``) fails to account for its worker's
    rows and shard files (see the module docstring); ``unlisted_ok`` passes over shard
    files it does not list (a dump still being written)."""
    from eagle3_target.dump.summary import summary_json

    cfg = manifest.get("config") or {}
    k, i = cfg.get("num_shards", 1), cfg.get("shard_index", 0)
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return [f"{name}: has no list of shards"]
    problems: list[str] = []
    row, sample = 0, 0
    for j, e in enumerate(shards):
        if (why := entry_problem(e)) is not None:
            return problems + [f"{name}: shard entry {j} {why}"]
        want = shard_file_name(k, i, j)
        if e["index"] != j or e["file"] != want:
            problems.append(f"{name}: entry {j} is shard {e['index']} ({e['file']}), expected shard {j} ({want}): "
                            f"an entry is missing or out of order")
        elif e["first_sample"] != sample or e["rows"][0] != row:
            problems.append(f"{name}: {e['file']} starts at sample {e['first_sample']}, row {e['rows'][0]}, "
                            f"but the previous shard ends at sample {sample}, row {row}: samples are unaccounted for")
        row, sample = e["rows"][1], e["first_sample"] + e["num_samples"]
    if manifest.get("complete"):
        tail = manifest.get("tail")
        if not isinstance(tail, dict) or not isinstance(tail.get("rows"), list) or tail["rows"][0] != row:
            start = tail["rows"][0] if isinstance(tail, dict) and isinstance(tail.get("rows"), list) else None
            problems.append(f"{name}: the shards end at row {row} but the rows after the last sample start "
                            f"at {start}: shards are missing from the manifest")
        elif not problems and manifest.get("summary") != summary_json(manifest):
            problems.append(f"{name}: its summary disagrees with its shards (samples, tokens or bytes)")
    if not unlisted_ok:
        listed = {e.get("file") for e in shards if isinstance(e, dict)}
        for _, fname in sorted(worker_shard_files(folder, k, i).items()):
            if fname not in listed:
                problems.append(f"{fname}: a shard file that {name} does not list (rerun the same dump "
                                f"command: it checks the file and lists it, or recomputes its rows)")
    return problems


def shard_structure_problems(f: Any, entry: dict[str, Any], fields: dict[str, tuple[str, int | None]],
                             num_shards: int, shard_index: int) -> list[str]:
    """Where the shard open as ``f`` (``safe_open``) differs from the structure its
    manifest entry and the mode's ``fields`` (name -> (dtype, width or None)) promise."""
    keys = set(f.keys())
    want = set(fields) | {"offsets", "row_index"}
    if keys != want:
        return [f"tensors {sorted(keys)}, expected {sorted(want)}"]
    n, t_total = entry["num_samples"], entry["tokens"]
    offsets, rows = f.get_tensor("offsets"), f.get_tensor("row_index")
    if tuple(offsets.shape) != (n + 1,) or tuple(rows.shape) != (n,):
        return [f"offsets {tuple(offsets.shape)} / row_index {tuple(rows.shape)} for {n} samples"]
    errs: list[str] = []
    if int(offsets[0]) != 0 or int(offsets[-1]) != t_total or bool((offsets[1:] <= offsets[:-1]).any()):
        errs.append(f"offsets do not split {t_total} tokens into {n} non-empty samples")
    r0, r1 = entry["rows"]
    if n and (bool((rows[1:] <= rows[:-1]).any()) or int(rows[0]) < r0 or int(rows[-1]) >= r1
              or bool((rows % num_shards != shard_index).any())):
        errs.append(f"row_index not strictly increasing within rows [{r0}, {r1}) of worker {shard_index} "
                    f"of {num_shards} (a row listed twice or out of order)")
    for name, (dt, width) in fields.items():
        meta = f.get_slice(name)
        shape = tuple(meta.get_shape())
        want_shape = (t_total,) if width is None else (t_total, width)
        got_dt, want_dt = str(meta.get_dtype()), _ST_DTYPES[dt]
        if shape != want_shape or got_dt != want_dt:
            errs.append(f"{name} is {shape} {got_dt}, expected {want_shape} {want_dt}")
    return errs


def header_entry_problem(f: Any, entry: dict[str, Any]) -> str | None:
    """None when the entry in the header of the shard open as ``f`` equals its manifest
    ``entry`` (less the file's name, size and hash), else where they differ."""
    head = header_entry(f) or {}
    mine = {key: v for key, v in entry.items() if key not in ENTRY_FILE_KEYS}
    if head == mine:
        return None
    diff = sorted(key for key in head.keys() | mine.keys() if head.get(key) != mine.get(key))
    return f"its header's entry differs from the manifest's in {', '.join(diff)}"
