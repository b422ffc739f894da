"""Kill -9 the real ``eagle3-target dump`` process, rerun it, and compare the result with
an uninterrupted run byte for byte; a file under a finished shard's name is never
rewritten; a corrupted shard fails ``verify`` and the rerun repairs it."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batches import files_of, first_sample_chats
from eagle3_target.dump.faults import KILL_ENV
from eagle3_target.dump.format import read_manifest

N_ROWS = 300
SEED = 5


def cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "eagle3_target.cli", "dump", "--data", str(data), "--out", str(out),
            "--mode", "hidden", "--device", "cpu", "--batch-tokens", "1024", "--shard-size-mb", "0.25",
            "--no-progress", *extra]


def env(**kw: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop(KILL_ENV, None)
    e.update(kw)
    return e


def finished_shards(d: Path) -> dict[str, tuple[int, int]]:
    """Files under a final shard name: complete by construction (renamed after fsync)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.glob("shard-*.safetensors")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return first_sample_chats(tmp_path_factory.mktemp("data"), N_ROWS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, tiny_model_dir) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("ref") / "d"
    t0 = time.monotonic()
    r = subprocess.run(cmd(out, data), env=env(), capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "dump complete" in r.stdout and f"{N_ROWS} samples" in r.stdout
    assert len(read_manifest(out / "manifest.json")["shards"]) >= 8
    return out, elapsed


@pytest.mark.slow
def test_kill9_at_random_moments_and_at_every_commit_step(tmp_path, data, reference):
    ref, elapsed = reference
    out = tmp_path / "d"
    seen: dict[str, tuple[int, int]] = {}
    rng = random.Random(SEED)

    def check_no_rewrite() -> None:
        now = finished_shards(out)
        for name, stat in seen.items():
            assert now.get(name) == stat, f"{name} was rewritten or removed"
        seen.update(now)

    # Each step of a shard's commit: temp file written, renamed, recorded; and mid-shard.
    for point in ("shard_written:2", "shard_renamed:1", "manifest_written:2", "batch_done:3"):
        r = subprocess.run(cmd(out, data), env=env(**{KILL_ENV: point}), capture_output=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
        listed = {e["file"] for e in read_manifest(out / "manifest.json")["shards"]}
        on_disk = set(finished_shards(out))
        if point.startswith("shard_written"):  # killed with a complete temp file, not renamed
            assert list(out.glob(".tmp-shard-*")) and on_disk == listed
        elif point.startswith("shard_renamed"):  # killed with a renamed shard the manifest lacks
            assert len(on_disk - listed) == 1
        elif point.startswith("manifest_written"):
            assert on_disk == listed
        else:  # killed in the main thread: the writer may be between a rename and its record
            assert listed <= on_disk and len(on_disk - listed) <= 1
        check_no_rewrite()
    # Random moments: one during startup (imports, model load, re-hashing), then at random
    # instants while shards are being produced -- chosen by progress, not wall time, so
    # the test holds on a loaded machine as on an idle one. These runs render in a child
    # process (killed with its parent), yet must give the reference's bytes.
    total = len(read_manifest(ref / "manifest.json")["shards"])
    listed_now = len(read_manifest(out / "manifest.json")["shards"])
    targets = sorted(rng.sample(range(listed_now + 2, total - 2), 3))
    for target in [None, *targets]:
        p = subprocess.Popen(cmd(out, data, "--render", "process"), env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if target is None:
            time.sleep(rng.uniform(0.2, 2.0))
        else:
            while p.poll() is None and len(read_manifest(out / "manifest.json")["shards"]) < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        assert p.poll() is None, "the dump finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait()
        check_no_rewrite()
    # The last kill may land after the dump recorded its final shard (the process was still
    # alive, exiting); the resume then has nothing left to show a progress bar for.
    work_left = not read_manifest(out / "manifest.json").get("complete")
    r = subprocess.run(cmd(out, data, "--progress"), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    bar = r.stderr
    if not work_left:
        fresh = subprocess.run(cmd(tmp_path / "fresh", data, "--progress"), env=env(),
                               capture_output=True, text=True, timeout=300)
        assert fresh.returncode == 0, fresh.stderr
        bar = fresh.stderr
    assert "tok/s" in bar and "MB/s" in bar and f"/{N_ROWS} [" in bar  # the progress bar
    assert "dump complete" in r.stdout
    if work_left:
        assert "shards written" in r.stdout
        assert re.search(r"after loading the target \(\d+\.\d s\): [\d,]+ tokens/s", r.stdout), r.stdout
    else:  # a complete dump's rerun checks its shards and never loads the target
        assert "already complete" in r.stdout and "without loading the target" in r.stdout, r.stdout
    check_no_rewrite()
    assert files_of(out) == files_of(ref)
    assert not list(out.glob(".tmp-*"))
    v = subprocess.run([sys.executable, "-m", "eagle3_target.cli", "verify", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and "OK:" in v.stdout, v.stdout


@pytest.mark.slow
def test_corrupt_shard_verify_fails_rerun_repairs(tmp_path, data, reference):
    ref, _ = reference
    out = tmp_path / "d"
    import shutil

    shutil.copytree(ref, out)
    victim = sorted(out.glob("shard-*.safetensors"))[3]
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0x01  # one bit, in the last tensor's data
    victim.write_bytes(bytes(raw))
    verify = [sys.executable, "-m", "eagle3_target.cli", "verify", str(out)]
    v = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert v.returncode == 1 and f"FAIL {victim.name}: sha256 mismatch" in v.stdout
    r = subprocess.run(cmd(out, data), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "repaired 1" in r.stdout and "shards written 0" in r.stdout
    assert files_of(out) == files_of(ref)
    assert subprocess.run(verify, capture_output=True, timeout=120).returncode == 0
