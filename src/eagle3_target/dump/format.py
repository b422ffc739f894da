"""The on-disk format of a dump: names, manifests, shard files and their writer.

Owns everything that touches bytes on disk for the dump job (:mod:`.job`), the checker
(:mod:`.verify`) and the reader (:mod:`.reader`).

Layout of a dump folder (worker ``i`` of ``K``; ``K == 1`` drops ``-iiiii-of-KKKKK``)::

    manifest[-iiiii-of-KKKKK].json          config, shards (sha256, rows, counts), summary
    shard[-iiiii-of-KKKKK]-jjjjj.safetensors packed samples of one shard
    lm_head.safetensors                     hidden mode: the LM head that rebuilds logits
    .lock-iiiii-of-KKKKK, .tmp-*            the writer's lock and temporary files

A shard packs its samples along the token axis (``T`` tokens, ``n`` samples):
``input_ids [T] int64`` and ``loss_mask [T] uint8`` (unshifted, as rendered),
``aux_hidden_states [T,3H]`` (unshifted), ``offsets [n+1] int64``, ``row_index [n] int64``
(the global data row of each sample), and by mode, already in the EAGLE-3 alignment
(row ``t`` supervises the prediction made at ``t``; each sample's last row is the zero
tail): ``hidden`` -> ``hidden_states [T,H]`` (final norm), ``logits`` -> ``logits [T,V]``,
``draft`` -> ``target_probs [T,Vd] fp32`` and ``position_mask [T] bool``; with
``--with-prenorm`` also ``final_prenorm [T,H]`` (before the final norm, unshifted). Float fields
keep the target's dtype. The safetensors metadata holds one key, ``eagle3``: a JSON
object with the format, the config hash and the shard's manifest entry (enough to
adopt a shard whose manifest update a kill prevented).

Why shards are serialised here rather than by ``safetensors.torch.save``: ``save``
builds two in-memory copies of every shard before a byte reaches the disk, which held
the writer to about 300 MB/s on the CPU machine; :func:`shard_layout` streams the very
same bytes (a test compares them with ``save``'s) to the file and through sha256 in
one pass. Reading stays with the library (``safe_open``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from eagle3_target.contract import LMHead
from eagle3_target.dump.faults import kill_point
from eagle3_target.dump.host import host_copy
from eagle3_target.dump.modes import MODES
from eagle3_target.wire.st_stream import byte_view, layout_pieces

__all__ = [
    "FORMAT", "LM_HEAD_FILE", "ShardJob", "ShardWriter", "shard_layout", "pack_shard",
    "stream_to_file", "tmp_path", "write_atomic", "json_bytes", "config_sha256", "model_fingerprint",
    "dtype_name", "header_meta", "read_header_meta", "fsync_dir",
    "expected_fields", "manifest_paths", "read_manifest", "save_lm_head", "load_lm_head",
    "sha256_file", "check_shard_file", "folder_lock",
]

FORMAT = "eagle3-dump-v1"
LM_HEAD_FILE = "lm_head.safetensors"


def expected_fields(config: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    """Per-token tensors of a shard of this configuration: name -> (dtype name, width or
    None for 1-D), from the mode table (and ``final_prenorm`` when it was asked for)."""
    return MODES[config["mode"]].expected(config)


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# --------------------------------------------------------------------------- files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: Path, name: str, busy: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``folder/name`` for the block: one writer per
    folder (or per worker of a split job). A second is refused at once with ``busy``
    (a ``ValueError``), before it touches a file. The kernel drops the lock with the
    process, so a killed job never leaves a stale one behind."""
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(busy) from None
    try:
        yield
    finally:
        os.close(fd)


def tmp_path(path: Path, tmp_tag: str = "") -> Path:
    """Where ``path`` is written before its rename: a rerun deletes its worker's
    ``.tmp-{tmp_tag}*`` files, which are never part of the dataset."""
    return path.parent / f".tmp-{tmp_tag}{path.name}"


def write_atomic(path: Path, data: bytes, tmp_tag: str = "") -> None:
    """Writes ``data`` to ``path`` via ``.tmp-`` + fsync + rename + directory fsync."""
    tmp = tmp_path(path, tmp_tag)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk: the old file stays, the partial new one goes
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_paths(path: str | Path) -> list[Path]:
    """The manifests in a dump folder (one per worker)."""
    d = Path(path)
    return sorted(p for p in d.glob("manifest*.json") if p.is_file())


def read_manifest(path: str | Path, fmt: str = FORMAT,
                  hint: str = "a regeneration folder? use a new --out folder") -> dict[str, Any]:
    """The JSON manifest at ``path`` whose ``format`` is ``fmt`` (a dump's by default;
    a regeneration's manifest is read here too); ValueError naming the file when it is
    unreadable or of another format, with ``hint`` saying what to do."""
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != fmt:
        found = m.get("format") if isinstance(m, dict) else None
        what = f"an {found} manifest" if isinstance(found, str) else "no manifest format"
        raise ValueError(f"{path}: not an {fmt} manifest ({what}; {hint})")
    return m


def config_sha256(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def model_fingerprint(path: str) -> str:
    """Hash of config.json and the names and sizes of the weight files (hashing the
    weights themselves would cost minutes on a large model)."""
    d = Path(path)
    h = hashlib.sha256()
    cfg = d / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for p in sorted(d.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def save_lm_head(path: Path, head: LMHead, tmp_tag: str) -> tuple[str, int]:
    """Writes the LM head as safetensors (atomically) and returns ``(sha256, bytes)``.

    Streamed like a shard (one pass to disk and through sha256, from pinned memory when
    the head lives on a GPU), so a dump can write its 1 GB head on a background thread
    while the target runs.
    """
    tensors, scalars = head.to_tensors(scalars="metadata")  # v1: scale and softcap in the header
    parts = {k: [host_copy(v)] for k, v in tensors.items()}
    header, pieces = layout_pieces(parts, header_meta({"format": FORMAT, **scalars}))
    tmp = tmp_path(path, tmp_tag)
    sha, size = stream_to_file(tmp, header, pieces)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return sha, size


def load_lm_head(path: str | Path, device: str | torch.device | None = None) -> LMHead:
    """The LM head a hidden-mode dump stored (``lm_head.safetensors``)."""
    from safetensors import safe_open

    dev = str(device or "cpu")
    with safe_open(str(path), framework="pt", device=dev) as f:
        meta = read_header_meta(f)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} LM head")
    try:
        return LMHead.from_tensors(tensors, meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def header_meta(obj: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata with one key: the library writes its metadata map in hash
    order, so several keys would make the header bytes differ from run to run."""
    return {"eagle3": json.dumps(obj, sort_keys=True)}


def read_header_meta(f: Any) -> dict[str, Any]:
    try:
        return json.loads((f.metadata() or {}).get("eagle3", "{}"))
    except json.JSONDecodeError:
        return {}


def check_shard_file(path: Path, entry: dict[str, Any], hash_it: bool) -> str | None:
    """None when the finished shard at ``path`` matches its manifest entry, else why not."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, manifest says {entry['bytes']}"
    if hash_it and sha256_file(path) != entry["sha256"]:
        return "sha256 mismatch"
    return None


# --------------------------------------------------------------------------- shards


@dataclass
class ShardJob:
    """A finished shard's contents, on its way to the writer thread."""

    index: int
    name: str
    entry: dict[str, Any]
    samples: list[dict[str, torch.Tensor]]
    rows: list[int]
    expected_sha256: str | None = None  # a repair: the hash the manifest recorded


def shard_layout(job: ShardJob, config_sha: str, fields: Sequence[str]) -> tuple[bytes, list[torch.Tensor]]:
    """One shard as safetensors: ``(header bytes, tensor pieces in file order)``.

    Streams what ``safetensors.torch.save`` would build in memory -- the same bytes (a
    test holds us to that) -- without concatenating the samples or serialising a copy,
    so a shard goes to disk and through sha256 in one pass over its tensors.
    """
    lengths = [s["input_ids"].shape[0] for s in job.samples]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    parts: dict[str, list[torch.Tensor]] = {name: [s[name] for s in job.samples] for name in fields}
    parts["offsets"] = [offsets]
    parts["row_index"] = [torch.tensor(job.rows, dtype=torch.int64)]
    meta = {"format": FORMAT, "config_sha256": config_sha, "entry": job.entry}
    return layout_pieces(parts, header_meta(meta))


def stream_to_file(path: Path, header: bytes, pieces: Sequence[torch.Tensor],
                   parallel_from: int = 32 << 20) -> tuple[str, int]:
    """Writes ``header`` then ``pieces`` to ``path`` (fsynced) and returns ``(sha256 hex,
    bytes)``. From ``parallel_from`` bytes on, sha256 runs on a second thread over the
    same memory while this one writes (both release the GIL): a shard then takes the
    longer of the two, not their sum -- sha256 runs at ~1.2 GB/s a thread on the H100
    host, about as fast as its disk."""
    views = [byte_view(p) for p in pieces]
    size = len(header) + sum(v.nbytes for v in views)
    h = hashlib.sha256(header)
    failed: list[BaseException] = []

    def digest() -> None:
        try:
            for v in views:
                h.update(v)
        except BaseException as e:  # re-raised below
            failed.append(e)

    hasher = threading.Thread(target=digest, name="eagle3-sha256") if size >= parallel_from else None
    if hasher is not None:
        hasher.start()
    else:
        digest()
    try:
        with open(path, "wb") as f:
            f.write(header)
            for v in views:
                f.write(v)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: no partial file stays behind (path is a .tmp- name)
        path.unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file; the user needs to know which
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:  # Ctrl-C: the same
        path.unlink(missing_ok=True)
        raise
    finally:
        if hasher is not None:
            hasher.join()
    if failed:
        raise failed[0]
    return h.hexdigest(), size


def pack_shard(job: ShardJob, config_sha: str, fields: Sequence[str]) -> bytes:
    """One shard's file bytes, in memory (for tests and small shards)."""
    header, pieces = shard_layout(job, config_sha, fields)
    return header + b"".join(bytes(byte_view(p)) for p in pieces)


class ShardWriter:
    """Writes shards in the background while the target keeps running.

    ``threads`` workers each write a whole shard under a temporary name (header and
    tensors streamed to disk and through sha256 in one pass, then fsync); one committer
    renames them in index order and records each in the manifest, so the manifest
    always lists a prefix of the shards. At most ``threads`` finished shards wait in
    memory besides the one being committed.
    """

    def __init__(self, out: Path, on_written: Callable[[ShardJob, dict[str, Any]], None],
                 config_sha: str, fields: Sequence[str], tmp_tag: str, threads: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.on_written, self.config_sha = out, on_written, config_sha
        self.fields, self.tmp_tag = list(fields), tmp_tag
        self.error: BaseException | None = None
        self.bytes_written = 0
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="eagle3-shard")
        self._commits: queue.Queue = queue.Queue(maxsize=threads)
        self._thread = threading.Thread(target=self._commit_loop, name="eagle3-shard-commit", daemon=True)
        self._thread.start()

    def _prepare(self, job: ShardJob) -> tuple[Path, str, int]:
        header, pieces = shard_layout(job, self.config_sha, self.fields)
        tmp = tmp_path(self.out / job.name, self.tmp_tag)
        sha, size = stream_to_file(tmp, header, pieces)
        return tmp, sha, size

    def _commit_loop(self) -> None:
        while (item := self._commits.get()) is not None:
            job, fut = item
            try:
                tmp, sha, size = fut.result()
                if self.error is not None:
                    continue
                kill_point("shard_written")
                os.replace(tmp, self.out / job.name)
                fsync_dir(self.out)
                kill_point("shard_renamed")
                self.bytes_written += size
                self.on_written(job, dict(job.entry, file=job.name, bytes=size, sha256=sha))
                kill_point("manifest_written")
            except BaseException as e:  # surfaced to the main thread by put()/close()
                if self.error is None:
                    self.error = e

    def put(self, job: ShardJob) -> None:
        self._check()
        self._commits.put((job, self._pool.submit(self._prepare, job)))

    def close(self) -> None:
        if self._thread.is_alive():
            self._commits.put(None)
            self._thread.join()
            self._pool.shutdown(wait=True)
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing a shard failed: {self.error}") from self.error
