"""Rows from files: JSONL and Parquet chat data read in order, each row numbered
globally across the files, and the bundled sample chats.

Why JSONL is read line by line rather than through ``datasets``: its JSON loader infers
one schema for the whole file and fails the whole file on one bad line, so a single
malformed row could not be skipped and reported with its line number. Parquet has a
schema by construction, so ``datasets`` reads it (streaming, no cache copy).

No torch here: the dump's render process imports this module and starts in a fraction
of a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = ["RawRow", "sample_data_path", "check_data_files", "count_rows", "iter_raw_rows", "worker_owns"]


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


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw.decode("utf-8", errors="replace")


def count_rows(paths: Sequence[str | Path]) -> int:
    """Rows in the files (non-blank JSONL lines; Parquet row counts from the footer)."""
    n = 0
    for p in check_data_files(paths):
        if _kind(p) == "parquet":
            import pyarrow.parquet as pq

            n += pq.ParquetFile(p).metadata.num_rows
        else:
            n += sum(1 for _ in _jsonl_lines(p))
    return n


def worker_owns(row: int, num_shards: int, shard_index: int) -> bool:
    """Whether worker ``shard_index`` of ``num_shards`` handles data row ``row``: the
    dump's split of the rows over independent workers (``--num-shards/--shard-index``)."""
    return row % num_shards == shard_index


def iter_raw_rows(
    paths: Sequence[str | Path], *, start: int = 0, keep: Callable[[int], bool] | None = None
) -> Iterator[RawRow]:
    """Rows of all files in order, numbered globally from 0. Rows before ``start`` and
    rows for which ``keep(index)`` is false are passed over without being parsed."""
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
        for lineno, line in _jsonl_lines(p):
            if index >= start and (keep is None or keep(index)):
                try:
                    yield RawRow(index, f"{p.name}:{lineno}", value=json.loads(line))
                except json.JSONDecodeError as e:
                    yield RawRow(index, f"{p.name}:{lineno}", error=f"{e.msg} at column {e.colno}")
            index += 1
