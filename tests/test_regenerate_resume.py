"""Kill -9 the real ``eagle3-target regenerate`` process mid-run, rerun the same command,
and compare every shard with an uninterrupted run's byte for byte; a damaged finished
shard is redone on the rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eagle3_target.data.rows import sample_data_path
from eagle3_target.dump.faults import KILL_ENV

N_ROWS = 7


def cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "eagle3_target.cli", "regenerate", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--max-new-tokens", "6", "--shard-rows", "2", "--batch-size", "2",
            "--keep-length", "--temperature", "0.8", "--seed", "3", "--no-progress", *extra]


def env(**kw: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop(KILL_ENV, None)
    e.update(kw)
    return e


def shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("regen-*"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "chats.jsonl"
    p.write_text("\n".join(sample_data_path().read_text().splitlines()[:N_ROWS]) + "\n")
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("ref") / "r"
    r = subprocess.run(cmd(out, data), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{N_ROWS} rows written from {N_ROWS} input rows in 4 shards" in r.stdout
    return out


@pytest.mark.parametrize("point", ["regen_round_done:3", "regen_shard_renamed:2", "regen_manifest_written:1"])
def test_kill_9_then_rerun_gives_the_same_shards(tmp_path, data, reference, point):
    out = tmp_path / "o"
    r = subprocess.run(cmd(out, data), env=env(**{KILL_ENV: point}), capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) < 4
    kept = {e["file"]: (out / e["file"]).stat().st_ino for e in manifest["shards"]}
    r = subprocess.run(cmd(out, data), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "complete" in r.stdout
    assert shards(out) == shards(reference)
    # Finished shards were checked and kept, not rewritten.
    assert {f: (out / f).stat().st_ino for f in kept} == kept
    assert not list(out.glob(".tmp-*"))


def test_a_damaged_shard_is_redone(tmp_path, data, reference):
    out = tmp_path / "o"
    subprocess.run(["cp", "-r", str(reference), str(out)], check=True)
    victim = out / "regen-00001.jsonl"
    victim.write_bytes(victim.read_bytes().replace(b'"role"', b'"rule"', 1))
    r = subprocess.run(cmd(out, data), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "regen-00001.jsonl: sha256 differs from the manifest; regenerating it" in r.stdout
    assert "1 shards written (1 redone after a failed check)" in r.stdout
    assert shards(out) == shards(reference)
