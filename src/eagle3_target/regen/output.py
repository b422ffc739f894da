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

from eagle3_target.dump import format as dump_format
from eagle3_target.dump.format import json_bytes, sha256_file, write_atomic

__all__ = ["FORMAT", "drop_nulls", "shard_bytes", "write_shard", "read_shard", "check_shard", "read_manifest",
           "write_manifest"]

FORMAT = "eagle3-regen-v1"


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def drop_nulls(value: Any) -> Any:
    """``value`` with every null-valued dict key removed (recursively): how a Parquet
    shard's rows read back, since Parquet's one schema gives absent keys as nulls."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _parquet(rows: Sequence[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One schema from every row (``from_pylist`` would take the first row's keys and
    # silently drop ``tools`` or ``reasoning_content`` that only later rows have).
    # Absent keys become nulls; the rows must read back the same, or nothing is written.
    why = None
    try:
        table = (pa.Table.from_struct_array(pa.array(list(rows))) if rows
                 else pa.table({"messages": pa.array([], pa.null())}))
        if drop_nulls(table.to_pylist()) != drop_nulls(list(rows)):
            why = "they do not read back the same"
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        why = str(e).splitlines()[0]
    if why is not None:
        raise ValueError(f"--format parquet cannot hold these rows ({why}: rows of one shard differ in the "
                         f"types of a field, tool schemas say); use --format jsonl")
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
    """The rows of a shard (JSONL or Parquet; Parquet's nulls dropped, see :func:`drop_nulls`)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return drop_nulls(pq.read_table(path).to_pylist())
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
    return dump_format.read_manifest(path, FORMAT, hint="a dump folder? use a new --out folder")


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_atomic(path, json_bytes(manifest))

