"""The `eagle3-target` CLI, run as a real subprocess where files are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from eagle3_target.cli import main


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eagle3_target.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ}, timeout=300)


def test_make_tiny_model_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        r = run_cli("make-tiny-model", str(d), "--layers", "4", "--hidden", "64", "--vocab", "600")
        assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = tmp_path / "c"
    assert run_cli("make-tiny-model", str(c), "--layers", "4", "--hidden", "64", "--vocab", "600",
                   "--seed", "1").returncode == 0
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_make_tiny_model_refuses_non_empty_dir(tmp_path):
    (tmp_path / "x").write_text("keep me")
    r = run_cli("make-tiny-model", str(tmp_path))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "x").read_text() == "keep me"


def test_tiny_tokenizer_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    r = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
    ids = r["input_ids"]
    kept = tok.decode([i for i, m in zip(ids, r["assistant_masks"]) if m])
    assert kept == "hello you<|im_end|>"


def test_forward_writes_documented_shapes(tmp_path, tiny_model_dir):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "The draft model guesses tokens."}) + "\n"
                   + json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    out = tmp_path / "sup.safetensors"
    r = run_cli("forward", "--model", str(tiny_model_dir), "--input", str(inp), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout
    with safe_open(str(out), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    b, s = t["input_ids"].shape
    assert b == 2 and s > 3
    assert t["logits"].shape == (b, s, 2048) and t["logits"].dtype == torch.float32
    assert t["aux_hidden_states"].shape == (b, s, 3 * 128)
    assert t["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (s - 3)
    assert t["input_ids"][1, :2].tolist() == [6, 7]  # shifted
    assert json.loads(meta["aux_layer_ids"]) == [1, 3, 4]


def test_forward_rejects_bad_rows(tmp_path, tiny_model_dir):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"tokens": [1, 2]}\n')
    r = run_cli("forward", "--model", str(tiny_model_dir), "--input", str(inp),
                "--out", str(tmp_path / "o.safetensors"))
    assert r.returncode != 0 and "in.jsonl:1" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_info_json(tiny_model_dir, capsys):
    assert main(["info", "--model", str(tiny_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_hidden_layers"] == 8 and info["hidden_size"] == 128
    assert info["vocab_size"] == 2048 and info["default_aux_layer_ids"] == [1, 3, 4]


def test_bench_runs(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "--batch", "2", "--seq-len", "32",
                 "--runs", "2", "--warmup", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 64 and res["tokens_per_s"] > 0 and res["runs"] == 2


def test_help_for_every_subcommand():
    for cmd in ("make-tiny-model", "info", "forward", "bench", "demo"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, cmd


def test_engine_args_reach_the_engine(tiny_model_dir):
    import argparse

    from eagle3_target.cli.common import add_model_args, load_target

    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--model", str(tiny_model_dir), "--engine-arg", "attn_implementation=eager"])
    target = load_target(args)
    try:
        assert target.runner.model.config._attn_implementation == "eager"
    finally:
        target.close()
    bad = p.parse_args(["--model", str(tiny_model_dir), "--engine-arg", "no_value"])
    import pytest

    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        load_target(bad)
