"""A rerun's repairs: bringing a worker's manifest back to an account of every row and
shard file it owns (the rules of :mod:`.integrity`), then regenerating what is lost.

:func:`plan_repairs` checks the listed shards (size and sha256, or size alone with
``--trust-existing``), restores an entry that disagrees with the header of its intact
file (the header is covered by the recorded sha256; the entry is not), re-adopts an
unlisted shard file whose header continues the dump exactly where it belongs (a kill
between rename and manifest, or an entry lost from the manifest), and records what
must be computed again: damaged shards (their entry says what they must reproduce)
and gaps (rows no intact file accounts for, from one shard boundary to the next).
:func:`regenerate` computes them; batches and shards are cut deterministically from any
shard boundary, so the result is the bytes an uninterrupted run writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from eagle3_target.dump.format import FORMAT, ShardJob, check_shard_file, read_header_meta, sha256_file
from eagle3_target.dump.integrity import ENTRY_FILE_KEYS, entry_problem, worker_shard_files
from eagle3_target.dump.produce import ShardProducer

__all__ = ["Gap", "RepairPlan", "plan_repairs", "regenerate"]


@dataclass(frozen=True)
class Gap:
    """Shards ``index..`` to compute from ``first_row``/``first_sample`` on, up to the data
    row ``end_row`` where the next intact shard (shard ``end_index``) or the tail starts."""

    index: int
    first_row: int
    first_sample: int
    end_row: int
    end_index: int | None  # None: the gap runs to the tail of a finished dump


@dataclass
class RepairPlan:
    damaged: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    adopted: int = 0
    restored: int = 0


def _refuse(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: {why}; it cannot be repaired from what is on disk: restore the manifest "
                      f"or dump into a new --out folder")


def _file_entry(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The entry a shard file's header carries and its config hash (None, "" if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = read_header_meta(f)
    except Exception:  # not a readable safetensors file: not a finished shard of ours
        return None, ""
    entry = meta.get("entry")
    if meta.get("format") != FORMAT or not isinstance(entry, dict):
        return None, ""
    return entry, str(meta.get("config_sha256"))


def plan_repairs(d: ShardProducer, *, hash_it: bool, log: Callable[[str], None]) -> RepairPlan:
    """Rebuilds ``d.manifest["shards"]`` from the intact listed and adoptable unlisted
    shards (saving it when it changed) and returns what is left to compute. Raises
    ValueError, changing nothing, on a manifest that no file on disk can correct."""
    cfg, out, m = d.cfg, Path(d.cfg.out), d.manifest
    mpath = cfg.manifest_path()
    before = json.dumps(m, sort_keys=True)
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise _refuse(mpath, "it has no list of shards")
    by_index: dict[int, dict[str, Any]] = {}
    for j, e in enumerate(shards):
        if (why := entry_problem(e)) is not None:
            raise _refuse(mpath, f"shard entry {j} {why}")
        if e["file"] != cfg.shard_name(e["index"]) or e["index"] in by_index:
            raise _refuse(mpath, f"shard entry {j} ({e['file']}) is not shard {e['index']} or lists it twice")
        by_index[e["index"]] = e
    tail = m.get("tail") if isinstance(m.get("tail"), dict) else {}
    if m.get("complete") and not (isinstance(tail.get("rows"), list) and tail["rows"]
                                  and isinstance(tail["rows"][0], int) and tail["rows"][0] >= 0):
        raise _refuse(mpath, "it is marked complete but says nothing of the rows after its last sample")
    plan = RepairPlan()
    for e in list(by_index.values()):
        if (why := check_shard_file(out / e["file"], e, hash_it=hash_it)) is not None:
            log(f"shard {e['file']}: {why}; regenerating it")
            plan.damaged.append(e)
            continue
        head, _ = _file_entry(out / e["file"])
        mine = {k: v for k, v in e.items() if k not in ENTRY_FILE_KEYS}
        if head is not None and head != mine and entry_problem(dict(head, file=e["file"], bytes=0, sha256="")) is None \
                and head["index"] == e["index"]:
            diff = sorted(k for k in head.keys() | mine.keys() if head.get(k) != mine.get(k))
            log(f"shard {e['file']}: its manifest entry differed from the file's own header in {', '.join(diff)} "
                f"(the file matches its recorded hash); restored the entry from the header")
            e.update(head)
            plan.restored += 1

    files = worker_shard_files(out, cfg.num_shards, cfg.shard_index)
    kept: list[dict[str, Any]] = []
    pos = {"index": 0, "row": 0, "sample": 0}

    def advance(e: dict[str, Any]) -> None:
        kept.append(e)
        pos.update(index=e["index"] + 1, row=e["rows"][1], sample=e["first_sample"] + e["num_samples"])

    def adopt(limit: int | None, end_row: int | None) -> None:
        """Adopts unlisted files from ``pos`` on while each header continues the dump."""
        while (j := pos["index"]) in files and j not in by_index and (limit is None or j < limit):
            path = out / files[j]
            head, sha = _file_entry(path)
            fits = (head is not None and sha == d.config_sha
                    and entry_problem(dict(head, file=path.name, bytes=0, sha256="")) is None
                    and head["index"] == j and head["first_sample"] == pos["sample"] and head["rows"][0] == pos["row"]
                    and (end_row is None or head["rows"][1] <= end_row))
            if not fits:
                return
            advance(dict(head, file=path.name, bytes=path.stat().st_size, sha256=sha256_file(path)))
            plan.adopted += 1

    for e in sorted(by_index.values(), key=lambda x: x["index"]):
        adopt(e["index"], e["rows"][0])
        if (pos["index"], pos["row"], pos["sample"]) != (e["index"], e["rows"][0], e["first_sample"]):
            if pos["index"] >= e["index"] or pos["row"] >= e["rows"][0] or pos["sample"] >= e["first_sample"]:
                raise _refuse(mpath, f"{e['file']} starts at row {e['rows'][0]}, sample {e['first_sample']}, "
                                     f"where the shards before it end at row {pos['row']}, sample {pos['sample']}")
            plan.gaps.append(Gap(pos["index"], pos["row"], pos["sample"], e["rows"][0], e["index"]))
            log(f"{mpath.name}: no intact shard holds rows [{pos['row']}, {e['rows'][0]}) (shards "
                f"{pos['index']}..{e['index'] - 1}); computing them again")
        advance(e)
    if m.get("complete"):
        tail_row = m["tail"]["rows"][0]
        adopt(None, tail_row)
        if pos["row"] > tail_row:
            raise _refuse(mpath, f"its shards end at row {pos['row']}, after its tail's start {tail_row}")
        if pos["row"] < tail_row:
            plan.gaps.append(Gap(pos["index"], pos["row"], pos["sample"], tail_row, None))
            log(f"{mpath.name}: no intact shard holds rows [{pos['row']}, {tail_row}); computing them again")
    else:
        adopt(None, None)
    kept_index = {e["index"] for e in kept}
    for j, name in sorted(files.items()):
        if j in kept_index:
            continue
        (out / name).unlink()  # neither listed nor adoptable: never part of the dataset
        if not any(g.index <= j and (g.end_index is None or j < g.end_index) for g in plan.gaps):
            log(f"removed {name}: not listed in {mpath.name}, and its header does not continue the dump")
    m["shards"] = kept
    if json.dumps(m, sort_keys=True) != before:
        with d.lock:
            d.save_manifest()
    return plan


def regenerate(d: ShardProducer, plan: RepairPlan, put: Callable[[ShardJob], None]) -> int:
    """Computes the damaged shards and the gaps of ``plan`` and hands each shard to
    ``put`` (the writer); returns how many. RuntimeError when the data no longer gives
    what the manifest recorded."""
    n = 0
    for entry in plan.damaged:
        gen = d.produce(entry["rows"][0], entry["first_sample"], entry["index"])
        try:
            job = next(gen)
        finally:
            gen.close()
        want = {k: entry[k] for k in ("rows", "num_samples", "tokens", "first_sample")}
        if {k: job.entry[k] for k in want} != want:
            raise RuntimeError(f"cannot repair {entry['file']}: regenerating rows {entry['rows']} "
                               f"gave {job.entry}, the manifest says {want}")
        job.expected_sha256 = entry["sha256"]
        put(job)
        n += 1
    for g in plan.gaps:
        gen = d.produce(g.first_row, g.first_sample, g.index)
        closed = False
        try:
            for job in gen:
                end = job.entry["rows"][1]
                if end > g.end_row or (g.end_index is not None and job.index >= g.end_index):
                    break
                put(job)
                n += 1
                if end == g.end_row:
                    closed = g.end_index is None or job.index == g.end_index - 1
                    break
        finally:
            gen.close()
        if not closed:
            raise RuntimeError(f"cannot repair rows [{g.first_row}, {g.end_row}) of {d.cfg.manifest_path().name}: "
                               f"computing them again does not end at a shard boundary there")
    return n
