"""Rows from files: JSONL and Parquet chat data read in order, each row numbered
globally across the files, and the bundled sample chats.

Why JSONL is read line by line rather than through ``datasets``: its JSON loader infers
one schema for the whole file and fails the whole file on one bad line, so a single
malformed row could not be skipped and reported with its line number. Parquet has a
schema by construction, so ``datasets`` reads it (streaming, no cache copy).

What a JSONL row may be, and why: UTF-8 (RFC 8259), decoded strictly -- invalid bytes
were otherwise stored as U+FFFD in the training text without a word -- and no longer
than ``max_row_bytes`` (:data:`MAX_ROW_BYTES` by default): rendering and tokenising a
row took 270-320 times its size in memory on a 2-core AMD EPYC machine (a 4.8 MB line,
1.2 GiB; ``bench/bench_row_memory.py``), so one oversized line could take the machine
down. A row over the cap is never
held in memory whole: it is read in bounded pieces and skipped with its size. Such rows
are reported like any malformed row (``file:line``, reason), never dropped silently.

No torch here: the dump's render process imports this module and starts in a fraction
of a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = ["RawRow", "MAX_ROW_BYTES", "sample_data_path", "check_data_files", "count_rows", "iter_raw_rows",
           "worker_owns"]

MAX_ROW_BYTES = 1 << 20
"""The largest JSONL row read by default (``--max-row-mb 1``): about 250k tokens of
English text, and about 0.4 GiB of memory to render on the CPU machine."""

_PIECE = 1 << 20  # how much of an oversized line is held at a time while passing over it


def sample_data_path(name: str = "sample_chats.jsonl") -> Path:
    """A sample data file shipped with the package (``sample_chats.jsonl``: OpenAI
    messages; ``sample_sharegpt.jsonl``: ShareGPT conversations)."""
    return Path(str(resources.files("eagle3_target.data").joinpath(name)))


@dataclass(frozen=True)
class RawRow:
    """One row as read: ``index`` is global over all files, ``where`` is ``file:line``
    (JSONL) or ``file#row`` (Parquet); exactly one of ``value`` and ``error`` is set."""

    index: int
    where: str
    value: Any = None
    error: str | None = None
    reason: str = "not JSON"
    """The category of ``error`` that reports count rows by."""


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise ValueError(f"{path}: unsupported data file (use .jsonl, .json or .parquet)")


def check_data_files(paths: Sequence[str | Path]) -> list[Path]:
    """The paths as :class:`Path`, each an existing file of a known kind (else ValueError)."""
    if not paths:
        raise ValueError("no data files given")
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ValueError(f"data file {p} does not exist")
        _kind(p)
        out.append(p)
    return out


def _jsonl_records(path: Path, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """``(line number, bytes or None when over max_bytes, size)`` of each non-blank line,
    holding at most ``max_bytes`` (or one piece of an oversized line) at a time."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(max_bytes + 1):
            lineno += 1
            if raw.endswith(b"\n") or len(raw) <= max_bytes:
                if raw.strip():
                    yield lineno, raw, len(raw.rstrip(b"\r\n"))
                continue
            size, blank = len(raw), not raw.strip()
            while not raw.endswith(b"\n") and (raw := f.readline(_PIECE)):
                size, blank = size + len(raw), blank and not raw.strip()
            if not blank:  # a blank line is no row, however long
                yield lineno, None, size - (1 if raw.endswith(b"\n") else 0)


def _lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string with half a UTF-16 surrogate pair (a
    ``\\ud800`` escape), which no UTF-8 text can contain."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


def _parse_line(index: int, where: str, raw: bytes | None, size: int, max_bytes: int) -> RawRow:
    if raw is None:
        return RawRow(index, where, reason="row too large",
                      error=f"{size / 2**20:.1f} MiB, above the {max_bytes / 2**20:g} MiB limit on one row; "
                            f"raise --max-row-mb to read it (rendering a row takes about 300x its size in memory)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawRow(index, where, reason="invalid UTF-8",
                      error=f"bytes {raw[e.start:e.end]!r} at byte {e.start} of the line are not UTF-8; "
                            f"re-encode the file as UTF-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRow(index, where, error=f"{e.msg} at column {e.colno}")
    if "\\u" in text and _lone_surrogate(value):
        return RawRow(index, where, reason="invalid UTF-8",
                      error="a \\uXXXX escape encodes half a surrogate pair, which is not text")
    return RawRow(index, where, value=value)


def count_rows(paths: Sequence[str | Path]) -> int:
    """Rows in the files (non-blank JSONL lines, oversized ones included; Parquet row
    counts from the footer)."""
    n = 0
    for p in check_data_files(paths):
        if _kind(p) == "parquet":
            import pyarrow.parquet as pq

            n += pq.ParquetFile(p).metadata.num_rows
        else:
            n += sum(1 for _ in _jsonl_records(p, MAX_ROW_BYTES))
    return n


def worker_owns(row: int, num_shards: int, shard_index: int) -> bool:
    """Whether worker ``shard_index`` of ``num_shards`` handles data row ``row``: the
    dump's split of the rows over independent workers (``--num-shards/--shard-index``)."""
    return row % num_shards == shard_index


def iter_raw_rows(
    paths: Sequence[str | Path], *, start: int = 0, keep: Callable[[int], bool] | None = None,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> Iterator[RawRow]:
    """Rows of all files in order, numbered globally from 0. Rows before ``start`` and
    rows for which ``keep(index)`` is false are passed over without being parsed. A JSONL
    row that is not UTF-8 or exceeds ``max_row_bytes`` comes with ``error`` set."""
    index = 0
    for p in check_data_files(paths):
        if _kind(p) == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(p).metadata.num_rows
            if index + rows <= start:
                index += rows
                continue
            from datasets import load_dataset

            ds = load_dataset("parquet", data_files=str(p), split="train", streaming=True)
            for j, row in enumerate(ds):
                if index >= start and (keep is None or keep(index)):
                    yield RawRow(index, f"{p.name}#{j}", value=row)
                index += 1
            continue
        for lineno, raw, size in _jsonl_records(p, max_row_bytes):
            if index >= start and (keep is None or keep(index)):
                yield _parse_line(index, f"{p.name}:{lineno}", raw, size, max_row_bytes)
            index += 1
