"""`dump --server`: the target runs in a real `eagle3-target serve` process and the dump
reaches it through `eagle3_target.client.RemoteTarget`; the dataset equals the one made
in process."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batches import draft_vocab_file, first_sample_chats
from eagle3_target.dump import DumpConfig, run_dump
from eagle3_target.dump.reader import Eagle3Dataset
from eagle3_target.server.process import ServerProcess
from eagle3_target.dump.format import read_manifest
from eagle3_target.dump.verify import verify_dump

N_ROWS = 24


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return first_sample_chats(tmp_path_factory.mktemp("data"), N_ROWS)


@pytest.fixture(scope="module")
def mapping_file(tmp_path_factory, tiny_target, tok, data_file) -> Path:
    return draft_vocab_file(tmp_path_factory.mktemp("vocab"), tok, data_file, tiny_target.vocab_size,
                            [tok.eos_token_id])


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    token = "dump-" + secrets.token_urlsafe(12)
    srv = ServerProcess(["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"], token=token)
    srv.start()
    yield srv, token
    srv.stop()


def assert_same_dataset(a: Path, b: Path) -> None:
    x, y = Eagle3Dataset(a), Eagle3Dataset(b)
    assert len(x) == len(y) == N_ROWS
    for i in range(len(x)):
        assert x.row_index(i) == y.row_index(i)
        p, q = x[i], y[i]
        assert p.keys() == q.keys()
        for k in p:
            if p[k].dtype.is_floating_point:
                # The server batches differently (its own padding), so floats agree to rounding.
                torch.testing.assert_close(p[k], q[k], rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(p[k], q[k]), (i, k)


@pytest.mark.parametrize("mode", ["hidden", "draft", "logits"])
def test_dump_over_the_server_equals_the_local_dump(tmp_path, monkeypatch, server, tiny_target, tiny_model_dir,
                                                    tok, data_file, mapping_file, mode):
    srv, token = server
    vocab = str(mapping_file) if mode == "draft" else None
    kw = dict(data=[str(data_file)], mode=mode, vocab=vocab, batch_tokens=1500, shard_size_mb=0.3)
    run_dump(DumpConfig(out=str(tmp_path / "local"), **kw), source=tiny_target, tokenizer=tok, log=lambda s: None)
    monkeypatch.setenv("EAGLE3_TARGET_TOKEN", token)
    s = run_dump(DumpConfig(out=str(tmp_path / "remote"), server=[srv.url], tokenizer=str(tiny_model_dir), **kw),
                 log=lambda s: None)
    assert s.complete and s.samples == N_ROWS
    assert verify_dump(tmp_path / "remote").ok
    cfg = read_manifest(tmp_path / "remote" / "manifest.json")["config"]
    assert cfg["engine"] == "server" and cfg["dtype"] == "float32" and cfg["hidden_size"] == tiny_target.hidden_size
    assert cfg["aux_layer_ids"] == tiny_target.aux_layer_ids
    assert_same_dataset(tmp_path / "local", tmp_path / "remote")
    if mode == "hidden":  # the LM head fetched from the server is the model's
        lh = (tmp_path / "local" / "lm_head.safetensors").read_bytes()
        assert (tmp_path / "remote" / "lm_head.safetensors").read_bytes() == lh


def test_dump_cli_with_server_url_and_token_in_the_url(tmp_path, server, tiny_model_dir, data_file):
    srv, token = server
    url = srv.url.replace("http://", f"http://dump:{token}@")
    env = {k: v for k, v in os.environ.items() if k != "EAGLE3_TARGET_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "eagle3_target.cli", "dump", "--server", url, "--tokenizer",
                        str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "d")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{N_ROWS} samples" in r.stdout and "dump complete" in r.stdout
    # Without the token the server refuses, and the dump says so without writing anything.
    r = subprocess.run([sys.executable, "-m", "eagle3_target.cli", "dump", "--server", srv.url, "--tokenizer",
                        str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "e")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "401" in r.stderr
    assert not (tmp_path / "e").exists()


def test_server_needs_a_tokenizer(tmp_path, data_file):
    with pytest.raises(ValueError, match="--server needs --tokenizer"):
        run_dump(DumpConfig(out=str(tmp_path / "d"), data=[str(data_file)], server=["http://127.0.0.1:9"]))
    assert not (tmp_path / "d").exists()


def test_a_server_dump_skips_rows_longer_than_the_servers_context(tmp_path, monkeypatch, server, tiny_target,
                                                                   tiny_model_dir, tok, data_file):
    """With ``--max-length 0`` the dump reads the context from the server's model info
    (``max_context``) and never sends a row longer than it."""
    from eagle3_target.data.samples import MALFORMED

    srv, token = server
    context = tiny_target.model.config.max_position_embeddings
    long_row = {"messages": [{"role": "user", "content": "tell me everything"},
                             {"role": "assistant", "content": " ".join(f"w{i}" for i in range(3 * context))}]}
    data = tmp_path / "long.jsonl"
    data.write_text(data_file.read_text() + json.dumps(long_row) + "\n")
    monkeypatch.setenv("EAGLE3_TARGET_TOKEN", token)
    s = run_dump(DumpConfig(out=str(tmp_path / "d"), data=[str(data)], server=[srv.url], tokenizer=str(tiny_model_dir),
                            max_length=None), log=lambda m: None)
    assert s.complete and s.samples == N_ROWS
    assert s.skipped[MALFORMED] == {"longer than the model's context": 1}
    assert f"max_position_embeddings {context}" in s.examples[MALFORMED][0]["detail"]
