"""The offline dump: chat data -> sharded safetensors of EAGLE-3 supervision, written so
that a killed job never costs a rerun or a silent error.

Owns the writer job (:func:`run_dump`, the ``dump`` subcommand): rendering the data,
batching, running the target per mode, cutting shards, resuming and repairing. The
file format and the shard writer are :mod:`eagle3_target.shards`; the checker is
:mod:`eagle3_target.verify`; the trainer's side is :mod:`eagle3_target.reader`. Each
stored sample holds exactly what ``generate_batch`` gives for that sample alone.

Guarantees, and how:

- atomic: a shard is written under ``.tmp-``, hashed on the way, fsynced, then renamed;
  the manifest (itself written by temp + rename) lists it only after the rename. A
  shard on disk that the manifest does not list yet (a kill between rename and
  manifest) is adopted on the next run after its header is checked, not rewritten.
- resumable: the manifest's last shard says which data row comes next; a rerun of the
  same command continues there. Every finished shard is re-hashed first
  (``--trust-existing`` skips that); a damaged one is regenerated from its row range.
- deterministic: samples keep data order, batches are cut greedily by
  ``--batch-tokens`` and shards by ``--shard-size-mb`` at batch boundaries, so the
  batch that starts after any shard is the same in every run; nothing run-dependent
  (times, temporary names) is stored. Interrupted or not, the bytes match.
- split: ``--num-shards K --shard-index i`` takes the rows ``r`` with ``r % K == i``;
  workers share nothing and write distinct files, so they can run on several machines
  and their outputs be copied into one folder.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from eagle3_target.contract import Eagle3TargetBatch, LMHead
from eagle3_target.data.chat import (
    ChatEncoder,
    DataReport,
    Sample,
    Skipped,
    check_data_files,
    count_rows,
    sample_data_path,
    scan,
    tokenizer_class_name,
    tokenizer_fingerprint,
    worker_owns,
)
from eagle3_target.data.render_process import RenderProcess, iter_samples_handover
from eagle3_target.shards import (
    FORMAT,
    LM_HEAD_FILE,
    ShardJob,
    ShardWriter,
    check_shard_file,
    config_sha256,
    dtype_name,
    json_bytes,
    kill_point,
    model_fingerprint,
    host_copy,
    pin_threads_ok,
    read_header_meta,
    read_manifest,
    save_lm_head,
    sha256_file,
    threaded_pinning,
    write_atomic,
)

__all__ = ["MODES", "ModeSpec", "DumpConfig", "DumpSummary", "TargetSource", "greedy_batches",
           "run_dump", "register"]


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


RENDER_CHOICES = ("auto", "thread", "process")


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
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Options for the engine's ``build()`` (``--engine-arg``), e.g. ``attention_backend``."""
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
    writer_threads: int | None = None
    """Shards written (and hashed) in parallel; commits stay in order. None: half the
    CPU cores, 2 to 8 (sha256 runs ~1.2 GB/s a thread, and a GPU engine produces
    hidden-mode supervision at more than 1 GB/s)."""
    pin_threads: int = 8
    """On a GPU, torch's pinned host pool grows by malloc + page faults on this many
    threads + ``cudaHostRegister`` instead of ``cudaHostAlloc`` (0: leave torch's
    setting). On an H100 host that pinned the dump's ~3 GiB pool in 0.5 s instead of
    2.5 s, which a dump's first batches otherwise wait for. The setting is torch's and
    process-wide; a ``pinned_`` option in ``PYTORCH_CUDA_ALLOC_CONF`` wins over it."""
    prefetch: int | None = None
    """Batches computed ahead on worker threads (None: 2 with ``server``, whose client is
    built for concurrent requests; 0 in process). In process, use at most 1 (one forward
    at a time on a worker thread, overlapping tokenisation and packing with the engine):
    the runners' capture hooks are shared. Order and bytes do not depend on it."""
    progress: bool | None = None
    """Progress bar on stderr; None shows it when stderr is a terminal."""
    render: str = "auto"
    """Where the chat template runs: ``thread`` (a thread of this process), ``process``
    (a child process, which takes over from the thread once it has loaded the tokenizer)
    or ``auto``: ``process`` when the target is an engine in this process on a GPU,
    ``thread`` otherwise. A GPU engine launches kernels from Python, and a render thread
    sharing its GIL slows it (docs/benchmarks.md); on the CPU the engine's ops are long
    and a child would only take a core from it; with ``server`` no engine shares the GIL.
    The child is started before the engine loads, so its start overlaps the load."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if MODES[self.mode].needs_vocab and not self.vocab:
            raise ValueError(f"mode {self.mode!r} needs --vocab mapping.safetensors (see `eagle3-target vocab`)")
        if self.writer_threads is None:
            self.writer_threads = min(8, max(2, (os.cpu_count() or 2) // 2))
        if not pin_threads_ok(self.pin_threads):
            raise ValueError(f"pin_threads must be 0 or a power of two up to 128, got {self.pin_threads!r}")
        for name in ("batch_tokens", "num_shards", "writer_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.prefetch is None:
            self.prefetch = 2 if self.server else 0
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative integer, got {self.prefetch!r}")
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
        if self.render not in RENDER_CHOICES:
            raise ValueError(f"render must be one of {', '.join(RENDER_CHOICES)}, got {self.render!r}")

    def render_in_child(self, engine_on_gpu: bool) -> bool:
        """Whether a child process renders the chats (see ``render``); ``engine_on_gpu``:
        the target is an engine in this process, on a GPU."""
        if self.render != "auto":
            return self.render == "process"
        return engine_on_gpu

    @property
    def worker_tag(self) -> str:
        return "" if self.num_shards == 1 else f"-{self.shard_index:05d}-of-{self.num_shards:05d}"

    def manifest_path(self) -> Path:
        return Path(self.out) / f"manifest{self.worker_tag}.json"

    def shard_name(self, j: int) -> str:
        return f"shard{self.worker_tag}-{j:05d}.safetensors"

    def owns(self, row: int) -> bool:
        return worker_owns(row, self.num_shards, self.shard_index)


# --------------------------------------------------------------------------- modes


def _zero_tails(t: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Zeroes rows ``L-1..`` of each sample (``t [B,S,...]``): what a batch of one gives
    at its last position (the shift's zero tail), instead of values computed from pads.
    One masked fill, not a kernel per row (batches reach hundreds of rows)."""
    pos = torch.arange(t.shape[1], device=t.device)
    last = torch.tensor(lengths, device=t.device).sub_(1)
    tail = (pos[None, :] >= last[:, None]).reshape(*t.shape[:2], *([1] * (t.dim() - 2)))
    return t.masked_fill_(tail, 0)


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


def _real_tokens(out: dict[str, torch.Tensor], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[B,S,...]`` padded outputs -> ``[T,...]`` tensors of the real tokens (where
    ``attention_mask [B,S]`` is 1, right-padded rows back to back), on the outputs'
    device: a GPU then sends only real tokens to the host (batches were ~half padding on
    the sample chats)."""
    b, s_max = attention_mask.shape
    idx = attention_mask.reshape(-1).nonzero().squeeze(1)
    idx = idx.to(next(iter(out.values())).device, non_blocking=True)
    return {k: v.detach().reshape(b * s_max, *v.shape[2:]).index_select(0, idx) for k, v in out.items()}


def _done(value: Any) -> Future:
    """A future that already holds ``value``."""
    f: Future = Future()
    f.set_result(value)
    return f


class _HostCopier:
    """Copies a batch's outputs to host memory on a thread and CUDA stream of its own.

    On the H100 host a pageable device-to-host copy ran at ~1.5 GB/s, which held the
    dump to a third of the engine; a pinned one runs at ~54 GB/s, but pinning fresh
    memory costs ~0.35 s/GB the first time (torch caches the blocks afterwards). Both
    happen here, off the thread that drives the engine, so the next forward starts at
    once. CPU outputs need no copy and come back as they are."""

    def __init__(self, pin_threads: int = 0) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, Any] = {}
        self._pin_threads = pin_threads
        self._pinning = threading.Lock()
        self._pinning_set = False

    def prepare_pinning(self) -> None:
        """Applies ``pin_threads`` (once) before this dump's first pinned allocation,
        whichever thread makes it: the LM head's 1 GB copy usually comes first."""
        with self._pinning:
            if not self._pinning_set:
                threaded_pinning(self._pin_threads)
                self._pinning_set = True

    def submit(self, flat: dict[str, torch.Tensor]) -> Future:
        some = next(iter(flat.values()))
        if not some.is_cuda:
            return _done(flat)
        ready = torch.cuda.Event()
        ready.record()  # the outputs are complete once the engine's stream gets here
        if self._pool is None:
            self.prepare_pinning()
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagle3-d2h")
        return self._pool.submit(self._copy, flat, ready, some.device)

    def _copy(self, flat: dict[str, torch.Tensor], ready: Any, device: torch.device) -> dict[str, torch.Tensor]:
        with torch.cuda.device(device):
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            stream.wait_event(ready)
            with torch.cuda.stream(stream):  # each copy waits on this stream only
                return {k: host_copy(v) for k, v in flat.items()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


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
    run_load_seconds: float = 0.0
    """Of ``run_seconds``, the start-up until the target was loaded: the tokenizer, the
    render process's start and the engine's load (0 when a loaded target was passed in)."""
    shards_written: int = 0
    shards_adopted: int = 0
    shards_repaired: int = 0
    run_child_rows: int = 0
    """Rows of this run rendered by the child process (``--render``), the rest by a thread."""

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
            f"adopted {self.shards_adopted}, repaired {self.shards_repaired}"
            + (f"; {self.run_child_rows:,} rows rendered by a child process" if self.run_child_rows else ""),
        ]
        if self.run_load_seconds > 0 and self.run_seconds > self.run_load_seconds:
            work = self.run_seconds - self.run_load_seconds
            out.append(f"  after loading the target ({self.run_load_seconds:.1f} s): "
                       f"{self.run_tokens / work:,.0f} tokens/s, {self.run_bytes / work / 1e6:,.1f} MB/s")
        skipped = report.lines()
        return out + ([f"  {s}" for s in skipped] if skipped else ["  no rows skipped"])


def pack_batch(samples: Sequence[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` of ``samples``, each
    ``[B,S] int64``: what the dump hands the target."""
    # Built in numpy, then handed to torch whole: a torch op per row would drop and
    # retake the GIL hundreds of times a batch on the read-ahead thread, and each time
    # the engine's launching thread waits to get it back.
    s_max = max(len(s) for s in samples)
    ids = np.full((len(samples), s_max), pad_id, dtype=np.int64)
    attn = np.zeros((len(samples), s_max), dtype=np.int64)
    lmask = np.zeros((len(samples), s_max), dtype=np.int64)
    for r, s in enumerate(samples):
        ids[r, : len(s)] = s.input_ids
        attn[r, : len(s)] = 1
        lmask[r, : len(s)] = s.loss_mask
    return torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(lmask)


@dataclass
class _Batch:
    """One packed batch (``samples=None``: the end of the data) and what reading it met."""

    samples: list[Sample] | None
    ids: torch.Tensor | None  # [B,S] int64, right-padded
    attn: torch.Tensor | None  # [B,S] int64
    lmask: torch.Tensor | None  # [B,S] int64
    skipped: list[Skipped]
    rows_read: int


class _Rows:
    """A launched batch: ``result()`` waits for its host copy and splits it per sample."""

    def __init__(self, b: _Batch, lengths: list[int], copied: Any):
        self.b, self.lengths, self.copied = b, lengths, copied

    def result(self) -> list[dict[str, torch.Tensor]]:
        flat = self.copied.result()
        rows = []
        start = 0
        for r, n in enumerate(self.lengths):
            row = {k: v[start:start + n] for k, v in flat.items()}
            row["input_ids"] = self.b.ids[r, :n]
            row["loss_mask"] = self.b.lmask[r, :n].to(torch.uint8)
            rows.append(row)
            start += n
        return rows


def read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Yields ``items`` in order while a background thread computes up to ``depth`` more.

    The producer's exception is re-raised here; a consumer that stops early (closing
    this generator) stops the producer too, so no thread is left behind."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # handed to the consumer
            q.put((done, e))

    t = threading.Thread(target=produce, name="eagle3-read-ahead", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


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
        self.config_sha = config_sha256(config)
        self.limit = int(cfg.shard_size_mb * (1 << 20))
        self.manifest: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.run_samples = self.run_tokens = self.run_bytes = 0
        self.copier = _HostCopier(cfg.pin_threads)

    # -- manifest -------------------------------------------------------------------
    def save_manifest(self) -> None:
        write_atomic(self.cfg.manifest_path(), json_bytes(self.manifest), self.cfg.worker_tag)

    def record(self, job: ShardJob, entry: dict[str, Any]) -> None:
        with self.lock:
            shards = self.manifest["shards"]
            if job.index < len(shards):
                shards[job.index] = entry  # a repair
            else:
                shards.append(entry)
            self.save_manifest()

    # -- production -------------------------------------------------------------------
    def _batches(self, start_row: int, child: RenderProcess | None) -> Iterator[_Batch]:
        """Rendered, tokenised and packed batches from ``start_row`` on, then one last
        item (``samples=None``) with the rows read after the last batch. ``child``
        takes the rendering over once it is ready."""
        skipped: list[Skipped] = []
        read = [0]

        cfg = self.cfg
        items = iter_samples_handover(cfg.data, self.encoder, start=start_row, num_shards=cfg.num_shards,
                                      shard_index=cfg.shard_index, child=child)

        def samples() -> Iterator[Sample]:
            for item in items:
                read[0] += 1
                if isinstance(item, Skipped):
                    skipped.append(item)
                else:
                    yield item

        def seen() -> tuple[list[Skipped], int]:
            out = (list(skipped), read[0])
            skipped.clear()
            read[0] = 0
            return out

        for batch in greedy_batches(samples(), self.cfg.batch_tokens):
            yield _Batch(batch, *pack_batch(batch, self.pad_id), *seen())
        yield _Batch(None, None, None, None, *seen())

    def _launch(self, b: _Batch) -> _Rows:
        """Runs the target on one batch and starts copying its real tokens to the host;
        the future gives one dict per sample (views into the batch's host tensors until
        their shard is written)."""
        lengths = [len(s) for s in b.samples]
        out = self.spec.compute(self.source, b.ids, b.attn, b.lmask, lengths, self.mapping)
        aux = out["aux_hidden_states"]
        if dtype_name(aux.dtype) != self.config["dtype"] or aux.shape[-1] != 3 * self.config["hidden_size"]:
            raise RuntimeError(f"the target returned aux_hidden_states {tuple(aux.shape)} {aux.dtype}, "
                               f"expected [..., {3 * self.config['hidden_size']}] {self.config['dtype']}")
        return _Rows(b, lengths, self.copier.submit(_real_tokens(out, b.attn)))

    def _run_batch(self, b: _Batch) -> list[dict[str, torch.Tensor]]:
        return self._launch(b).result()

    def _computed(self, batches: Iterator[_Batch]) -> Iterator[tuple[_Batch, list[dict] | None]]:
        """``(batch, rows)`` in batch order, with up to ``prefetch`` batches computed ahead
        on worker threads; the last item's rows are None."""
        depth = self.cfg.prefetch
        if not depth:
            # The engine runs batch N+1 while batch N is copied to the host.
            last: tuple[_Batch, Any] | None = None
            for b in batches:
                launched = self._launch(b) if b.samples is not None else _done(None)
                if last is not None:
                    yield last[0], last[1].result()
                last = (b, launched)
            if last is not None:
                yield last[0], last[1].result()
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="eagle3-target") as pool:
            pending: deque = deque()
            for b in batches:
                pending.append((b, pool.submit(self._run_batch, b) if b.samples is not None else _done(None)))
                if len(pending) > depth:
                    b0, fut = pending.popleft()
                    yield b0, fut.result()
            while pending:
                b0, fut = pending.popleft()
                yield b0, fut.result()

    def produce(self, start_row: int, first_sample: int, first_index: int,
                progress: _Progress | None = None, child: RenderProcess | None = None) -> Iterator[ShardJob]:
        """Shards from ``start_row`` on; afterwards ``self.tail`` holds the skipped rows
        after the last sample. ``child`` (used by one call only) renders once it is ready."""
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

        # Rendering, tokenising and packing run a batch or two ahead on a thread of their
        # own, so the target never waits for the chat template.
        for b, rows in self._computed(read_ahead(self._batches(start_row, child), depth=2)):
            pending += b.skipped
            counter[0] += b.rows_read
            if b.samples is None:
                break
            batch = b.samples
            for s, row in zip(batch, rows):
                samples.append(row)
                sample_rows.append(s.row)
                meta["tokens"] += len(s)
                meta["supervised"] += s.supervised
                meta["bytes"] += sum(t.numel() * t.element_size() for t in row.values())
            self.run_samples += len(batch)
            self.run_tokens += sum(len(s) for s in batch)
            self.run_bytes += sum(t.numel() * t.element_size() for row in rows for t in row.values())
            if progress is not None:
                progress.update(counter[0], self.run_tokens, self.run_bytes)
                counter[0] = 0
            kill_point("batch_done")
            if meta["bytes"] >= self.limit:
                yield finish()
        if samples:
            yield finish()
        if progress is not None:
            progress.update(counter[0], self.run_tokens, self.run_bytes)
        report = DataReport()
        for s in pending:
            report.add(s)
        self.tail = {"rows": [row_start, None], "skipped": report.counts_json(),
                     "examples": report.examples_json()}


def _load_source(cfg: DumpConfig) -> TargetSource:
    if cfg.server:
        try:
            from eagle3_target.client import RemoteTarget
        except ImportError as e:
            raise ValueError(f"--server needs eagle3_target.client.RemoteTarget, which this build "
                             f"does not have ({e})") from None
        # The token as the server takes it: from the environment, never the command line
        # (or inside the URL: http://user:TOKEN@host:port).
        from eagle3_target.client import RemoteTargetError

        try:
            client = RemoteTarget(list(cfg.server), token=os.environ.get("EAGLE3_TARGET_TOKEN"), mode=cfg.mode)
        except RemoteTargetError as e:  # refused (401, wrong mode...) or unreachable: say so plainly
            raise ValueError(f"--server {','.join(cfg.server)}: {e}") from None
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
                                             aux_layer_ids=cfg.aux_layer_ids, **cfg.engine_args)


def _source_dims(source: Any, mode: str, mapping: Any) -> tuple[int, int, str]:
    """``(hidden_size, vocab_size, dtype name)`` of a target source: from its attributes
    (``Eagle3TargetModel``), else from one forward on two tokens (a remote target, whose
    wire dtype is the server model's)."""
    h = getattr(source, "hidden_size", None)
    v = getattr(source, "vocab_size", None)
    model = getattr(source, "model", None)
    dt = getattr(source, "dtype", None)
    if not isinstance(dt, torch.dtype):
        dt = next(model.parameters()).dtype if model is not None and hasattr(model, "parameters") else None
    if h is None or v is None or dt is None:
        ids = torch.zeros((1, 2), dtype=torch.int64)
        out = MODES[mode].compute(source, ids, torch.ones_like(ids), torch.ones_like(ids), [2], mapping)
        aux = out["aux_hidden_states"]
        h, dt = aux.shape[-1] // 3, aux.dtype
        if v is None:
            if "logits" not in out:
                raise ValueError("the target does not say its vocab_size")
            v = out["logits"].shape[-1]
    return int(h), int(v), dtype_name(dt)


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
    tokenizer_dir = _tokenizer_dir(cfg) if tokenizer is None else getattr(tokenizer, "name_or_path", None)
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_dir)
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

    if cfg.prefetch > 1 and not cfg.server and (source is None or _in_process(source)):
        raise ValueError(f"--prefetch {cfg.prefetch}: an in-process target runs one forward at a time "
                         f"(its capture hooks are shared); use --prefetch 0 or 1")
    # Started before the target loads, so the child's imports overlap the engine's.
    own_source = source is None
    child = _start_render_process(cfg, tokenizer, tokenizer_dir, _engine_on_gpu(cfg, source))
    try:
        load_seconds = 0.0
        if own_source:
            source = _load_source(cfg)
            # From the start, not from the load's own start: importing transformers for
            # the tokenizer took seconds on a GPU host, and the rate after this point
            # is the one to set against the engine alone.
            load_seconds = time.perf_counter() - t_start
        v = getattr(source, "vocab_size", None)
        if mapping is not None and v is not None and mapping.target_vocab_size != v:
            raise ValueError(f"--vocab maps a vocabulary of {mapping.target_vocab_size} tokens but the "
                             f"target has {v}")
        if mapping is not None and hasattr(source, "set_vocab_mapping") and cfg.mode == "draft":
            source.set_vocab_mapping(mapping)
        hidden_size, vocab_size, dtype = _source_dims(source, cfg.mode, mapping)
        encoder = ChatEncoder(tokenizer, max_length=cfg.max_length, mask_reasoning=cfg.mask_reasoning,
                              vocab_size=vocab_size)
        if cfg.strict:
            _, report = scan(data, encoder, keep=cfg.owns)
            if (msg := report.strict_error()) is not None:
                raise ValueError(msg)
        config = {
            "format": FORMAT, "mode": cfg.mode,
            "data": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in data],
            "tokenizer_sha256": child.fingerprint if child is not None else tokenizer_fingerprint(tokenizer),
            "model_sha256": (model_fingerprint(_model_dir(cfg)) if not cfg.server
                             else "server:" + str((getattr(source, "info", None) or {}).get("model"))),
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
            summary = _run_locked(cfg, source, encoder, mapping, config, existing, tokenizer, child, t_start, log)
            summary.run_load_seconds = load_seconds
            return summary
        finally:
            os.close(lock)
    finally:
        if child is not None:
            child.close()
            if child.failure is not None:
                log(f"note: the render process was not used ({child.failure}); this process rendered the chats")
        if own_source and source is not None:
            source.close()


def _engine_on_gpu(cfg: DumpConfig, source: TargetSource | None) -> bool:
    """Whether the target is (or, not loaded yet, will be) an engine in this process on a GPU."""
    if source is None:
        return not cfg.server and not str(cfg.device or "").startswith("cpu") and torch.cuda.is_available()
    if not _in_process(source):
        return False
    return source.get_input_embeddings().weight.device.type == "cuda"


def _start_render_process(cfg: DumpConfig, tokenizer: Any, tokenizer_dir: str | None,
                          engine_on_gpu: bool) -> RenderProcess | None:
    if not cfg.render_in_child(engine_on_gpu):
        return None
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        if cfg.render == "process":
            raise ValueError("--render process needs the tokenizer's folder (--tokenizer or --model), "
                             "which the child loads")
        return None
    return RenderProcess(str(tokenizer_dir), tokenizer_fingerprint(tokenizer), tokenizer_class_name(tokenizer))


def _in_process(source: Any) -> bool:
    from eagle3_target.contract import Eagle3TargetModel

    return isinstance(source, Eagle3TargetModel)


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


def _run_locked(cfg: DumpConfig, source: TargetSource, encoder: ChatEncoder, mapping: Any,
                config: dict[str, Any], existing: dict[str, Any] | None, tokenizer: Any,
                child: RenderProcess | None, t_start: float, log: Callable[[str], None]) -> DumpSummary:
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
    head = _LMHeadWriter(d, source, cfg) if cfg.mode == "hidden" else None

    # Finished shards: check, then adopt a shard renamed just before a kill.
    bad = []
    for entry in d.manifest["shards"]:
        why = check_shard_file(out / entry["file"], entry, hash_it=not cfg.trust_existing)
        if why is not None:
            log(f"shard {entry['file']}: {why}; regenerating it")
            bad.append(entry)
    adopted = _adopt_orphan(d) if not d.manifest["complete"] else 0

    d.writer = ShardWriter(out, d.record, d.config_sha, d.fields, cfg.worker_tag, threads=cfg.writer_threads)
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
        finishing = not d.manifest["complete"]
        if finishing:
            shards = d.manifest["shards"]
            start = shards[-1]["rows"][1] if shards else 0
            first = sum(e["num_samples"] for e in shards)
            total_rows = count_rows(cfg.data)
            owned = len(range(cfg.shard_index, total_rows, cfg.num_shards))
            progress = _Progress(owned, len(range(cfg.shard_index, start, cfg.num_shards)), cfg.progress)
            try:
                for job in d.produce(start, first, len(shards), progress, child=child):
                    d.writer.put(job)
                    written += 1
            finally:
                progress.close()
        d.writer.close()
        if head is not None:
            head.join()  # the dump is complete only with its LM head
        if finishing:
            d.tail["rows"][1] = total_rows
            with d.lock:
                d.manifest["tail"] = d.tail
                d.manifest["complete"] = True
                d.manifest["summary"] = _summary_json(d.manifest)
                d.save_manifest()
    finally:
        d.copier.close()
        if d.writer.error is None:
            d.writer.close()
        if head is not None:
            head.wait()  # never leave it writing; its error, if any, was raised above
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
        shards_adopted=adopted, shards_repaired=repaired, run_child_rows=child.rows if child is not None else 0)


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


class _LMHeadWriter:
    """Checks or writes ``lm_head.safetensors`` on a background thread.

    The 8B head is 1 GB (hash, device-to-host copy, write): in line it cost seconds of
    engine time per dump. The manifest records the head once it is complete; :meth:`join`
    (before the dump is marked complete) re-raises a failure."""

    def __init__(self, d: _Dumper, source: TargetSource, cfg: DumpConfig):
        self.d, self.source = d, source
        self.path, self.tag = Path(cfg.out) / LM_HEAD_FILE, cfg.worker_tag
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="eagle3-lm-head", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            rec = self.d.manifest.get("lm_head")
            if rec is not None and self.path.is_file() and sha256_file(self.path) == rec["sha256"]:
                return
            head = self.source.lm_head()
            if head.weight.is_cuda:
                self.d.copier.prepare_pinning()
            sha, size = save_lm_head(self.path, head, self.tag)
            with self.d.lock:
                self.d.manifest["lm_head"] = {"file": LM_HEAD_FILE, "bytes": size, "sha256": sha}
                self.d.save_manifest()
        except BaseException as e:  # re-raised by join()
            self.error = e

    def wait(self) -> None:
        self._thread.join()

    def join(self) -> None:
        self.wait()
        if self.error is not None:
            raise RuntimeError(f"writing {LM_HEAD_FILE} failed: {self.error}") from self.error


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
            meta = read_header_meta(f)
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


# --------------------------------------------------------------------------- CLI


def _cmd_dump(args: argparse.Namespace) -> int:
    from eagle3_target.cli import parse_aux_layers, parse_engine_args

    cfg = DumpConfig(
        out=args.out, data=args.data or [str(sample_data_path())], mode=args.mode, model=args.model,
        engine=args.engine, server=[u for u in args.server.split(",") if u] if args.server else None,
        tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
        aux_layer_ids=parse_aux_layers(args.aux_layers),
        engine_args=parse_engine_args(args.engine_arg), vocab=args.vocab,
        max_length=args.max_length or None, mask_reasoning=args.mask_reasoning,
        batch_tokens=args.batch_tokens, shard_size_mb=args.shard_size_mb, num_shards=args.num_shards,
        shard_index=args.shard_index, strict=args.strict, trust_existing=args.trust_existing,
        writer_threads=args.writer_threads, prefetch=args.prefetch, progress=args.progress,
        pin_threads=args.pin_threads, render=args.render)
    try:
        summary = run_dump(cfg)
    except (OSError, RuntimeError) as e:  # a full disk, a lost server: what is done stays done
        print(f"eagle3-target dump: error: {e}\nthe finished shards are kept; rerun the same command "
              f"to continue", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0 if summary.complete else 1


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
    p.add_argument("--writer-threads", type=int, default=None,
                   help="shards written and hashed in parallel, commits in order (default: half the cores, 2-8)")
    p.add_argument("--pin-threads", type=int, default=8,
                   help="on a GPU, threads that pin the host copy pool (0: torch's default cudaHostAlloc)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="batches computed ahead on worker threads (default: 2 with --server, else 0)")
    p.add_argument("--render", default="auto", choices=RENDER_CHOICES,
                   help="where the chat template runs: a thread, a child process that takes over once "
                        "loaded (keeps the GIL free for a GPU engine), or auto (process on a GPU)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(func=_cmd_dump)

