"""The regeneration job's configuration: :class:`RegenConfig`, the one source of the
``regenerate`` subcommand's defaults, its checks, the per-row seed and the names of the
job's files.

Imports no torch, so building the command line stays instant.
"""

from __future__ import annotations

import hashlib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from eagle3_target.data.rows import sample_data_path

__all__ = ["RegenConfig", "TURNS", "OUTPUT_FORMATS", "ENGINES", "default", "row_seed", "MANIFEST"]

TURNS = ("last", "all")
"""``last``: drop the trailing assistant turn and answer the conversation so far;
``all``: answer every assistant turn in order, each later user turn following the
regenerated answers."""
OUTPUT_FORMATS = ("jsonl", "parquet")
ENGINES = ("hf", "sglang", "server")
MANIFEST = "manifest.json"


@dataclass
class RegenConfig:
    """One regeneration job (what the ``regenerate`` subcommand's flags fill in)."""

    out: str
    """Output folder (created)."""
    data: list[str] = field(default_factory=lambda: [str(sample_data_path())])
    """JSONL/Parquet chat files (OpenAI messages or ShareGPT), read in this order."""
    model: str | None = None
    """Local model folder (default: the built-in tiny model). With ``server``: only its tokenizer, if given."""
    engine: str = "hf"
    """``hf`` (transformers, CPU or GPU), ``sglang`` (SGLang's offline ``Engine``); ``server`` is set by ``server``."""
    server: str | None = None
    """URL of an OpenAI-compatible chat server (``http://host:port`` or ``.../v1``)."""
    served_model: str | None = None
    """The ``model`` field sent to the server (default: the first of its ``/v1/models``)."""
    tokenizer: str | None = None
    """Tokenizer folder when it differs from ``model`` (with ``server``: checks prompt lengths locally)."""
    device: str | None = None
    dtype: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    turns: str = "last"
    samples: int = 1
    """Answers per prompt, each its own output row (seeds differ)."""
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    """Run seed; each row's seed is derived from it (:func:`row_seed`)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template (``enable_thinking=true``)."""
    max_context: int | None = None
    """Prompt + answer tokens allowed (default: the model's ``max_position_embeddings``)."""
    keep_length: bool = False
    """Keep answers cut by ``max_new_tokens`` (marked ``finish_reason: length``) instead of skipping them."""
    batch_size: int = 16
    """Prompts generated together (local engines) or requests in flight (``server``)."""
    shard_rows: int = 1000
    """Input rows per output shard."""
    output_format: str = "jsonl"
    strict: bool = False
    """Fail on any row that would be skipped (malformed, over the context, cut by the length limit)."""
    timeout: float = 600.0
    """Seconds one server request may take."""
    retries: int = 8
    """Attempts per server request beyond the first (exponential backoff, capped at 30 s)."""
    token: str | None = None
    """Bearer token for the server (default: ``$OPENAI_API_KEY`` or ``$EAGLE3_TARGET_TOKEN``)."""
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.server:
            self.engine = "server"
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "server" and not self.server:
            raise ValueError("engine 'server' needs --server URL")
        if self.turns not in TURNS:
            raise ValueError(f"--turns must be one of {', '.join(TURNS)}, got {self.turns!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
        for name, low in (("samples", 1), ("max_new_tokens", 1), ("batch_size", 1), ("shard_rows", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        if self.retries < 0 or not self.timeout > 0:
            raise ValueError("--retries must be >= 0 and --timeout > 0")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"--max-context must be at least 2 tokens, got {self.max_context!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def manifest_path(self) -> Path:
        return Path(self.out) / MANIFEST

    def shard_name(self, k: int) -> str:
        return f"regen-{k:05d}.{self.output_format}"

    def sampling(self) -> dict[str, Any]:
        """The sampling settings every engine is given (and the manifest records)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "greedy": self.greedy}


def row_seed(run_seed: int, row: int, sample: int, turn: int) -> int:
    """The seed of one answer: a 63-bit hash of the run seed, the data row, the sample
    number and the turn, so a row's text does not depend on which rows share its batch
    or on the order requests finish in."""
    h = hashlib.sha256(f"{run_seed}:{row}:{sample}:{turn}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def default(name: str) -> Any:
    """The default of :class:`RegenConfig` field ``name`` (what the CLI shows)."""
    f = RegenConfig.__dataclass_fields__[name]
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]
