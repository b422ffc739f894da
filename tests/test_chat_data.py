"""Chat data -> input_ids + loss_mask: template masks, per-turn masks, truncation,
reasoning, malformed and unsupervised rows, JSONL and Parquet."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eagle3_target.data.samples import (
    MALFORMED,
    ZERO_SUPERVISION,
    DataReport,
    Sample,
    Skipped,
    iter_samples,
    scan,
)
from eagle3_target.data.chat import ChatEncoder, has_generation_block, row_to_messages
from eagle3_target.data.rows import count_rows, sample_data_path
from eagle3_target.data.tokenizer import load_tokenizer
from eagle3_target.tiny import CHAT_TEMPLATE

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama3_template(markers: bool) -> str:
    """A Llama-3-style template (header tokens, ``| trim``, ``<|eot_id|>``, BOS)."""
    body = "{{- message['content'] | trim + '<|eot_id|>' }}"
    if markers:
        body = "{%- generation %}" + body + "{%- endgeneration %}"
    return (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['role'] == 'assistant' %}" + body +
        "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    )


def qwen3_like_template(markers: bool) -> str:
    """ChatML with reasoning rendered only in the last assistant turn, as Qwen3's
    template does (it drops <think> blocks from turns before the last user query)."""
    answer = ("{%- if loop.last %}"
              "{{- '<think>\\n' + message.get('reasoning_content', '') + '\\n</think>\\n\\n' }}{%- endif %}"
              "{{- message['content'] + '<|im_end|>' }}")
    if markers:
        answer = "{%- generation %}" + answer + "{%- endgeneration %}"
    return (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}" + answer + "{{- '\\n' }}"
        "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


@pytest.fixture(scope="module")
def llama_tok(tiny_model_dir):
    t = load_tokenizer(str(tiny_model_dir))
    t.add_special_tokens({"bos_token": "<|begin_of_text|>",
                          "additional_special_tokens": LLAMA3_SPECIALS[1:]})
    return t


def with_template(tokenizer, template: str):
    import copy

    t = copy.deepcopy(tokenizer)
    t.chat_template = template
    return t


CONV = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is a draft model?"},
    {"role": "assistant", "content": "A small model that guesses tokens."},
    {"role": "user", "content": "And the target?"},
    {"role": "assistant", "content": "The big model that checks them."},
]


def supervised_text(tokenizer, enc) -> list[str]:
    """The supervised spans, decoded, one string per contiguous run."""
    runs, cur = [], []
    for t, m in zip(enc.input_ids, enc.loss_mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


# --------------------------------------------------------------------------- masks


def test_tiny_template_mask_covers_answers_and_end_of_turn(tok):
    enc = ChatEncoder(tok).encode(CONV)
    assert enc.mask_source == "template"
    assert supervised_text(tok, enc) == ["A small model that guesses tokens.<|im_end|>",
                                         "The big model that checks them.<|im_end|>"]
    assert enc.input_ids == tok.apply_chat_template(CONV, return_dict=True)["input_ids"]


def test_per_turn_mask_equals_template_mask_on_chatml(tok):
    plain = with_template(tok, CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""))
    assert not has_generation_block(plain.get_chat_template())
    a = ChatEncoder(tok).encode(CONV)
    b = ChatEncoder(plain).encode(CONV)
    assert b.mask_source == "turns"
    assert (a.input_ids, a.loss_mask) == (b.input_ids, b.loss_mask)


@pytest.mark.parametrize("markers", [True, False])
def test_llama3_style_template(llama_tok, markers):
    t = with_template(llama_tok, llama3_template(markers))
    enc = ChatEncoder(t).encode(CONV)
    assert enc.mask_source == ("template" if markers else "turns")
    assert enc.input_ids[0] == t.convert_tokens_to_ids("<|begin_of_text|>")
    assert supervised_text(t, enc) == ["A small model that guesses tokens.<|eot_id|>",
                                       "The big model that checks them.<|eot_id|>"]


def test_generation_block_detection_ignores_comments_and_strings():
    assert has_generation_block(CHAT_TEMPLATE)
    assert not has_generation_block("{# {% generation %} #}{{ 'generation' }}{% if generation %}{% endif %}")


conversations = st.lists(
    st.tuples(st.text(alphabet="ab cd\n\t.!é0", max_size=12), st.text(alphabet="xy z\n:é?", max_size=12)),
    min_size=1, max_size=3,
).map(lambda turns: [m for u, a in turns for m in ({"role": "user", "content": u},
                                                     {"role": "assistant", "content": a})])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations, system=st.booleans())
def test_per_turn_mask_matches_generation_markers(tok, llama_tok, conv, system):
    """Property: on random texts (whitespace at the edges, newlines, non-ASCII), the
    per-turn mask equals what the template's own generation markers give."""
    if system:
        conv = [{"role": "system", "content": "Be kind."}] + conv
    for base, template in ((tok, CHAT_TEMPLATE), (llama_tok, llama3_template(True))):
        plain = template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
        plain = plain.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
        a = ChatEncoder(with_template(base, template)).encode(conv)
        b = ChatEncoder(with_template(base, plain)).encode(conv)
        assert a.mask_source == "template" and b.mask_source == "turns"
        assert a.input_ids == b.input_ids
        assert a.loss_mask == b.loss_mask, (conv, a.loss_mask, b.loss_mask)


def test_template_that_rewrites_earlier_turns(tok):
    conv = [{"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1", "reasoning_content": "think one"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2", "reasoning_content": "think two"}]
    plain = with_template(tok, qwen3_like_template(False))
    with pytest.raises(Exception) as e:
        ChatEncoder(plain).encode(conv)
    assert getattr(e.value, "reason", "") == "template rewrites turns"
    # With generation markers the same template is fine, reasoning of the last turn included.
    marked = with_template(tok, qwen3_like_template(True))
    enc = ChatEncoder(marked).encode(conv)
    assert supervised_text(marked, enc) == ["A1<|im_end|>", "<think>\nthink two\n</think>\n\nA2<|im_end|>"]


def test_mask_reasoning_inline_and_field(tok):
    conv = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nlet me see\n</think>\n\nHello there."}]
    enc = ChatEncoder(tok, mask_reasoning=True).encode(conv)
    assert supervised_text(tok, enc) == ["<think>", "</think>\n\nHello there.<|im_end|>"]
    full = ChatEncoder(tok).encode(conv)
    assert sum(full.loss_mask) > sum(enc.loss_mask)

    marked = with_template(tok, qwen3_like_template(True))
    conv2 = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello.", "reasoning_content": "a short thought"}]
    enc2 = ChatEncoder(marked, mask_reasoning=True).encode(conv2)
    assert supervised_text(marked, enc2) == ["<think>\n", "\n</think>\n\nHello.<|im_end|>"]


def test_truncation_mid_answer_keeps_the_prefix(tok):
    enc = ChatEncoder(tok).encode(CONV)
    first = enc.loss_mask.index(1)
    cut = first + 4
    short = ChatEncoder(tok, max_length=cut).encode(CONV)
    assert short.truncated and len(short.input_ids) == cut
    assert short.input_ids == enc.input_ids[:cut] and short.loss_mask == enc.loss_mask[:cut]
    assert sum(short.loss_mask[1:]) == 4


def test_truncation_before_the_answer_is_reported(tok):
    enc = ChatEncoder(tok).encode(CONV)
    first = enc.loss_mask.index(1)
    row = {"messages": CONV}
    from eagle3_target.data.rows import RawRow
    from eagle3_target.data.samples import encode_row

    out = encode_row(RawRow(7, "x.jsonl:8", value=row), ChatEncoder(tok, max_length=first))
    assert isinstance(out, Skipped) and out.kind == ZERO_SUPERVISION
    assert out.reason.startswith("truncated before the first assistant token")


# --------------------------------------------------------------------------- rows


def test_sharegpt_and_openai_rows_render_the_same(tok):
    share = {"conversations": [{"from": "system", "value": "You are brief."},
                               {"from": "human", "value": "What is a draft model?"},
                               {"from": "gpt", "value": "A small model that guesses tokens."},
                               {"from": "human", "value": "And the target?"},
                               {"from": "gpt", "value": "The big model that checks them."}]}
    m1, _ = row_to_messages(share)
    m2, _ = row_to_messages({"messages": CONV})
    assert m1 == m2
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                       {"type": "text", "text": "it?"}]},
                          {"role": "assistant", "content": "This."}]}
    assert row_to_messages(parts)[0][0]["content"] == "What is it?"


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


BAD_ROWS = [
    ("{not json", "not JSON"),
    ("[1, 2]", "not an object"),
    ({"text": "hello"}, "no messages"),
    ({"messages": []}, "no messages"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "non-text content"),
    ({"messages": [{"role": "user", "content": 5}]}, "bad content"),
    ({"messages": [{"content": "hi"}]}, "bad message"),
]


def test_malformed_and_unsupervised_rows_are_counted_with_reasons(tok, tmp_path):
    good = {"messages": CONV}
    rows = [good] + [r for r, _ in BAD_ROWS] + [{"messages": [{"role": "user", "content": "only a question"}]}, good]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    items = list(iter_samples([path], ChatEncoder(tok)))
    assert [type(i) for i in items] == [Sample] + [Skipped] * (len(BAD_ROWS) + 1) + [Sample]
    assert [i.row for i in items] == list(range(len(rows)))
    skipped = [i for i in items if isinstance(i, Skipped)]
    assert [s.reason for s in skipped[:-1]] == [reason for _, reason in BAD_ROWS]
    assert all(s.kind == MALFORMED for s in skipped[:-1])
    assert skipped[0].where == "d.jsonl:2"
    assert (skipped[-1].kind, skipped[-1].reason) == (ZERO_SUPERVISION, "no assistant turn")

    n, report = scan([path], ChatEncoder(tok))
    assert n == 2
    assert report.total(MALFORMED) == len(BAD_ROWS) and report.total(ZERO_SUPERVISION) == 1
    assert len(report.examples[MALFORMED]) == 5  # the first few, not all
    text = "\n".join(report.lines())
    assert "malformed rows skipped: 8" in text and "rows with no supervised token skipped: 1" in text
    assert "d.jsonl:10 (row 9): no assistant turn" in text  # the unsupervised row is named
    assert report.strict_error() is not None
    assert DataReport().strict_error() is None


def test_parquet_reads_like_jsonl(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in sample_data_path().read_text().splitlines()[:20]]
    rows = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in rows]
    write_jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    enc = ChatEncoder(tok)
    a = list(iter_samples([tmp_path / "a.jsonl"], enc))
    b = list(iter_samples([tmp_path / "a.parquet"], enc))
    assert [(s.row, s.input_ids, s.loss_mask) for s in a] == [(s.row, s.input_ids, s.loss_mask) for s in b]
    assert count_rows([tmp_path / "a.parquet", tmp_path / "a.jsonl"]) == 40
    # Rows are numbered across files; start/keep pass over rows without parsing them.
    both = list(iter_samples([tmp_path / "a.parquet", tmp_path / "a.jsonl"], enc, start=15,
                             keep=lambda r: r % 2 == 1))
    assert [s.row for s in both] == list(range(15, 40, 2))


def test_sample_data_is_clean_and_varied(tok):
    for name in ("sample_chats.jsonl", "sample_sharegpt.jsonl"):
        n, report = scan([sample_data_path(name)], ChatEncoder(tok))
        assert report.total(MALFORMED) == report.total(ZERO_SUPERVISION) == 0
        assert n == count_rows([sample_data_path(name)])
    rows = [json.loads(x) for x in sample_data_path().read_text().splitlines()]
    assert len(rows) >= 300
    assert sum(any(m["role"] == "system" for m in r["messages"]) for r in rows) > 50
    assert sum(len(r["messages"]) >= 4 for r in rows) > 50
    assert sum("<think>" in r["messages"][-1 if len(r["messages"]) == 2 else 2]["content"] or
               any("reasoning_content" in m for m in r["messages"]) for r in rows) > 30


def test_sample_data_generator_is_reproducible():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_sample_chats.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
