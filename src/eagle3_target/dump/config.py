"""The dump's configuration: :class:`DumpConfig`, the one source of the dump's defaults
(the ``dump`` subcommand's flags read theirs from it), its checks, and the names of a
worker's files.

Imports no torch, so building the command line stays instant.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from eagle3_target.data.chat import MAX_LENGTH
from eagle3_target.data.rows import MAX_ROW_BYTES, sample_data_path, worker_owns
from eagle3_target.dump.modes import MODES

__all__ = ["DumpConfig", "RENDER_CHOICES", "default", "pin_threads_ok", "worker_tag", "shard_file_name"]


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
    token_file: str | None = None
    """With ``server``: a file whose first line is the access token (else ``$EAGLE3_TARGET_TOKEN``)."""
    device: str | None = None
    dtype: str | None = None
    aux_layer_ids: list[int] | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Options for the engine's ``build()`` (``--engine-arg``), e.g. ``attention_backend``."""
    vocab: str | None = None
    """Draft-vocab mapping (``eagle3-target vocab``); required for ``draft`` mode."""
    with_prenorm: bool = False
    """Also store ``final_prenorm``, the final state before the final norm (what
    speculators' trainer takes; ``eagle3-target export --to speculators`` needs it).
    Costs a second target forward per batch and ``H`` values a token."""
    max_length: int | None = MAX_LENGTH
    """Tokens a sample keeps (right truncation; None: all)."""
    max_row_mb: float = MAX_ROW_BYTES / 2**20
    """The largest data row read, in MiB; a larger one is skipped with its size
    (:mod:`eagle3_target.data.rows` says why: rendering takes ~300x a row's size)."""
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
            self.prefetch = 2 if self.server else 1
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative integer, got {self.prefetch!r}")
        if isinstance(self.max_row_mb, bool) or not isinstance(self.max_row_mb, (int, float)) \
                or not self.max_row_mb * 2**20 >= 1:
            raise ValueError(f"max_row_mb must be positive, got {self.max_row_mb!r}")
        if not self.shard_size_mb > 0:
            raise ValueError(f"shard_size_mb must be positive, got {self.shard_size_mb!r}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.token_file is not None and not self.server:
            raise ValueError("--token-file is the token of --server; a dump on --model needs none")
        if self.token_file is not None and not Path(self.token_file).is_file():
            raise ValueError(f"--token-file {self.token_file}: no such file")
        if self.server and self.engine != "hf":
            raise ValueError("--server and --engine are exclusive: the server runs its own engine")
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.render not in RENDER_CHOICES:
            raise ValueError(f"render must be one of {', '.join(RENDER_CHOICES)}, got {self.render!r}")

    @property
    def max_row_bytes(self) -> int:
        """``max_row_mb`` in bytes."""
        return int(self.max_row_mb * 2**20)

    def render_in_child(self, engine_on_gpu: bool) -> bool:
        """Whether a child process renders the chats (see ``render``); ``engine_on_gpu``:
        the target is an engine in this process, on a GPU."""
        if self.render != "auto":
            return self.render == "process"
        return engine_on_gpu

    @property
    def worker_tag(self) -> str:
        """``-iiiii-of-KKKKK`` in this worker's file names (empty for a single worker)."""
        return worker_tag(self.num_shards, self.shard_index)

    def manifest_path(self) -> Path:
        return Path(self.out) / f"manifest{self.worker_tag}.json"

    def shard_name(self, j: int) -> str:
        return shard_file_name(self.num_shards, self.shard_index, j)

    def owns(self, row: int) -> bool:
        """Whether data row ``row`` is this worker's."""
        return worker_owns(row, self.num_shards, self.shard_index)


def worker_tag(num_shards: int, shard_index: int) -> str:
    """``-iiiii-of-KKKKK``, the part of worker ``shard_index``'s file names that tells the
    workers of a split dump apart (empty for a single worker)."""
    return "" if num_shards == 1 else f"-{shard_index:05d}-of-{num_shards:05d}"


def shard_file_name(num_shards: int, shard_index: int, j: int) -> str:
    """The file name of worker ``shard_index``'s shard number ``j``."""
    return f"shard{worker_tag(num_shards, shard_index)}-{j:05d}.safetensors"


def default(name: str) -> Any:
    """A :class:`DumpConfig` field's default: what ``dump``'s flags show and fall back to."""
    f = DumpConfig.__dataclass_fields__[name]
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def pin_threads_ok(threads: Any) -> bool:
    """0 (torch's default pinning) or what torch takes for ``pinned_num_register_threads``:
    a power of two up to 128."""
    return (isinstance(threads, int) and not isinstance(threads, bool) and 0 <= threads <= 128
            and not threads & (threads - 1))
