"""The SGLang offline Engine's touch point (``regenerate --engine sglang``): a scheduler
that dies while starting becomes one error naming the likeliest cause, never SGLang's
bare RuntimeError; other failures pass through unchanged."""

from __future__ import annotations

import pytest

from eagle3_target.engines import sglang as sg



def _dies(**kw):
    raise RuntimeError("Rank 0 scheduler died during initialization (exit code: 1).")


def test_a_dead_scheduler_names_the_transformers_pin(monkeypatch):
    monkeypatch.setattr(sg, "_required_version", lambda pkg, dep: "==4.57.1")
    monkeypatch.setattr(sg, "_installed_version", lambda pkg: {"sglang": "0.5.16", "transformers": "5.17.0"}[pkg])
    with pytest.raises(sg.SGLangUnavailableError) as e:
        sg._start_engine(_dies, model_path="m")
    msg = str(e.value)
    assert "could not start its scheduler" in msg and "scheduler died" in msg
    assert "sglang 0.5.16 asks for transformers ==4.57.1" in msg and "has 5.17.0" in msg
    assert "install transformers==4.57.1" in msg


def test_other_failures_pass_through_and_a_good_engine_is_returned(monkeypatch):
    def other(**kw):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        sg._start_engine(other, model_path="m")
    assert sg._start_engine(lambda **kw: kw, model_path="m") == {"model_path": "m"}


def test_required_version_reads_package_metadata():
    # pytest's own metadata lists its dependencies; a package that does not exist gives None.
    assert sg._required_version("pytest", "pluggy") is not None
    assert sg._required_version("no-such-package-here", "torch") is None


def test_regenerate_reads_sglang_finish_reasons_as_the_transformers_engine_does(monkeypatch, tmp_path, tiny_path, tok):
    """SGLang checks ``max_new_tokens`` before the stop tokens (``Req.update_finish_state``
    in 0.5.16), so an answer whose stop token is its last allowed token comes back as
    ``length``: it ended, and must be kept as ``stop`` with the stop token counted, as
    the transformers engine keeps it. An aborted request is skipped with SGLang's reason."""
    import json

    from eagle3_target.data.rows import sample_data_path
    from eagle3_target.regen import RegenConfig, read_shard, run_regenerate
    from eagle3_target.regen.prompts import PromptRenderer
    from eagle3_target.regen.sglang import SGLangGenerator

    eos = tok.eos_token_id
    words = tok.encode(" the draft model", add_special_tokens=False)[:2]
    scripted = [  # (output_ids, finish_reason) in prompt order, as sglang.Engine returns them
        (words + [eos], {"type": "length", "length": 3}),  # ended on its last allowed token
        (words + [words[0]], {"type": "length", "length": 3}),  # cut
        (words[:1] + [eos], {"type": "stop", "matched": eos}),  # ended early
        ([], {"type": "abort", "message": "the prompt is longer than the KV pool"}),
    ]
    seen = []

    def generate(engine, prompts, params):
        seen.append([p["max_new_tokens"] for p in params])
        return [{"output_ids": ids, "meta_info": {"finish_reason": fin}} for ids, fin in scripted]

    class Engine:
        def shutdown(self):
            pass

    monkeypatch.setattr(sg, "offline_engine", lambda *a, **kw: Engine())
    monkeypatch.setattr(sg, "offline_generate", generate)
    monkeypatch.setattr(sg, "offline_seed_field", lambda: None)
    rows = [json.loads(x) for x in sample_data_path().read_text().splitlines()[:4]]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RegenConfig(out=str(tmp_path / "out"), data=[str(data)], model=tiny_path, max_new_tokens=3,
                      keep_length=False, progress=False)
    gen = SGLangGenerator(tiny_path, tok, PromptRenderer(tok), sampling=cfg.sampling())
    assert eos in gen.stop_ids
    s = run_regenerate(cfg, generator=gen, tokenizer=tok, log=lambda s: None)
    assert seen == [[3, 3, 3, 3]]
    out = read_shard(tmp_path / "out" / "regen-00000.jsonl")
    # Rows 0 and 2 ended (the stop token counted, as the transformers engine counts it);
    # row 1 was cut and row 3 aborted: both skipped, each with its reason.
    assert [r["finish_reason"] for r in out] == ["stop", "stop"]
    assert [r["messages"][-1]["content"] for r in out] == [tok.decode(words, skip_special_tokens=True),
                                                            tok.decode(words[:1], skip_special_tokens=True)]
    assert s.rows_written == 2 and s.generated_tokens == 3 + 2
    assert s.skipped["regen"]["answer cut by --max-new-tokens"] == 1
    text = "\n".join(s.lines())
    assert "sglang finish_reason 'abort': the prompt is longer than the KV pool" in text
