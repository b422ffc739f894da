"""Truncation is never silent: ``--max-length``'s default is stated, and the rows cut and
the supervised tokens lost are counted per sample, per shard, in the manifest's summary
and the printed one, with a warning above a few percent; ``--strict`` refuses it."""

from __future__ import annotations

import json

import pytest
from first_hour import run_cli

from eagle3_target.data.chat import MAX_LENGTH, ChatEncoder
from eagle3_target.data.rows import RawRow
from eagle3_target.data.samples import TRUNCATION_WARN_SHARE, Sample, encode_row

SHORT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


def _long(n: int) -> dict:
    """A chat whose answer is long: ``n`` words."""
    return {"messages": [{"role": "user", "content": "count for me"},
                         {"role": "assistant", "content": " ".join(f"w{i}" for i in range(n))}]}


def _data(tmp_path, rows):
    p = tmp_path / "chats.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_a_truncated_sample_carries_the_supervised_tokens_it_lost(tok):
    row = RawRow(0, "x:1", _long(200))
    full = encode_row(row, ChatEncoder(tok))
    cut = encode_row(row, ChatEncoder(tok, max_length=40))
    assert isinstance(full, Sample) and full.lost_supervised is None
    assert isinstance(cut, Sample) and len(cut) == 40
    assert cut.lost_supervised == full.supervised - cut.supervised > 0
    assert encode_row(RawRow(0, "x:1", SHORT), ChatEncoder(tok, max_length=40)).lost_supervised is None


def test_the_default_is_stated_in_help_and_docs():
    from pathlib import Path

    for cmd in ("dump", "vocab"):
        r = run_cli(cmd, "--help")
        assert f"default {MAX_LENGTH}" in " ".join(r.stdout.split()), cmd
    docs = (Path(__file__).resolve().parent.parent / "docs" / "dump.md").read_text()
    assert f"the default is {MAX_LENGTH}" in docs and f"{TRUNCATION_WARN_SHARE:.0%}" in docs
    # Every default that changes what a dump stores, in --help and in the docs.
    from eagle3_target.dump.config import default

    helptext = " ".join(run_cli("dump", "--help").stdout.split())
    flat_docs = " ".join(docs.split())
    for name in ("mode", "max_length", "batch_tokens", "shard_size_mb", "num_shards", "shard_index"):
        value = f"{default(name):g}" if isinstance(default(name), float) else str(default(name))
        assert f"default {value}" in helptext, name
        assert f"--{name.replace('_', '-')} {value}" in flat_docs, name


@pytest.mark.parametrize("render", ["thread", "process"])
def test_the_manifest_and_summary_count_what_was_cut(render, tmp_path, tiny_target, tok):
    from eagle3_target.dump import DumpConfig, run_dump

    rows = [SHORT, _long(300), SHORT, _long(120)]
    cfg = DumpConfig(out=str(tmp_path / "d"), data=[str(_data(tmp_path, rows))], mode="logits",
                     max_length=64, render=render, progress=False, batch_tokens=128, shard_size_mb=0.001)
    encoder = ChatEncoder(tok, max_length=64)
    want = [encode_row(RawRow(i, "", r), encoder) for i, r in enumerate(rows)]
    lost = sum(s.lost_supervised or 0 for s in want)
    summary = run_dump(cfg, source=tiny_target, tokenizer=tok, log=lambda s: None)
    assert summary.truncated_rows == 2 and summary.truncated_supervised == lost > 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    per_shard = [e.get("truncated") for e in manifest["shards"]]
    assert sum(1 for e in per_shard if e) == 2  # one long row a shard here
    assert sum(e["supervised_tokens_lost"] for e in per_shard if e) == lost
    assert manifest["summary"]["truncated"] == {"rows": 2, "supervised_tokens_lost": lost}
    text = "\n".join(summary.lines())
    assert f"truncated to --max-length 64: 2 rows, {lost:,} supervised tokens cut" in text
    assert "warning:" in text and summary.truncated_share > TRUNCATION_WARN_SHARE


def test_a_dump_without_truncation_records_none(tmp_path, tiny_target, tok):
    from eagle3_target.dump import DumpConfig, run_dump

    cfg = DumpConfig(out=str(tmp_path / "d"), data=[str(_data(tmp_path, [SHORT]))], mode="logits",
                     render="thread", progress=False)
    summary = run_dump(cfg, source=tiny_target, tokenizer=tok, log=lambda s: None)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert "truncated" not in manifest["summary"] and "truncated" not in manifest["shards"][0]
    assert not any("truncated" in line for line in summary.lines())


def test_a_small_cut_is_counted_without_a_warning(tmp_path, tiny_target, tok):
    from eagle3_target.dump import DumpConfig, run_dump

    encoder = ChatEncoder(tok)
    n = len(encode_row(RawRow(0, "", _long(60)), encoder))
    rows = [_long(60)] * 30 + [_long(61)]  # only the last row is one word too long
    cfg = DumpConfig(out=str(tmp_path / "d"), data=[str(_data(tmp_path, rows))], mode="hidden",
                     max_length=n, render="thread", progress=False)
    summary = run_dump(cfg, source=tiny_target, tokenizer=tok, log=lambda s: None)
    assert summary.truncated_rows == 1 and 0 < summary.truncated_share < TRUNCATION_WARN_SHARE
    text = "\n".join(summary.lines())
    assert "truncated to --max-length" in text and "warning:" not in text


def test_strict_refuses_truncation_before_writing(tmp_path, tiny_model_dir):
    data = _data(tmp_path, [SHORT, _long(300)])
    out = tmp_path / "d"
    r = run_cli("dump", "--model", tiny_model_dir, "--data", data, "--out", out, "--max-length", "64",
                "--strict", "--mode", "logits")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "1 rows longer than --max-length 64 would lose" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "manifest.json").exists()
    r = run_cli("vocab", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "v.safetensors",
                "--draft-vocab-size", "8", "--max-length", "64")
    assert r.returncode == 0 and "truncated to --max-length 64: 1 rows" in r.stdout
