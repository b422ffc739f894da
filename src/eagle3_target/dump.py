"""The offline dump: chat data -> sharded safetensors of EAGLE-3 supervision, written so
that a killed job never costs a rerun or a silent error.

Owns the on-disk format (:data:`FORMAT`), the writer (:func:`run_dump`), the checker
(:func:`verify_dump`) and the ``dump``/``verify`` subcommands. The reader is
:mod:`eagle3_target.reader`.

Layout of ``OUT`` (worker ``i`` of ``K``; ``K == 1`` drops the ``-iiiii-of-KKKKK`` part)::

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
``draft`` -> ``target_probs [T,Vd] fp32`` and ``position_mask [T] bool``. Float fields
keep the target's dtype. Each sample holds exactly what ``generate_batch`` gives for
that sample alone (a batch of one).

Guarantees, and how:

- atomic: a shard is serialised in memory, hashed, written under ``.tmp-`` and fsynced,
  then renamed; the manifest (itself written by temp + rename) lists it only after the
  rename. A shard on disk that the manifest does not list yet (a kill between rename
  and manifest) is adopted on the next run after its header is checked, not rewritten.
- resumable: the manifest's last shard says which data row comes next; a rerun of the
  same command continues there. Every finished shard is re-hashed first
  (``--trust-existing`` skips that); a damaged one is regenerated from its row range.
- deterministic: samples keep data order, batches are cut greedily by
  ``--batch-tokens`` and shards by ``--shard-size-mb`` at batch boundaries, so the
  batch that starts after any shard is the same in every run; nothing run-dependent
  (times, paths of temporary files) is stored. Interrupted or not, the bytes match.
- split: ``--num-shards K --shard-index i`` takes the rows ``r`` with ``r % K == i``;
  workers share nothing and write distinct files, so they can run on several machines
  and their outputs be copied into one folder.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import queue
import signal
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from eagle3_target.contract import Eagle3TargetBatch, LMHead
from eagle3_target.data.chat import (
    MALFORMED,
    ZERO_SUPERVISION,
    ChatEncoder,
    DataReport,
    Sample,
    Skipped,
    check_data_files,
    count_rows,
    iter_samples,
    sample_data_path,
    scan,
)

__all__ = [
    "FORMAT",
    "MODES",
    "DumpConfig",
    "DumpSummary",
    "TargetSource",
    "run_dump",
    "verify_dump",
    "VerifyReport",
    "manifest_paths",
    "read_manifest",
    "load_lm_head",
    "register",
]

FORMAT = "eagle3-dump-v1"
LM_HEAD_FILE = "lm_head.safetensors"
KILL_ENV = "EAGLE3_TARGET_DUMP_KILL_AT"


class TargetSource(Protocol):
    """What the dump needs from a target: :class:`~eagle3_target.Eagle3TargetModel`
    in process, or ``eagle3_target.client.RemoteTarget`` over the network."""

    aux_layer_ids: list[int]

    def generate_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       loss_mask: torch.Tensor) -> Eagle3TargetBatch: ...

    def generate_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def lm_head(self) -> LMHead: ...

    def close(self) -> None: ...

    # Optional: ``hidden_size``, ``vocab_size``, ``dtype`` (probed with a two-token forward
    # when absent) and ``set_vocab_mapping(mapping)`` (then ``generate_batch`` may return
    # ``target_probs``/``position_mask`` instead of ``logits`` in draft mode).


# --------------------------------------------------------------------------- config


@dataclass
class DumpConfig:
    """One dump job (what the ``dump`` subcommand's flags fill in)."""

    out: str
    """Output folder (created)."""
    data: list[str] = field(default_factory=lambda: [str(sample_data_path())])
    """JSONL/Parquet chat files, read in this order (default: the bundled sample chats)."""
    mode: str = "hidden"
    """``hidden`` (aux + final hidden), ``draft`` (aux + draft-vocab probs), ``logits``."""
    model: str | None = None
    """Local model folder (default: the built-in tiny model). With ``server``, only its tokenizer is used."""
    engine: str = "hf"
    server: list[str] | None = None
    """Server URLs: run the target remotely through ``eagle3_target.client.RemoteTarget``."""
    tokenizer: str | None = None
    """Tokenizer folder when it differs from ``model``."""
    device: str | None = None
    dtype: str | None = None
    aux_layer_ids: list[int] | None = None
    vocab: str | None = None
    """Draft-vocab mapping (``eagle3-target vocab``); required for ``draft`` mode."""
    max_length: int | None = 2048
    mask_reasoning: bool = False
    batch_tokens: int = 8192
    """Padded tokens per target forward (rows x longest row); a longer row runs alone."""
    shard_size_mb: float = 256.0
    num_shards: int = 1
    shard_index: int = 0
    strict: bool = False
    trust_existing: bool = False
    """Skip re-hashing finished shards on a rerun (checks sizes only)."""
    progress: bool | None = None
    """Progress bar on stderr; None shows it when stderr is a terminal."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if MODES[self.mode].needs_vocab and not self.vocab:
            raise ValueError(f"mode {self.mode!r} needs --vocab mapping.safetensors (see `eagle3-target vocab`)")
        for name in ("batch_tokens", "num_shards"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.shard_size_mb > 0:
            raise ValueError(f"shard_size_mb must be positive, got {self.shard_size_mb!r}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.server and self.engine != "hf":
            raise ValueError("--server and --engine are exclusive: the server runs its own engine")
        if isinstance(self.data, str):
            self.data = [self.data]

    @property
    def worker_tag(self) -> str:
        return "" if self.num_shards == 1 else f"-{self.shard_index:05d}-of-{self.num_shards:05d}"

    def manifest_path(self) -> Path:
        return Path(self.out) / f"manifest{self.worker_tag}.json"

    def shard_name(self, j: int) -> str:
        return f"shard{self.worker_tag}-{j:05d}.safetensors"

    def owns(self, row: int) -> bool:
        return row % self.num_shards == self.shard_index


# --------------------------------------------------------------------------- modes


def _zero_tails(t: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Zeroes rows ``L-1..`` of each sample (``t [B,S,...]``): what a batch of one gives
    at its last position (the shift's zero tail), instead of values computed from pads."""
    for r, n in enumerate(lengths):
        t[r, n - 1:] = 0
    return t


def _compute_hidden(source: TargetSource, ids, attn, lmask, lengths, mapping) -> dict[str, torch.Tensor]:
    aux, hidden = source.generate_hidden(ids, attn, lmask)
    return {"aux_hidden_states": aux, "hidden_states": _zero_tails(hidden, lengths)}


def _compute_logits(source: TargetSource, ids, attn, lmask, lengths, mapping) -> dict[str, torch.Tensor]:
    batch = source.generate_batch(ids, attn, lmask)
    if batch.logits is None:
        raise RuntimeError("the target returned no logits (is a draft vocab mapping set on the server?)")
    return {"aux_hidden_states": batch.aux_hidden_states, "logits": _zero_tails(batch.logits, lengths)}


def _compute_draft(source: TargetSource, ids, attn, lmask, lengths, mapping) -> dict[str, torch.Tensor]:
    from eagle3_target.vocab import compute_target_distribution

    batch = source.generate_batch(ids, attn, lmask)
    if batch.logits is not None:
        logits = _zero_tails(batch.logits, lengths)
        probs, pmask = compute_target_distribution(
            logits, mapping.selected_token_ids, mapping.selected_token_mask, batch.loss_mask)
    else:  # the server projected onto the draft vocab already; fix its tails the same way
        probs, pmask = batch.target_probs.float(), batch.position_mask
        uniform = torch.softmax(torch.zeros(probs.shape[-1], device=probs.device), dim=-1)
        for r, n in enumerate(lengths):
            probs[r, n - 1:] = uniform
            pmask[r, n - 1:] = False
    return {"aux_hidden_states": batch.aux_hidden_states, "target_probs": probs,
            "position_mask": pmask.reshape(pmask.shape[0], pmask.shape[1]).bool()}


@dataclass(frozen=True)
class ModeSpec:
    """A dump mode: its per-token fields (beyond ids, mask and aux) and how to compute them."""

    name: str
    fields: tuple[str, ...]
    needs_vocab: bool
    compute: Callable[..., dict[str, torch.Tensor]]
    help: str


MODES: dict[str, ModeSpec] = {
    "hidden": ModeSpec("hidden", ("hidden_states",), False, _compute_hidden,
                       "aux + final-norm hidden state; the reader rebuilds logits with the LM head"),
    "draft": ModeSpec("draft", ("target_probs", "position_mask"), True, _compute_draft,
                      "aux + target distribution over the draft vocabulary (fp32)"),
    "logits": ModeSpec("logits", ("logits",), False, _compute_logits,
                       "aux + full all-position logits"),
}


def expected_fields(config: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    """Per-token tensors of a shard: name -> (dtype name, width or None for 1-D)."""
    dt, h = config["dtype"], config["hidden_size"]
    out: dict[str, tuple[str, int | None]] = {
        "input_ids": ("int64", None), "loss_mask": ("uint8", None),
        "aux_hidden_states": (dt, 3 * h)}
    mode = config["mode"]
    if mode == "hidden":
        out["hidden_states"] = (dt, h)
    elif mode == "logits":
        out["logits"] = (dt, config["vocab_size"])
    else:
        out["target_probs"] = ("float32", config["draft_vocab_size"])
        out["position_mask"] = ("bool", None)
    return out


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# --------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, tmp_tag: str = "") -> None:
    """Writes ``data`` to ``path`` via ``.tmp-`` + fsync + rename + directory fsync."""
    tmp = path.parent / f".tmp-{tmp_tag}{path.name}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _kill_point(name: str) -> None:
    """Fault injection for the resume tests: ``EAGLE3_TARGET_DUMP_KILL_AT=name:n`` kills
    this process with SIGKILL the n-th time it passes ``name``."""
    spec = os.environ.get(KILL_ENV)
    if not spec or not spec.startswith(name + ":"):
        return
    counts = _kill_point.__dict__.setdefault("counts", {})
    counts[name] = counts.get(name, 0) + 1
    if counts[name] == int(spec.split(":")[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def manifest_paths(path: str | Path) -> list[Path]:
    """The manifests in a dump folder (one per worker)."""
    d = Path(path)
    return sorted(p for p in d.glob("manifest*.json") if p.is_file())


def read_manifest(path: str | Path) -> dict[str, Any]:
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} manifest")
    return m


def _config_sha(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.get_chat_template()).encode())
    h.update(json.dumps(list(getattr(tokenizer, "all_special_ids", []))).encode())
    return h.hexdigest()


def _model_fingerprint(path: str) -> str:
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


def save_lm_head(path: Path, head: LMHead, tmp_tag: str) -> None:
    from safetensors.torch import save

    tensors = {"weight": head.weight.detach().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().cpu().contiguous()
    meta = {"format": FORMAT, "scale": float(head.scale), "softcap": head.softcap}
    _write_atomic(path, save(tensors, metadata=_header_meta(meta)), tmp_tag)


def load_lm_head(path: str | Path, device: str | torch.device | None = None) -> LMHead:
    """The LM head a hidden-mode dump stored (``lm_head.safetensors``)."""
    from safetensors import safe_open

    dev = str(device or "cpu")
    with safe_open(str(path), framework="pt", device=dev) as f:
        meta = _read_header_meta(f)
        weight = f.get_tensor("weight")
        bias = f.get_tensor("bias") if "bias" in f.keys() else None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} LM head")
    softcap = meta.get("softcap")
    return LMHead(weight=weight, bias=bias, scale=float(meta["scale"]),
                  softcap=float(softcap) if softcap else None)


def _header_meta(obj: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata with one key: the library writes its metadata map in hash
    order, so several keys would make the header bytes differ from run to run."""
    return {"eagle3": json.dumps(obj, sort_keys=True)}


def _read_header_meta(f: Any) -> dict[str, Any]:
    try:
        return json.loads((f.metadata() or {}).get("eagle3", "{}"))
    except json.JSONDecodeError:
        return {}


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


# safetensors dtype codes, ranked as the library orders tensors in a file (larger first).
_ST_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 1), torch.float16: ("F16", 2),
    torch.bfloat16: ("BF16", 3), torch.int32: ("I32", 4), torch.float32: ("F32", 5),
    torch.float64: ("F64", 6), torch.int64: ("I64", 7),
}


def _byte_view(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


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
    order = sorted(parts, key=lambda n: (-_ST_DTYPES[parts[n][0].dtype][1], n))
    meta = {"format": FORMAT, "config_sha256": config_sha, "entry": job.entry}
    header: dict[str, Any] = {"__metadata__": _header_meta(meta)}
    pos = 0
    pieces: list[torch.Tensor] = []
    for name in order:
        ps = parts[name]
        dt = ps[0].dtype
        if any(p.dtype != dt or p.shape[1:] != ps[0].shape[1:] for p in ps):
            raise RuntimeError(f"shard field {name}: samples disagree in dtype or width")
        n = sum(p.numel() for p in ps) * ps[0].element_size()
        shape = [sum(p.shape[0] for p in ps), *ps[0].shape[1:]]
        header[name] = {"dtype": _ST_DTYPES[dt][0], "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
        pieces += ps
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, pieces


def pack_shard(job: ShardJob, config_sha: str, fields: Sequence[str]) -> bytes:
    """One shard's file bytes, in memory (for tests and small shards)."""
    header, pieces = shard_layout(job, config_sha, fields)
    return header + b"".join(bytes(_byte_view(p)) for p in pieces)


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
        tmp = self.out / f".tmp-{self.tmp_tag}{job.name}"
        h = hashlib.sha256(header)
        size = len(header)
        with open(tmp, "wb") as f:
            f.write(header)
            for p in pieces:
                mv = _byte_view(p)
                h.update(mv)
                f.write(mv)
                size += mv.nbytes
            f.flush()
            os.fsync(f.fileno())
        return tmp, h.hexdigest(), size

    def _commit_loop(self) -> None:
        while (item := self._commits.get()) is not None:
            job, fut = item
            try:
                tmp, sha, size = fut.result()
                if self.error is not None:
                    continue
                _kill_point("shard_written")
                os.replace(tmp, self.out / job.name)
                _fsync_dir(self.out)
                _kill_point("shard_renamed")
                self.bytes_written += size
                self.on_written(job, dict(job.entry, file=job.name, bytes=size, sha256=sha))
                _kill_point("manifest_written")
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


# --------------------------------------------------------------------------- writer


@dataclass
class DumpSummary:
    """What a dump holds (deterministic part, also in the manifest) and what this run did."""

    out: str
    mode: str
    complete: bool
    samples: int
    tokens: int
    supervised_tokens: int
    bytes: int
    shards: int
    skipped: dict[str, dict[str, int]]
    examples: dict[str, list[dict]]
    logits_bytes_per_token: float
    run_samples: int = 0
    run_tokens: int = 0
    run_bytes: int = 0
    run_seconds: float = 0.0
    shards_written: int = 0
    shards_adopted: int = 0
    shards_repaired: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def lines(self) -> list[str]:
        from eagle3_target.cli import human_bytes

        report = DataReport()
        report.add_json(self.skipped, self.examples)
        ratio = (f" ({self.logits_bytes_per_token:,.0f} with full logits: "
                 f"{self.logits_bytes_per_token / self.bytes_per_token:.1f}x more)"
                 if self.bytes_per_token and self.mode != "logits" else "")
        dt = max(self.run_seconds, 1e-9)
        out = [
            f"dump {'complete' if self.complete else 'INCOMPLETE'}: {self.out} (mode {self.mode}, "
            f"{self.shards} shards)",
            f"  {self.samples:,} samples, {self.tokens:,} tokens, {self.supervised_tokens:,} supervised; "
            f"{human_bytes(self.bytes)}, {self.bytes_per_token:,.0f} bytes/token{ratio}",
            f"  this run: {self.run_samples:,} samples, {self.run_tokens:,} tokens in {self.run_seconds:.1f} s "
            f"({self.run_samples / dt:,.1f} samples/s, {self.run_tokens / dt:,.0f} tokens/s, "
            f"{self.run_bytes / dt / 1e6:,.1f} MB/s); shards written {self.shards_written}, "
            f"adopted {self.shards_adopted}, repaired {self.shards_repaired}",
        ]
        skipped = report.lines()
        return out + ([f"  {s}" for s in skipped] if skipped else ["  no rows skipped"])


def greedy_batches(samples: Iterable[Sample], batch_tokens: int) -> Iterator[list[Sample]]:
    """Consecutive samples while rows x longest row stays within ``batch_tokens`` (a
    longer sample runs alone). Memoryless at batch boundaries, which is what makes a
    resumed run cut the same batches as an uninterrupted one."""
    batch: list[Sample] = []
    longest = 0
    for item in samples:
        n = len(item)
        if batch and (len(batch) + 1) * max(longest, n) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, n)
    if batch:
        yield batch


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool | None):
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True,
                            desc="dump", file=sys.stderr)
        self.t0 = time.perf_counter()

    def update(self, rows: int, tokens: int, nbytes: int) -> None:
        if self.bar is None:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{tokens / dt:,.0f} tok/s, {nbytes / dt / 1e6:,.1f} MB/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Dumper:
    """One worker's dump: holds the manifest and produces shards from a start row."""

    def __init__(self, cfg: DumpConfig, source: TargetSource, encoder: ChatEncoder, mapping: Any,
                 config: dict[str, Any], pad_id: int):
        self.cfg, self.source, self.encoder, self.mapping = cfg, source, encoder, mapping
        self.config, self.pad_id = config, pad_id
        self.spec = MODES[cfg.mode]
        self.out = Path(cfg.out)
        self.fields = ["input_ids", "loss_mask", "aux_hidden_states", *self.spec.fields]
        self.config_sha = _config_sha(config)
        self.limit = int(cfg.shard_size_mb * (1 << 20))
        self.manifest: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.run_samples = self.run_tokens = 0

    # -- manifest -------------------------------------------------------------------
    def save_manifest(self) -> None:
        _write_atomic(self.cfg.manifest_path(), _json_bytes(self.manifest), self.cfg.worker_tag)

    def record(self, job: ShardJob, entry: dict[str, Any]) -> None:
        with self.lock:
            shards = self.manifest["shards"]
            if job.index < len(shards):
                shards[job.index] = entry  # a repair
            else:
                shards.append(entry)
            self.save_manifest()

    # -- production -------------------------------------------------------------------
    def _batches(self, start_row: int, pending: list[Skipped], counter: list[int]) -> Iterator[list[Sample]]:
        def samples() -> Iterator[Sample]:
            for item in iter_samples(self.cfg.data, self.encoder, start=start_row, keep=self.cfg.owns):
                counter[0] += 1
                if isinstance(item, Skipped):
                    pending.append(item)
                else:
                    yield item

        return greedy_batches(samples(), self.cfg.batch_tokens)

    def _run_batch(self, batch: list[Sample]) -> list[dict[str, torch.Tensor]]:
        lengths = [len(s) for s in batch]
        s_max = max(lengths)
        ids = torch.full((len(batch), s_max), self.pad_id, dtype=torch.int64)
        attn = torch.zeros((len(batch), s_max), dtype=torch.int64)
        lmask = torch.zeros((len(batch), s_max), dtype=torch.int64)
        for r, s in enumerate(batch):
            ids[r, : len(s)] = torch.tensor(s.input_ids, dtype=torch.int64)
            attn[r, : len(s)] = 1
            lmask[r, : len(s)] = torch.tensor(s.loss_mask, dtype=torch.int64)
        out = self.spec.compute(self.source, ids, attn, lmask, lengths, self.mapping)
        # An owned CPU copy per batch: samples are views into it until their shard is written.
        out = {k: v.detach().to("cpu", copy=True) for k, v in out.items()}
        aux = out["aux_hidden_states"]
        if _dtype_name(aux.dtype) != self.config["dtype"] or aux.shape[-1] != 3 * self.config["hidden_size"]:
            raise RuntimeError(f"the target returned aux_hidden_states {tuple(aux.shape)} {aux.dtype}, "
                               f"expected [..., {3 * self.config['hidden_size']}] {self.config['dtype']}")
        rows = []
        for r, s in enumerate(batch):
            n = len(s)
            row = {k: v[r, :n] for k, v in out.items()}
            row["input_ids"] = ids[r, :n]
            row["loss_mask"] = lmask[r, :n].to(torch.uint8)
            rows.append(row)
        return rows

    def produce(self, start_row: int, first_sample: int, first_index: int,
                progress: _Progress | None = None) -> Iterator[ShardJob]:
        """Shards from ``start_row`` on; afterwards ``self.tail`` holds the skipped rows
        after the last sample."""
        pending: list[Skipped] = []
        counter = [0]
        samples: list[dict[str, torch.Tensor]] = []
        sample_rows: list[int] = []
        meta = {"tokens": 0, "supervised": 0, "bytes": 0}
        row_start, index, ordinal = start_row, first_index, first_sample

        def finish() -> ShardJob:
            nonlocal row_start, index, ordinal, samples, sample_rows, pending
            row_end = sample_rows[-1] + 1
            report = DataReport()
            for s in [p for p in pending if p.row < row_end]:
                report.add(s)
            pending = [p for p in pending if p.row >= row_end]
            entry = {"index": index, "first_sample": ordinal, "num_samples": len(samples),
                     "rows": [row_start, row_end], "tokens": meta["tokens"],
                     "supervised_tokens": meta["supervised"], "skipped": report.counts_json(),
                     "examples": report.examples_json()}
            job = ShardJob(index, self.cfg.shard_name(index), entry, samples, sample_rows)
            row_start, index, ordinal = row_end, index + 1, ordinal + len(samples)
            samples, sample_rows = [], []
            meta.update(tokens=0, supervised=0, bytes=0)
            return job

        for batch in self._batches(start_row, pending, counter):
            rows = self._run_batch(batch)
            for s, row in zip(batch, rows):
                samples.append(row)
                sample_rows.append(s.row)
                meta["tokens"] += len(s)
                meta["supervised"] += s.supervised
                meta["bytes"] += sum(t.numel() * t.element_size() for t in row.values())
            self.run_samples += len(batch)
            self.run_tokens += sum(len(s) for s in batch)
            if progress is not None:
                progress.update(counter[0], self.run_tokens, self.writer_bytes())
                counter[0] = 0
            _kill_point("batch_done")
            if meta["bytes"] >= self.limit:
                yield finish()
        if samples:
            yield finish()
        if progress is not None:
            progress.update(counter[0], self.run_tokens, self.writer_bytes())
        report = DataReport()
        for s in pending:
            report.add(s)
        self.tail = {"rows": [row_start, None], "skipped": report.counts_json(),
                     "examples": report.examples_json()}

    def writer_bytes(self) -> int:
        w = getattr(self, "writer", None)
        return w.bytes_written if w is not None else 0


def _load_source(cfg: DumpConfig) -> TargetSource:
    if cfg.server:
        try:
            from eagle3_target.client import RemoteTarget
        except ImportError as e:
            raise ValueError(f"--server needs eagle3_target.client.RemoteTarget, which this build "
                             f"does not have ({e})") from None
        client = RemoteTarget(list(cfg.server), mode=cfg.mode)
        needs = {"hidden": ("generate_hidden", "lm_head")}.get(cfg.mode, ("generate_batch",))
        missing = [n for n in needs if not hasattr(client, n)]
        if missing:
            client.close()
            raise ValueError(f"--mode {cfg.mode} over --server needs RemoteTarget.{', '.join(missing)}, "
                             f"which this client does not have")
        return client
    from eagle3_target import Eagle3TargetModel
    from eagle3_target.cli import _quiet_transformers, resolve_model

    _quiet_transformers()
    return Eagle3TargetModel.from_pretrained(resolve_model(cfg.model), engine=cfg.engine,
                                             device=cfg.device, dtype=cfg.dtype,
                                             aux_layer_ids=cfg.aux_layer_ids)


def _source_dims(source: Any) -> tuple[int, int, str]:
    """``(hidden_size, vocab_size, dtype name)`` of a target source."""
    h = getattr(source, "hidden_size", None)
    v = getattr(source, "vocab_size", None)
    dt = getattr(source, "dtype", None)
    model = getattr(source, "model", None)
    if dt is None and model is not None:
        dt = next(model.parameters()).dtype
    if h is None or v is None or dt is None:
        # A remote target that does not advertise them: one forward on two tokens tells.
        ids = torch.zeros((1, 2), dtype=torch.int64)
        b = source.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids))
        h = b.aux_hidden_states.shape[-1] // 3
        v = v if v is not None else (b.logits.shape[-1] if b.logits is not None else None)
        dt = b.aux_hidden_states.dtype
    return int(h), int(v), dt if isinstance(dt, str) else _dtype_name(dt)


def _tokenizer_dir(cfg: DumpConfig) -> str:
    from eagle3_target.cli import resolve_model

    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.server and not cfg.model:
        raise ValueError("--server needs --tokenizer DIR (or --model DIR) to render the chats")
    return resolve_model(cfg.model)


def run_dump(cfg: DumpConfig, *, source: TargetSource | None = None, tokenizer: Any = None,
             log: Callable[[str], None] = print) -> DumpSummary:
    """Runs (or resumes, or repairs) one worker's dump and returns its summary.

    ``source``/``tokenizer`` may be given to reuse a loaded target (tests, benchmarks);
    otherwise they are built from ``cfg``. Raises ValueError on bad input before
    anything is written.
    """
    from eagle3_target.data.chat import load_tokenizer
    from eagle3_target.vocab import VocabMapping

    t_start = time.perf_counter()
    data = check_data_files(cfg.data)
    if tokenizer is None:
        tokenizer = load_tokenizer(_tokenizer_dir(cfg))
    mapping = None
    if cfg.vocab:
        if not Path(cfg.vocab).is_file():
            raise ValueError(f"--vocab {cfg.vocab}: no such file")
        mapping = VocabMapping.load(cfg.vocab)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    existing = read_manifest(cfg.manifest_path()) if cfg.manifest_path().exists() else None
    if existing is None and out.is_dir():
        stray = sorted(p.name for p in out.glob(f"shard{cfg.worker_tag}-*.safetensors"))
        if stray:
            raise ValueError(f"{out} has shards ({stray[0]}, ...) but no {cfg.manifest_path().name}: "
                             f"they cannot be checked against this run; use an empty folder")

    own_source = source is None
    if own_source:
        source = _load_source(cfg)
    try:
        hidden_size, vocab_size, dtype = _source_dims(source)
        if mapping is not None and mapping.target_vocab_size != vocab_size:
            raise ValueError(f"--vocab maps a vocabulary of {mapping.target_vocab_size} tokens but the "
                             f"target has {vocab_size}")
        if mapping is not None and hasattr(source, "set_vocab_mapping") and cfg.mode == "draft":
            source.set_vocab_mapping(mapping)
        encoder = ChatEncoder(tokenizer, max_length=cfg.max_length, mask_reasoning=cfg.mask_reasoning,
                              vocab_size=vocab_size)
        if cfg.strict:
            _, report = scan(data, encoder, keep=cfg.owns)
            if (msg := report.strict_error()) is not None:
                raise ValueError(msg)
        config = {
            "format": FORMAT, "mode": cfg.mode,
            "data": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in data],
            "tokenizer_sha256": _tokenizer_fingerprint(tokenizer),
            "model_sha256": (_model_fingerprint(str(getattr(source, "model_path", "")) or _model_dir(cfg))
                             if not cfg.server else str(getattr(source, "model_id", "server"))),
            "engine": "server" if cfg.server else cfg.engine,
            "aux_layer_ids": [int(i) for i in source.aux_layer_ids],
            "dtype": dtype, "hidden_size": hidden_size, "vocab_size": vocab_size,
            "vocab_mapping_id": mapping.mapping_id if mapping is not None else None,
            "draft_vocab_size": mapping.draft_vocab_size if mapping is not None else None,
            "max_length": cfg.max_length, "mask_reasoning": cfg.mask_reasoning,
            "mask_source": "template" if encoder.use_template_mask else "turns",
            "batch_tokens": cfg.batch_tokens, "shard_size_mb": cfg.shard_size_mb,
            "num_shards": cfg.num_shards, "shard_index": cfg.shard_index,
        }
        if existing is not None and existing.get("config") != config:
            old = existing.get("config") or {}
            diff = sorted(k for k in old.keys() | config.keys() if old.get(k) != config.get(k))
            raise ValueError(f"{cfg.manifest_path()} was written with a different configuration "
                             f"(differs in: {', '.join(diff)}); rerun with the original settings "
                             f"or use a new --out folder")
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out, cfg)
        try:
            return _run_locked(cfg, source, encoder, mapping, config, existing, tokenizer, t_start, log)
        finally:
            os.close(lock)
    finally:
        if own_source:
            source.close()


def _model_dir(cfg: DumpConfig) -> str:
    from eagle3_target.cli import resolve_model

    return resolve_model(cfg.model)


def _lock(out: Path, cfg: DumpConfig) -> int:
    fd = os.open(out / f".lock{cfg.worker_tag or '-00000-of-00001'}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another dump is writing {out} (worker {cfg.shard_index} of {cfg.num_shards})") from None
    return fd


def _check_shard_file(path: Path, entry: dict[str, Any], hash_it: bool) -> str | None:
    """None when the finished shard at ``path`` matches its manifest entry, else why not."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, manifest says {entry['bytes']}"
    if hash_it and sha256_file(path) != entry["sha256"]:
        return "sha256 mismatch"
    return None


def _run_locked(cfg: DumpConfig, source: TargetSource, encoder: ChatEncoder, mapping: Any,
                config: dict[str, Any], existing: dict[str, Any] | None, tokenizer: Any,
                t_start: float, log: Callable[[str], None]) -> DumpSummary:
    out = Path(cfg.out)
    pad = getattr(tokenizer, "pad_token_id", None)
    d = _Dumper(cfg, source, encoder, mapping, config, pad if pad is not None else 0)
    for tmp in out.glob(f".tmp-{cfg.worker_tag}*"):
        tmp.unlink()  # this worker's unfinished temporary files: never part of the dataset
    if existing is None:
        d.manifest = {"format": FORMAT, "config": config, "shards": [], "complete": False,
                      "tail": None, "summary": None}
        d.save_manifest()
    else:
        d.manifest = existing
    if cfg.mode == "hidden":
        _ensure_lm_head(d, source, cfg)

    # Finished shards: check, then adopt a shard renamed just before a kill.
    bad = []
    for entry in d.manifest["shards"]:
        why = _check_shard_file(out / entry["file"], entry, hash_it=not cfg.trust_existing)
        if why is not None:
            log(f"shard {entry['file']}: {why}; regenerating it")
            bad.append(entry)
    adopted = _adopt_orphan(d) if not d.manifest["complete"] else 0

    d.writer = ShardWriter(out, d.record, d.config_sha, d.fields, cfg.worker_tag)
    repaired = 0
    try:
        for entry in bad:
            job = next(d.produce(entry["rows"][0], entry["first_sample"], entry["index"]))
            want = {k: entry[k] for k in ("rows", "num_samples", "tokens", "first_sample")}
            if {k: job.entry[k] for k in want} != want:
                raise RuntimeError(f"cannot repair {entry['file']}: regenerating rows {entry['rows']} "
                                   f"gave {job.entry}, the manifest says {want}")
            job.expected_sha256 = entry["sha256"]
            d.writer.put(job)
            repaired += 1
        written = 0
        if not d.manifest["complete"]:
            shards = d.manifest["shards"]
            start = shards[-1]["rows"][1] if shards else 0
            first = sum(e["num_samples"] for e in shards)
            total_rows = count_rows(cfg.data)
            owned = len(range(cfg.shard_index, total_rows, cfg.num_shards))
            progress = _Progress(owned, len(range(cfg.shard_index, start, cfg.num_shards)), cfg.progress)
            try:
                for job in d.produce(start, first, len(shards), progress):
                    d.writer.put(job)
                    written += 1
            finally:
                progress.close()
            d.writer.close()
            d.tail["rows"][1] = total_rows
            with d.lock:
                d.manifest["tail"] = d.tail
                d.manifest["complete"] = True
                d.manifest["summary"] = _summary_json(d.manifest)
                d.save_manifest()
        else:
            d.writer.close()
    finally:
        if d.writer.error is None:
            d.writer.close()
    for entry in bad:  # a regenerated shard must reproduce the bytes it replaced
        now = next(e for e in d.manifest["shards"] if e["index"] == entry["index"])
        if now["sha256"] != entry["sha256"]:
            log(f"warning: regenerated {entry['file']} differs from the original bytes "
                f"(different hardware or library versions?); the manifest now records the new hash")
    s = _summary_json(d.manifest)
    return DumpSummary(
        out=str(out), mode=cfg.mode, complete=bool(d.manifest["complete"]), samples=s["samples"],
        tokens=s["tokens"], supervised_tokens=s["supervised_tokens"], bytes=s["bytes"],
        shards=len(d.manifest["shards"]), skipped=s["skipped"], examples=s["examples"],
        logits_bytes_per_token=_logits_bytes_per_token(config),
        run_samples=d.run_samples, run_tokens=d.run_tokens, run_bytes=d.writer.bytes_written,
        run_seconds=time.perf_counter() - t_start, shards_written=written,
        shards_adopted=adopted, shards_repaired=repaired)


def _logits_bytes_per_token(config: dict[str, Any]) -> float:
    """Bytes per token of the same samples in ``logits`` mode (ids, mask, aux, logits)."""
    item = torch.empty(0, dtype=getattr(torch, config["dtype"])).element_size()
    return 8 + 1 + (3 * config["hidden_size"] + config["vocab_size"]) * item


def _summary_json(manifest: dict[str, Any]) -> dict[str, Any]:
    report = DataReport()
    for e in manifest["shards"] + ([manifest["tail"]] if manifest.get("tail") else []):
        report.add_json(e["skipped"], e["examples"])
    shards = manifest["shards"]
    return {"samples": sum(e["num_samples"] for e in shards), "tokens": sum(e["tokens"] for e in shards),
            "supervised_tokens": sum(e["supervised_tokens"] for e in shards),
            "bytes": sum(e["bytes"] for e in shards), "skipped": report.counts_json(),
            "examples": report.examples_json()}


def _ensure_lm_head(d: _Dumper, source: TargetSource, cfg: DumpConfig) -> None:
    path = Path(cfg.out) / LM_HEAD_FILE
    rec = d.manifest.get("lm_head")
    if rec is not None and path.is_file() and sha256_file(path) == rec["sha256"]:
        return
    save_lm_head(path, source.lm_head(), cfg.worker_tag)
    d.manifest["lm_head"] = {"file": LM_HEAD_FILE, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    d.save_manifest()


def _adopt_orphan(d: _Dumper) -> int:
    """Lists a shard that was renamed into place but not yet recorded (a kill between the
    two steps), after checking that its header matches the shard expected next."""
    from safetensors import safe_open

    shards = d.manifest["shards"]
    path = Path(d.cfg.out) / d.cfg.shard_name(len(shards))
    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _read_header_meta(f)
        entry = meta.get("entry")
        ok = (meta.get("format") == FORMAT and meta.get("config_sha256") == d.config_sha
              and isinstance(entry, dict)
              and entry.get("index") == len(shards)
              and entry.get("first_sample") == sum(e["num_samples"] for e in shards)
              and entry.get("rows", [None])[0] == (shards[-1]["rows"][1] if shards else 0))
    except Exception:  # unreadable: it is not a finished shard of ours
        ok = False
    if not ok:
        path.unlink()
        return 0
    with d.lock:
        shards.append(dict(entry, file=path.name, bytes=path.stat().st_size, sha256=sha256_file(path)))
        d.save_manifest()
    return 1


# --------------------------------------------------------------------------- verify


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
            why = _check_shard_file(lh, m["lm_head"], hash_it=hash_shards)
            if why:
                problems.append(f"{lh.name}: {why}")
        next_sample, next_row = 0, 0
        for entry in m["shards"]:
            name = entry["file"]
            why = _check_shard_file(d / name, entry, hash_it=hash_shards)
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


# --------------------------------------------------------------------------- CLI


def _cmd_dump(args: argparse.Namespace) -> int:
    from eagle3_target.cli import parse_aux_layers

    cfg = DumpConfig(
        out=args.out, data=args.data or [str(sample_data_path())], mode=args.mode, model=args.model,
        engine=args.engine, server=[u for u in args.server.split(",") if u] if args.server else None,
        tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
        aux_layer_ids=parse_aux_layers(args.aux_layers), vocab=args.vocab,
        max_length=args.max_length or None, mask_reasoning=args.mask_reasoning,
        batch_tokens=args.batch_tokens, shard_size_mb=args.shard_size_mb, num_shards=args.num_shards,
        shard_index=args.shard_index, strict=args.strict, trust_existing=args.trust_existing,
        progress=args.progress)
    summary = run_dump(cfg)
    print("\n".join(summary.lines()))
    return 0 if summary.complete else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    report = verify_dump(args.dir, hash_shards=not args.no_hash)
    print("\n".join(report.lines))
    for p in report.problems:
        print(f"problem: {p}")
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    from eagle3_target.cli import add_model_args

    p = sub.add_parser(
        "dump", help="write EAGLE-3 supervision for chat data to sharded safetensors (resumable)",
        description="Renders chat data (JSONL/Parquet; OpenAI messages or ShareGPT conversations) "
                    "with the model's chat template, runs the target and writes shards of "
                    "safetensors plus a manifest. Rerun the same command after an interruption "
                    "to continue; finished shards are checked, never rewritten.")
    add_model_args(p)
    p.add_argument("--server", default=None, help="URL[,URL...] of eagle3-target servers (instead of --model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    p.add_argument("--data", nargs="+", default=None,
                   help="chat files, .jsonl or .parquet (default: the bundled sample chats)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", default="hidden", choices=list(MODES),
                   help="; ".join(f"{m.name}: {m.help}" for m in MODES.values()))
    p.add_argument("--vocab", default=None, help="draft vocab mapping (required for --mode draft)")
    p.add_argument("--max-length", type=int, default=2048, help="truncate samples to this many tokens (0: never)")
    p.add_argument("--mask-reasoning", action="store_true", help="leave <think> text out of the loss mask")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per target forward")
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="close a shard after this many MiB")
    p.add_argument("--num-shards", type=int, default=1, help="number of independent workers")
    p.add_argument("--shard-index", type=int, default=0, help="this worker (rows r with r %% K == i)")
    p.add_argument("--strict", action="store_true", help="fail on any malformed or unsupervised row")
    p.add_argument("--trust-existing", action="store_true",
                   help="on a rerun, check finished shards by size only (no re-hash)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(func=_cmd_dump)

    p = sub.add_parser("verify", help="check a dump folder against its manifest(s); exit 0 when sound",
                       description="Checks every shard: sha256 and size, header, dtypes and shapes, "
                                   "offsets, token counts, NaN/Inf. Exit code 0 when all is well, 1 "
                                   "otherwise.")
    p.add_argument("dir", help="dump folder")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 of every file")
    p.set_defaults(func=_cmd_verify)
