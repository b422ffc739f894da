"""`dump --server` gives the same bytes whatever the server does beside it: a dump while
other clients keep the server busy, and a dump killed part-way and run again, are
byte-identical to a dump against a quiet server (every request runs alone on the
engine, so no merged batch's padding reaches the shards)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from batches import first_sample_chats
from eagle3_target.client import RemoteTarget
from eagle3_target.dump import DumpConfig, run_dump
from eagle3_target.dump.format import read_manifest
from eagle3_target.server.process import ServerProcess

N_ROWS = 24
FLAGS = dict(batch_tokens=1500, shard_size_mb=0.3)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return first_sample_chats(tmp_path_factory.mktemp("data"), N_ROWS)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    token = "same-" + secrets.token_urlsafe(12)
    srv = ServerProcess(["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"],
                        token=token)
    srv.start()
    yield srv, token
    srv.stop()


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.suffix in (".safetensors", ".json")}


def _dump(out: Path, srv: ServerProcess, tiny_model_dir: Path, data_file: Path) -> None:
    s = run_dump(DumpConfig(out=str(out), data=[str(data_file)], mode="logits", server=[srv.url],
                            tokenizer=str(tiny_model_dir), **FLAGS), log=lambda s: None)
    assert s.complete and s.samples == N_ROWS


@pytest.fixture(scope="module")
def quiet(tmp_path_factory, server, tiny_model_dir, data_file):
    srv, token = server
    out = tmp_path_factory.mktemp("quiet") / "d"
    mp = pytest.MonkeyPatch()
    mp.setenv("EAGLE3_TARGET_TOKEN", token)
    try:
        _dump(out, srv, tiny_model_dir, data_file)
    finally:
        mp.undo()
    files = _files(out)
    assert sum(n.startswith("shard-") for n in files) >= 3
    return files


def test_a_dump_beside_other_clients_traffic_is_byte_identical(tmp_path, monkeypatch, server,
                                                                tiny_model_dir, data_file, quiet):
    srv, token = server
    stop = threading.Event()
    merged = []

    def other_client(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with RemoteTarget(srv.url, token=token, mode="logits") as rt:
            while not stop.is_set():
                ids = torch.randint(0, rt.vocab_size, (2, 257), generator=g)
                rt.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids))
                merged.append(rt.stats["requests"])

    threads = [threading.Thread(target=other_client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        monkeypatch.setenv("EAGLE3_TARGET_TOKEN", token)
        _dump(tmp_path / "busy", srv, tiny_model_dir, data_file)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert merged  # the other clients were served while the dump ran
    assert _files(tmp_path / "busy") == quiet


def test_a_dump_killed_and_run_again_is_byte_identical(tmp_path, server, tiny_model_dir, data_file,
                                                       quiet):
    srv, token = server
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "eagle3_target.cli", "dump", "--server", srv.url, "--tokenizer",
           str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--mode", "logits",
           "--batch-tokens", str(FLAGS["batch_tokens"]), "--shard-size-mb", str(FLAGS["shard_size_mb"]),
           "--no-progress"]
    env = {**os.environ, "EAGLE3_TARGET_TOKEN": token}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    manifest = out / "manifest.json"
    while True:  # kill -9 once the first shard is listed
        try:
            if read_manifest(manifest).get("shards"):
                break
        except (OSError, ValueError):
            pass
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert len(read_manifest(manifest)["shards"]) < sum(n.startswith("shard-") for n in quiet)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _files(out) == quiet
