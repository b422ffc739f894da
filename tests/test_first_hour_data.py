"""What a new user's data and model folders meet: a folder without a tokenizer, a
tokenizer of another model, rows with roles no template knows, and a dump that stores
nothing. Each is said in one line, before work, or by a non-zero exit."""

from __future__ import annotations

import json

import pytest
from first_hour import model_without_tokenizer, run_cli

from eagle3_target.data.chat import row_to_messages
from eagle3_target.data.samples import Skipped, encode_row
from eagle3_target.data.rows import RawRow
from eagle3_target.data.tokenizer import check_tokenizer_fits, load_tokenizer, missing_tokenizer_files
from eagle3_target.errors import InputError, MalformedRow
from eagle3_target.tiny import TinyModelConfig, make_tiny_model

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


@pytest.fixture(scope="module")
def bare_model(tiny_model_dir, tmp_path_factory):
    return model_without_tokenizer(tiny_model_dir, tmp_path_factory.mktemp("bare") / "m")


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A model of 300 embedding rows, for a tokenizer (the 2048-token tiny one) too large for it."""
    return make_tiny_model(tmp_path_factory.mktemp("small") / "m", TinyModelConfig(layers=4, vocab=300))


def _chats(tmp_path, rows, name="chats.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_a_folder_without_tokenizer_files_is_named_with_what_it_has(bare_model):
    why = missing_tokenizer_files(bare_model)
    assert "has no tokenizer files" in why and "tokenizer.json" in why and "model.safetensors" in why
    with pytest.raises(InputError, match="no tokenizer files.*--tokenizer DIR"):
        load_tokenizer(str(bare_model))


def test_an_empty_tokenizer_file_is_refused(tiny_model_dir, tmp_path):
    d = model_without_tokenizer(tiny_model_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel",
                                                  "vocab": {"a": 0}, "unk_token": "a"}}))
    with pytest.raises(InputError, match=r"tokenizer in .* cannot be read \(KeyError"):
        load_tokenizer(str(d))
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({"a": 0}, unk_token="a")).save(str(d / "tokenizer.json"))
    with pytest.raises(InputError, match=r"loads with 1 token\(s\)"):
        load_tokenizer(str(d))


@pytest.mark.parametrize("cmd", [
    ["vocab", "--draft-vocab-size", "8", "--out", "{tmp}/v.safetensors"],
    ["dump", "--out", "{tmp}/d"],
    ["demo"],
])
def test_commands_that_need_the_tokenizer_say_which_files_are_missing(cmd, bare_model, tmp_path):
    r = run_cli(*[c.format(tmp=tmp_path) for c in cmd], "--model", str(bare_model))
    assert r.returncode == 2, r.stderr
    assert "has no tokenizer files" in r.stderr and "tokenizer.json" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "v.safetensors").exists()


def test_forward_without_a_tokenizer_takes_ids_and_says_why_text_cannot_be_read(bare_model, tmp_path):
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    r = run_cli("forward", "--model", bare_model, "--input", ids, "--out", tmp_path / "a.safetensors")
    assert r.returncode == 0, r.stderr
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    r = run_cli("forward", "--model", bare_model, "--input", text, "--out", tmp_path / "b.safetensors")
    assert r.returncode == 2 and "a text row needs the model's tokenizer" in r.stderr
    assert "has no tokenizer files" in r.stderr and "Traceback" not in r.stderr


def test_info_reports_a_missing_tokenizer(bare_model, tiny_model_dir):
    r = run_cli("info", "--model", bare_model, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tokenizer"].startswith("UNUSABLE: ")
    assert "has no tokenizer files" in json.loads(r.stdout)["tokenizer"]
    r = run_cli("info", "--model", tiny_model_dir, "--json")
    assert json.loads(r.stdout)["tokenizer"].endswith(" tokens")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_any_row(tiny_model_dir, small_vocab_model,
                                                                         tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(InputError, match="vocabulary has 300: it belongs to another model"):
        check_tokenizer_fits(tok, 300)
    check_tokenizer_fits(tok, max(tok.get_vocab().values()) + 1)  # exactly fits
    out = tmp_path / "d"
    r = run_cli("dump", "--model", small_vocab_model, "--tokenizer", tiny_model_dir, "--out", out)
    assert r.returncode == 2 and "vocabulary has 300" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = run_cli("vocab", "--model", small_vocab_model, "--tokenizer", tiny_model_dir,
                "--draft-vocab-size", "8", "--out", tmp_path / "v.safetensors")
    assert r.returncode == 2 and "vocabulary has 300" in r.stderr


@pytest.mark.parametrize("role", ["wizard", "User", "", None])
def test_an_unknown_openai_role_is_skipped_with_the_reason(role, tok):
    from eagle3_target.data.chat import ChatEncoder

    row = {"messages": [{"role": role, "content": "abracadabra"}, {"role": "assistant", "content": "poof"}]}
    with pytest.raises(MalformedRow, match="unknown role"):
        row_to_messages(row)
    out = encode_row(RawRow(0, "chats.jsonl:1", row, None), ChatEncoder(tok))
    assert isinstance(out, Skipped) and out.reason == "unknown role" and repr(role) in out.detail
    for known in ("system", "developer", "tool"):
        row_to_messages({"messages": [{"role": known, "content": "x"}, CHAT["messages"][1]]})


def test_a_dump_that_stores_nothing_exits_non_zero_with_the_reasons(tiny_model_dir, tmp_path):
    wizard = {"messages": [{"role": "wizard", "content": "abracadabra"}, {"role": "assistant", "content": "x"}]}
    data = _chats(tmp_path, [wizard, {"messages": [{"role": "user", "content": "no answer"}]}])
    r = run_cli("dump", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "d", "--mode", "logits")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "unknown role: 1" in r.stdout and "no assistant turn: 1" in r.stdout
    assert "stores no sample: every row was skipped" in r.stderr and "Traceback" not in r.stderr
    good = _chats(tmp_path, [wizard, CHAT], "good.jsonl")
    r = run_cli("dump", "--model", tiny_model_dir, "--data", good, "--out", tmp_path / "e", "--mode", "logits")
    assert r.returncode == 0 and "1 samples" in r.stdout and "unknown role: 1" in r.stdout
