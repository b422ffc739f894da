"""`eagle3-target vocab`: supervised-token counts -> a draft-vocab mapping file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import torch
from safetensors import safe_open

from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import iter_samples
from eagle3_target.data.tokenizer import load_tokenizer
from eagle3_target.data.rows import sample_data_path
from eagle3_target.vocab import VocabMapping


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eagle3_target.cli", *args], capture_output=True,
                          text=True, env={**os.environ}, timeout=300)


def test_vocab_counts_supervised_tokens_specials_first(tmp_path, tiny_model_dir):
    data = tmp_path / "chats.jsonl"
    rows = sample_data_path().read_text().splitlines()[:80]
    data.write_text("\n".join(rows + ["{broken", json.dumps({"messages": [{"role": "user", "content": "q"}]})]) + "\n")
    out = tmp_path / "sub" / "vocab.safetensors"
    r = run_cli("vocab", "--model", str(tiny_model_dir), "--data", str(data), "--draft-vocab-size", "128",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = VocabMapping.load(out)
    assert r.stdout.startswith(f"draft vocabulary: 128 of 2048 target tokens -> {out} (mapping_id {m.mapping_id})")
    assert "malformed rows skipped: 1 (not JSON: 1)" in r.stdout
    assert "rows with no supervised token skipped: 1 (no assistant turn: 1)" in r.stdout
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"selected_token_ids", "selected_token_mask", "d2t", "t2d"}
        assert f.metadata()["mapping_id"] == m.mapping_id

    # Independent count: only tokens under the loss mask (positions 1..), never the prompt.
    tok = load_tokenizer(str(tiny_model_dir))
    counts: Counter = Counter()
    prompt_only: set = set()
    for s in iter_samples([data], ChatEncoder(tok)):
        if hasattr(s, "input_ids"):
            counts.update(t for t, k in zip(s.input_ids[1:], s.loss_mask[1:]) if k)
            prompt_only.update(t for t, k in zip(s.input_ids, s.loss_mask) if not k)
    specials = list(tok.all_special_ids)
    ids = m.selected_token_ids.tolist()
    assert ids[: len(specials)] == specials
    rest = ids[len(specials):]
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in specials]
    assert len(ranked) > len(rest)  # enough distinct supervised tokens to fill the vocabulary
    assert rest == ranked[: len(rest)]
    never_supervised = (prompt_only - set(counts)) - set(specials)
    assert never_supervised and not (set(rest) & never_supervised)
    assert m.target_vocab_size == 2048 and torch.equal(m.d2t + torch.arange(128), m.selected_token_ids)


def test_vocab_strict_and_bad_size(tmp_path, tiny_model_dir):
    data = tmp_path / "chats.jsonl"
    data.write_text(sample_data_path().read_text().splitlines()[0] + "\n{broken\n")
    out = tmp_path / "vocab.safetensors"
    r = run_cli("vocab", "--model", str(tiny_model_dir), "--data", str(data), "--draft-vocab-size", "64",
                "--out", str(out), "--strict")
    assert r.returncode == 2 and "--strict: malformed rows skipped: 1" in r.stderr
    assert not out.exists()
    r = run_cli("vocab", "--model", str(tiny_model_dir), "--data", str(data), "--draft-vocab-size", "99999",
                "--out", str(out))
    assert r.returncode == 2 and "--draft-vocab-size must be in [1, 2048]" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
