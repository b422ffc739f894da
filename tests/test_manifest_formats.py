"""A dump and a regeneration each refuse the other's folder: the real CLI, pointed at a
folder whose manifest.json is of the other format, says which format it found and what
to do, and changes nothing there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eagle3_target.data.rows import sample_data_path
from eagle3_target.dump.format import FORMAT as DUMP_FORMAT
from eagle3_target.dump.format import read_manifest as read_dump_manifest
from eagle3_target.regen.output import FORMAT as REGEN_FORMAT
from eagle3_target.regen.output import read_manifest as read_regen_manifest


def folder_with(tmp_path: Path, fmt: str) -> Path:
    d = tmp_path / "out"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"format": fmt, "config": {}, "shards": []}))
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("command, found, expected, hint", [
    ("dump", REGEN_FORMAT, DUMP_FORMAT, "a regeneration folder? use a new --out folder"),
    ("regenerate", DUMP_FORMAT, REGEN_FORMAT, "a dump folder? use a new --out folder"),
])
def test_each_job_refuses_the_others_folder_and_changes_nothing(tmp_path, command, found, expected, hint):
    out = folder_with(tmp_path, found)
    before = snapshot(out)
    extra = ["--max-new-tokens", "4"] if command == "regenerate" else []
    p = subprocess.run([sys.executable, "-m", "eagle3_target.cli", command, "--data", str(sample_data_path()),
                        "--out", str(out), "--device", "cpu", "--no-progress", *extra],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert f"not an {expected} manifest (an {found} manifest; {hint})" in p.stderr
    assert snapshot(out) == before


def test_the_readers_name_what_they_found(tmp_path):
    with pytest.raises(ValueError, match=f"not an {DUMP_FORMAT} manifest \\(an {REGEN_FORMAT} manifest"):
        read_dump_manifest(folder_with(tmp_path / "a", REGEN_FORMAT) / "manifest.json")
    with pytest.raises(ValueError, match=f"not an {REGEN_FORMAT} manifest \\(an {DUMP_FORMAT} manifest"):
        read_regen_manifest(folder_with(tmp_path / "b", DUMP_FORMAT) / "manifest.json")
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no manifest format"):
        read_dump_manifest(tmp_path / "c.json")
    assert read_dump_manifest(folder_with(tmp_path / "d", DUMP_FORMAT) / "manifest.json")["format"] == DUMP_FORMAT
