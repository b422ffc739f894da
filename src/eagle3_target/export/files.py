"""The files of one export, written so that a killed export never costs a rerun or a
silent error: :class:`ExportFiles` and :func:`verify_export`.

Every file a trainer reads is written under a ``.tmp-`` name (streamed to disk and
through sha256 in one pass, fsynced), then renamed into place. The names, sizes and
hashes are recorded in our own sidecar, ``eagle3-export.json``, beside the trainer's
files, never inside them: neither trainer's reader lists it (NeMo's reader matches
``shard-NNNNNN.safetensors``, speculators' ``hs_N.safetensors``), and ``.tmp-`` names
match neither. The sidecar is flushed every :data:`FLUSH_EVERY` files and at the end, so
a rerun after a kill re-hashes what it recorded and rewrites the rest; the file the
trainer opens first (NeMo's ``manifest.json``, speculators' ``state.json``) is written
last, so a trainer never opens an export that is not complete. Every byte is a function
of the dump and the export's settings: a rerun after a kill gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from eagle3_target.dump.faults import kill_point
from eagle3_target.dump.format import folder_lock, fsync_dir, json_bytes, sha256_file, stream_to_file, tmp_path
from eagle3_target.wire.st_stream import layout_pieces

__all__ = ["SIDECAR", "EXPORT_FORMAT", "FLUSH_EVERY", "ExportFiles", "ExportSummary", "ExportReport",
           "verify_export", "dump_identity"]

SIDECAR = "eagle3-export.json"
EXPORT_FORMAT = "eagle3-export-v1"
FLUSH_EVERY = 256
"""Files written between two sidecar updates: a kill costs at most this many rewrites,
and the sidecar is not rewritten once per file (a dataset has one file per sample)."""
_TMP_TAG = "export-"


def dump_identity(dump_dir: str | Path) -> list[dict[str, Any]]:
    """What identifies a dump's contents: each manifest's name and sha256 (a manifest
    lists every shard's sha256)."""
    from eagle3_target.dump.format import manifest_paths

    return [{"name": p.name, "sha256": sha256_file(p)} for p in manifest_paths(dump_dir)]


class ExportFiles:
    """The files of one export folder and the sidecar that records them.

    Args:
        out: the export folder (created).
        to: the format's name (``nemo``, ``speculators``).
        source: what the export is made from (:func:`dump_identity`).
        settings: every setting that shapes the bytes; a rerun with other settings, or
            over another dump, is refused.
        trust_existing: check recorded files by size only on a rerun (no re-hash).
    """

    def __init__(self, out: str | Path, *, to: str, source: Any, settings: dict[str, Any],
                 trust_existing: bool = False):
        self.out = Path(out)
        self.record = {"format": EXPORT_FORMAT, "to": to, "source": source, "settings": settings,
                       "files": {}, "complete": False}
        self.trust_existing = trust_existing
        self.rewritten: list[str] = []
        self.written = 0
        self.bytes_written = 0
        self._since_flush = 0
        side = self.out / SIDECAR
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} exists and is not a folder")
        if side.is_file():
            try:
                old = json.loads(side.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{side}: unreadable ({e}); use a new --out folder") from None
            mine = {k: self.record[k] for k in ("format", "to", "source", "settings")}
            theirs = {k: old.get(k) for k in mine}
            if theirs != mine:
                diff = sorted(k for k in mine if theirs[k] != mine[k])
                raise ValueError(f"{self.out} holds an export with a different {', '.join(diff)}; rerun "
                                 f"with the original settings or use a new --out folder")
            self.record["files"] = dict(old.get("files") or {})
            self.record["complete"] = bool(old.get("complete"))
        elif self.out.is_dir() and any(p.name != ".lock" for p in self.out.iterdir()):
            raise ValueError(f"--out {self.out} is not empty and holds no {SIDECAR}: its files cannot be "
                             f"checked against this export; use an empty folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(folder_lock(self.out, ".lock", f"another export is writing {self.out}"))
        for tmp in sorted(self.out.rglob(f".tmp-{_TMP_TAG}*")):
            # a killed run's unfinished files (and the dataset's staging folder): never part of the export
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        self.flush()  # from the first file on, a rerun finds what this export is

    # -- files ----------------------------------------------------------------------
    def done(self, name: str) -> bool:
        """Whether ``name`` was recorded and is still intact (a damaged or missing file is
        dropped from the record, to be rewritten)."""
        rec = self.record["files"].get(name)
        if rec is None:
            return False
        path = self.out / name
        ok = path.is_file() and path.stat().st_size == rec["bytes"] and (
            self.trust_existing or sha256_file(path) == rec["sha256"])
        if not ok:
            del self.record["files"][name]
            self.record["complete"] = False
            self.rewritten.append(name)
        return ok

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor | Sequence[torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> None:
        """One safetensors file (the bytes ``safetensors.torch.save`` gives for these
        tensors), streamed and hashed in one pass. A value may be a list of pieces, the
        tensor being their concatenation along dim 0 (never built in memory)."""
        parts = {k: [p.detach().cpu().contiguous() for p in (v if isinstance(v, (list, tuple)) else [v])]
                 for k, v in tensors.items()}
        header, pieces = layout_pieces(parts, metadata)
        self._commit(name, lambda tmp: stream_to_file(tmp, header, pieces))

    def write_bytes(self, name: str, data: bytes) -> None:
        def write(tmp: Path) -> tuple[str, int]:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return hashlib.sha256(data).hexdigest(), len(data)

        self._commit(name, write)

    def adopt(self, name: str) -> None:
        """Records a file a library wrote into place (``datasets``' ``save_to_disk``)."""
        path = self.out / name
        kill_point("export_file_renamed")
        self.record["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        self._tick()

    def _commit(self, name: str, write: Any) -> None:
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(path, _TMP_TAG)
        sha, size = write(tmp)
        kill_point("export_file_written")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        kill_point("export_file_renamed")
        self.record["files"][name] = {"bytes": size, "sha256": sha}
        self.written += 1
        self.bytes_written += size
        self._tick()

    def _tick(self) -> None:
        self._since_flush += 1
        if self._since_flush >= FLUSH_EVERY:
            self.flush()

    # -- the sidecar ----------------------------------------------------------------
    def flush(self) -> None:
        self._since_flush = 0
        path = self.out / SIDECAR
        tmp = tmp_path(path, _TMP_TAG)
        tmp.write_bytes(json_bytes(self.record))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.out)

    def finish(self) -> None:
        self.record["complete"] = True
        self.flush()

    def close(self) -> None:
        """Releases the folder's lock. Idempotent."""
        self._lock.close()

    def summary(self, samples: int, tokens: int, seconds: float) -> "ExportSummary":
        """What this export holds (every recorded file) and what this run wrote."""
        total = sum(f["bytes"] for f in self.record["files"].values())
        return ExportSummary(str(self.out), self.record["to"], samples, tokens, total, self.written,
                             self.bytes_written, seconds, self.rewritten)


@dataclass
class ExportSummary:
    """What an export wrote: samples, tokens, the bytes of the whole export, the bytes
    and seconds of this run."""

    out: str
    to: str
    samples: int
    tokens: int
    bytes: int
    run_files: int
    run_bytes: int
    run_seconds: float
    rewritten: list[str]

    def lines(self) -> list[str]:
        rate = self.run_bytes / self.run_seconds / 1e6 if self.run_seconds > 0 else 0.0
        out = [f"{self.to} export in {self.out}: {self.samples} samples, {self.tokens} tokens, "
               f"{self.bytes / 1e6:.1f} MB ({self.bytes / max(1, self.tokens):.0f} bytes/token)",
               f"this run: {self.run_files} files, {self.run_bytes / 1e6:.1f} MB in {self.run_seconds:.1f} s "
               f"({rate:.0f} MB/s)"]
        if self.rewritten:
            out.append(f"rewrote {len(self.rewritten)} damaged or missing files: {', '.join(self.rewritten[:5])}")
        return out


class ExportReport:
    """What :func:`verify_export` found: ``ok``, a line per check, the problems."""

    def __init__(self, ok: bool, lines: Sequence[str], problems: Sequence[str]):
        self.ok, self.lines, self.problems = ok, list(lines), list(problems)


def verify_export(path: str | Path, *, hash_files: bool = True) -> ExportReport:
    """Checks every file the sidecar records (size and sha256) and that the export is
    complete. Behind ``eagle3-target verify DIR`` for an export folder."""
    d = Path(path)
    side = d / SIDECAR
    try:
        rec = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return ExportReport(False, [], [f"{side}: unreadable ({e})"])
    problems = []
    if rec.get("format") != EXPORT_FORMAT:
        problems.append(f"{side}: not an {EXPORT_FORMAT} sidecar")
    if not rec.get("complete"):
        problems.append("export not finished (rerun the same export command)")
    files = rec.get("files") or {}
    for name, f in sorted(files.items()):
        p = d / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{name}: {p.stat().st_size} bytes, the sidecar says {f['bytes']}")
        elif hash_files and sha256_file(p) != f["sha256"]:
            problems.append(f"{name}: sha256 mismatch")
    total = sum(f["bytes"] for f in files.values())
    lines = [f"{d}: {rec.get('to')} export, {len(files)} files, {total / 1e6:.1f} MB"
             + ("" if hash_files else " (sizes only)")]
    return ExportReport(not problems, lines, problems)
