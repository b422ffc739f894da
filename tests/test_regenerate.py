"""``regenerate`` on the transformers engine and the built-in tiny model: the batched,
left-padded KV-cache loop against transformers' own ``generate``, what is regenerated
(``--turns``, system prompts, tools, reasoning), honest skips by ``file:line``, the
output read by ``vocab`` and ``dump``, and the settings a rerun may not change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eagle3_target.data.rows import sample_data_path
from eagle3_target.dump.format import folder_lock
from eagle3_target.regen import RegenConfig, read_shard, run_regenerate
from eagle3_target.regen.hf import HFGenerator, generate_ids, stop_token_ids
from eagle3_target.regen.prompts import PromptRenderer, Request

MAX_NEW = 12


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sample_rows(n: int) -> list[dict]:
    return [json.loads(x) for x in sample_data_path().read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def gen(tiny_path, tok):
    g = HFGenerator(tiny_path, tok, PromptRenderer(tok), batch_size=4, device="cpu", dtype="float32",
                    sampling={"temperature": 0.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "greedy": True})
    yield g
    g.close()


def cfg(tmp_path: Path, data: list[Path], **kw) -> RegenConfig:
    base = dict(out=str(tmp_path / "out"), data=[str(p) for p in data], max_new_tokens=MAX_NEW, batch_size=4,
                keep_length=True, device="cpu", dtype="float32", progress=False)
    return RegenConfig(**{**base, **kw})


def test_greedy_batched_left_padded_equals_generate_one_at_a_time(gen, tok):
    convs = [[{"role": "user", "content": "explain the draft model " * k}] for k in (1, 5, 2, 9, 3)]
    prompts = [PromptRenderer(tok).render(c, None) for c in convs]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row padded differently
    stops = stop_token_ids(gen.model, tok)
    ours = generate_ids(gen.model, prompts, max_new_tokens=24, stop_ids=stops, pad_id=tok.pad_token_id)
    for p, (ids, reason) in zip(prompts, ours):
        ref = gen.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.int64),
                                 max_new_tokens=24, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        stopped = bool(ref) and ref[-1] in stops
        assert ids == (ref[:-1] if stopped else ref)
        assert reason == ("stop" if stopped else "length")
    # The generator (longest first, batches of 4) gives the same text as the loop.
    answers = gen.generate([Request(c, None, 0, p) for c, p in zip(convs, prompts)])
    for (ids, _), a in zip(generate_ids(gen.model, prompts, max_new_tokens=MAX_NEW, stop_ids=stops,
                                        pad_id=tok.pad_token_id), answers):
        assert a.content == tok.decode(ids, skip_special_tokens=True)


def test_sampling_follows_the_row_seed(gen, tok):
    p = PromptRenderer(tok).render([{"role": "user", "content": "why is the sky blue"}], None)
    kw = dict(max_new_tokens=16, stop_ids=stop_token_ids(gen.model, tok), pad_id=tok.pad_token_id,
              temperature=1.0, top_p=0.9)
    a = generate_ids(gen.model, [p, p, p], seeds=[1, 2, 1], **kw)
    assert a[0] == a[2] and a[0] != a[1]
    assert generate_ids(gen.model, [p], seeds=[1], **kw)[0] == a[0]


def test_rows_keep_order_source_system_and_tools_and_go_through_vocab_and_dump(tmp_path, gen, tiny_path):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    rows = sample_rows(6)
    rows[2] = {"system": "Answer briefly.", "tools": tools,
               "conversations": [{"from": "human", "value": "What is a shard?"}, {"from": "gpt", "value": "x"}]}
    data = write_rows(tmp_path / "chats.jsonl", rows)
    summary = run_regenerate(cfg(tmp_path, [data], shard_rows=4), generator=gen, log=lambda s: None)
    assert summary.complete and summary.rows_written == 6 and summary.shards == 2
    out = [r for f in sorted((tmp_path / "out").glob("regen-*.jsonl")) for r in read_shard(f)]
    assert [r["source"]["where"] for r in out] == [f"chats.jsonl:{i + 1}" for i in range(6)]
    for src, r in zip(rows, out):
        msgs = r["messages"]
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"] != src.get("messages", [{}])[-1].get("content")
        assert r["finish_reason"] in ("stop", "length")
    assert out[2]["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert out[2]["tools"] == tools and out[2]["messages"][1]["content"] == "What is a shard?"
    # What regenerate wrote is what the next two steps read.
    from eagle3_target.cli import main

    shards = [str(p) for p in sorted((tmp_path / "out").glob("regen-*.jsonl"))]
    assert main(["vocab", "--model", tiny_path, "--data", *shards, "--draft-vocab-size", "64",
                 "--out", str(tmp_path / "v.safetensors")]) == 0
    assert main(["dump", "--model", tiny_path, "--data", *shards, "--out", str(tmp_path / "d"), "--device", "cpu",
                 "--no-progress", "--strict"]) == 0
    from eagle3_target.dump import Eagle3Dataset

    ds = Eagle3Dataset(str(tmp_path / "d"))
    assert len(ds) == 6


def test_turns_all_answers_each_turn_after_the_regenerated_ones(tmp_path, gen, tok):
    row = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is a batch?"},
                        {"role": "assistant", "content": "OLD ONE"}, {"role": "user", "content": "And a shard?"},
                        {"role": "assistant", "content": "OLD TWO"}]}
    data = write_rows(tmp_path / "c.jsonl", [row])
    run_regenerate(cfg(tmp_path, [data], turns="all"), generator=gen, log=lambda s: None)
    (out,) = read_shard(tmp_path / "out" / "regen-00000.jsonl")
    m = out["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant"]
    assert "OLD" not in m[2]["content"] + m[4]["content"]
    r = PromptRenderer(tok)
    first = gen.generate([Request(m[:2], None, 0, r.render(m[:2], None))])[0]
    second = gen.generate([Request(m[:4], None, 0, r.render(m[:4], None))])[0]
    assert (m[2]["content"], m[4]["content"]) == (first.content, second.content)
    # --turns last answers only the end, after the original first answer.
    run_regenerate(cfg(tmp_path, [data], out=str(tmp_path / "last")), generator=gen, log=lambda s: None)
    (last,) = read_shard(tmp_path / "last" / "regen-00000.jsonl")
    assert last["messages"][2]["content"] == "OLD ONE" and last["messages"][4]["content"] != "OLD TWO"


def test_samples_are_separate_rows_with_their_own_seeds(tmp_path, tiny_path, tok):
    data = write_rows(tmp_path / "c.jsonl", sample_rows(2))
    c = cfg(tmp_path, [data], samples=3, temperature=1.0, top_p=0.95, seed=7)
    run_regenerate(c, log=lambda s: None)
    rows = read_shard(tmp_path / "out" / "regen-00000.jsonl")
    assert [(r["source"]["row"], r["source"]["sample"]) for r in rows] == [(0, 0), (0, 1), (0, 2),
                                                                         (1, 0), (1, 1), (1, 2)]
    texts = [r["messages"][-1]["content"] for r in rows]
    assert len(set(texts)) == 6
    first = (tmp_path / "out" / "regen-00000.jsonl").read_bytes()
    run_regenerate(RegenConfig(**{**c.__dict__, "out": str(tmp_path / "again")}), log=lambda s: None)
    assert (tmp_path / "again" / "regen-00000.jsonl").read_bytes() == first


def test_malformed_and_overlong_rows_are_reported_by_file_and_line(tmp_path, gen):
    rows = sample_rows(2) + ["{broken", {"messages": []},
                             {"messages": [{"role": "user", "content": "long " * 300}]},
                             {"messages": [{"role": "assistant", "content": "hi"}]}]
    data = write_rows(tmp_path / "mixed.jsonl", rows)
    c = cfg(tmp_path, [data], max_context=200)
    s = run_regenerate(c, generator=gen, log=lambda s: None)
    assert s.rows_written == 2
    assert s.skipped["malformed"] == {"not JSON": 1, "no messages": 1, "nothing to answer": 1}
    assert s.skipped["regen"] == {"prompt over the context": 1}
    where = {e["where"]: e["reason"] for k in s.examples for e in s.examples[k]}
    assert where == {"mixed.jsonl:3": "not JSON", "mixed.jsonl:4": "no messages",
                     "mixed.jsonl:5": "prompt over the context", "mixed.jsonl:6": "nothing to answer"}
    text = "\n".join(s.lines())
    assert "mixed.jsonl:5 (row 4): prompt over the context" in text and "> context 200" in text
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["summary"]["skipped"] == s.skipped
    # --strict refuses before writing anything, naming the rows.
    with pytest.raises(ValueError, match=r"--strict: .*mixed.jsonl:3.*not JSON"):
        run_regenerate(cfg(tmp_path, [data], max_context=200, strict=True, out=str(tmp_path / "s")),
                       generator=gen, log=lambda s: None)
    assert not (tmp_path / "s").exists()


def test_length_cut_answers_are_skipped_unless_kept(tmp_path, gen):
    data = write_rows(tmp_path / "c.jsonl", sample_rows(3))
    s = run_regenerate(cfg(tmp_path, [data], keep_length=False), generator=gen, log=lambda s: None)
    # The random tiny model never ends its turn within MAX_NEW tokens.
    assert s.rows_written == 0 and s.skipped["regen"] == {"answer cut by --max-new-tokens": 3}
    assert "c.jsonl:1 (row 0): answer cut by --max-new-tokens (answer 1 of 1" in "\n".join(s.lines())
    kept = run_regenerate(cfg(tmp_path, [data], out=str(tmp_path / "k")), generator=gen, log=lambda s: None)
    rows = read_shard(tmp_path / "k" / "regen-00000.jsonl")
    assert kept.rows_written == 3 and {r["finish_reason"] for r in rows} == {"length"}


def test_a_rerun_with_other_settings_is_refused(tmp_path, gen):
    data = write_rows(tmp_path / "c.jsonl", sample_rows(2))
    run_regenerate(cfg(tmp_path, [data]), generator=gen, log=lambda s: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match=r"different settings \(differs in: turns\)"):
        run_regenerate(cfg(tmp_path, [data], turns="all"), generator=gen, log=lambda s: None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_reasoning_is_split_where_the_template_opens_thinking(tok, tiny_path, tmp_path):
    r = PromptRenderer(tok)
    ids = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    think, close = r.think_open, r.think_close
    a = r.answer(ids("q") + [think], ids("step one") + [close] + ids("the answer"), "stop")
    assert (a.reasoning_content, a.content) == ("step one", "the answer")
    b = r.answer(ids("q"), [think] + ids("hmm") + [close] + ids(" done"), "stop")
    assert (b.reasoning_content, b.content, b.completion_tokens) == ("hmm", "done", len(ids("hmm done")) + 3)
    c = r.answer(ids("q"), ids("plain"), "length")
    assert (c.reasoning_content, c.content) == (None, "plain")
    # A thinking switch in the template, turned on by --chat-template-kwarg.
    from eagle3_target.tiny import CHAT_TEMPLATE

    thinking = CHAT_TEMPLATE.replace(
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}",
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- if enable_thinking is defined and enable_thinking -%}{{- '<think>\\n' -}}{%- endif -%}")
    assert thinking != CHAT_TEMPLATE
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_path, model)
    cfg_path = model / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["chat_template"] = thinking
    cfg_path.write_text(json.dumps(tc))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    data = write_rows(tmp_path / "c.jsonl", sample_rows(1))
    run_regenerate(cfg(tmp_path, [data], model=str(model), chat_template_kwargs={"enable_thinking": True}),
                   log=lambda s: None)
    (row,) = read_shard(tmp_path / "out" / "regen-00000.jsonl")
    assert "reasoning_content" in row["messages"][-1]


def test_parquet_shards_keep_fields_only_some_rows_have_and_go_through_dump(tmp_path, gen, tiny_path):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    rows = sample_rows(3)
    rows[1]["tools"] = tools  # only a later row: a schema from the first row alone would drop it
    data = write_rows(tmp_path / "c.jsonl", rows)
    run_regenerate(cfg(tmp_path, [data], output_format="parquet"), generator=gen, log=lambda s: None)
    shard = tmp_path / "out" / "regen-00000.parquet"
    got = read_shard(shard)
    assert [r.get("tools") for r in got] == [None, tools, None]
    run_regenerate(cfg(tmp_path, [data], out=str(tmp_path / "j")), generator=gen, log=lambda s: None)
    assert got == read_shard(tmp_path / "j" / "regen-00000.jsonl")
    from eagle3_target.cli import main

    assert main(["dump", "--model", tiny_path, "--data", str(shard), "--out", str(tmp_path / "d"), "--device", "cpu",
                 "--no-progress", "--strict"]) == 0


def test_parquet_refuses_rows_it_cannot_hold(tmp_path):
    from eagle3_target.regen.output import write_shard

    rows = [{"messages": [], "tools": [{"parameters": {"type": "object"}}]},
            {"messages": [], "tools": [{"parameters": "not an object"}]}]
    with pytest.raises(ValueError, match="--format parquet cannot hold these rows .*use --format jsonl"):
        write_shard(tmp_path / "x.parquet", rows, "parquet")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--samples", "2"], "--samples 2 with greedy decoding would write 2 copies of one answer; set --temperature"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--chat-template-kwarg", "enable_thinking"], "--chat-template-kwarg 'enable_thinking': expected KEY=VALUE"),
    (["--data", "missing.jsonl"], "data file missing.jsonl does not exist"),
    (["--server", "localhost:1"], "--server 'localhost:1': expected an http:// or https:// URL"),
])
def test_bad_settings_fail_in_one_line_and_change_nothing(tmp_path, capsys, args, message):
    from eagle3_target.cli import main

    out = tmp_path / "out"
    assert main(["regenerate", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"eagle3-target regenerate: error: {message}")
    assert not out.exists()


def test_progress_bar_shows_rows_and_generated_tokens_per_second(tmp_path, capsys):
    from eagle3_target.cli import main

    data = write_rows(tmp_path / "c.jsonl", sample_rows(2))
    assert main(["regenerate", "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--max-new-tokens", "4", "--keep-length", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "regenerate:" in err and "2/2" in err and "row/s" in err and "2 answers" in err and "gen tok/s" in err


def test_rows_the_reader_refuses_keep_its_reason(tmp_path, gen):
    data = tmp_path / "c.jsonl"
    big = {"messages": [{"role": "user", "content": "x" * 3000}]}
    data.write_bytes(json.dumps(sample_rows(1)[0]).encode() + b"\n" + b'{"messages": "\xff"}\n'
                     + json.dumps(big).encode() + b"\n")
    s = run_regenerate(cfg(tmp_path, [data], max_row_mb=2 / 1024), generator=gen, log=lambda s: None)
    assert s.rows_written == 1 and s.skipped["malformed"] == {"invalid UTF-8": 1, "row too large": 1}
    assert [e["where"] for e in s.examples["malformed"]] == ["c.jsonl:2", "c.jsonl:3"]


def test_a_second_job_on_the_same_folder_is_refused_and_changes_nothing(tmp_path, gen):
    data = write_rows(tmp_path / "c.jsonl", sample_rows(2))
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, ".lock", "held by this test"):  # another job's lock
        with pytest.raises(ValueError, match=r"another regenerate is writing .*out"):
            run_regenerate(cfg(tmp_path, [data]), generator=gen, log=lambda s: None)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    s = run_regenerate(cfg(tmp_path, [data]), generator=gen, log=lambda s: None)
    assert s.rows_written == 2
