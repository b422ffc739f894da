"""The on-disk format of a regeneration: shards of OpenAI ``messages`` rows (JSONL or
Parquet) and the manifest that lists them.

Layout of an output folder::

    manifest.json          config, shards (input rows covered, sha256, counts), summary
    regen-00000.jsonl      output rows of input rows [0, shard_rows), in input order
    regen-00001.jsonl      ...
    .lock, .tmp-*          the writer's lock and temporary files

Shard ``k`` holds the answers to input rows ``[k*R, (k+1)*R)``: which rows a shard
covers never depends on how far a run got, so a rerun redoes exactly the unfinished
shards. Each line is one row ``{"messages", "tools"?, "source": {"where", "row",
"sample"}, "finish_reason"}``; the bytes are a function of the rows alone (keys in a
fixed order, no times). A shard is written under ``.tmp-``, fsynced and renamed, and
listed in the manifest only after the rename.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

from eagle3_target.dump.format import json_bytes, sha256_file, write_atomic

__all__ = ["FORMAT", "shard_bytes", "write_shard", "read_shard", "check_shard", "read_manifest",
           "write_manifest"]

FORMAT = "eagle3-regen-v1"


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def _parquet(rows: Sequence[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Absent keys (``reasoning_content`` on some messages, ``tools`` on some rows)
    # become nulls in Parquet's one schema; readers of this package drop them again.
    table = pa.Table.from_pylist(list(rows)) if rows else pa.table({"messages": pa.array([], pa.null())})
    buf = io.BytesIO()
    # No creation time or library version in the file: the bytes depend on the rows only.
    pq.write_table(table, buf, compression="zstd", write_statistics=False, store_schema=True)
    return buf.getvalue()


def shard_bytes(rows: Sequence[dict[str, Any]], output_format: str) -> bytes:
    """The bytes of a shard holding ``rows``."""
    return _jsonl(rows) if output_format == "jsonl" else _parquet(rows)


def write_shard(path: Path, rows: Sequence[dict[str, Any]], output_format: str) -> tuple[str, int]:
    """Writes a shard atomically; ``(sha256, bytes)``."""
    import hashlib

    data = shard_bytes(rows, output_format)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def read_shard(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a shard (JSONL or Parquet)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_shard(path: Path, entry: dict[str, Any]) -> str | None:
    """None when the shard on disk is the one the manifest lists, else what is wrong."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if sha256_file(path) != entry["sha256"]:
        return "sha256 differs from the manifest"
    return None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A regeneration manifest; ValueError naming the file when it is not one."""
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} manifest (a dump folder? use a new --out folder)")
    return m


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_atomic(path, json_bytes(manifest))

