"""The first demo says what its first minute costs: where the built-in model is built
(once, and ``EAGLE3_TARGET_CACHE`` moves it), and its tokens/s is a median of warm
forwards with the cold first one timed apart."""

from __future__ import annotations

import argparse
from pathlib import Path

from eagle3_target.cli import demo_steps
from eagle3_target.tiny import CACHE_ENV


def test_the_demo_says_where_it_builds_the_tiny_model_the_first_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(demo_steps, "STEPS", [])
    assert demo_steps.run_demo(argparse.Namespace(model=None)) == 0
    first = capsys.readouterr().out
    assert f"building the built-in tiny model into {tmp_path / 'cache'} (first use only; ${CACHE_ENV} moves it)" \
        in first
    assert demo_steps.run_demo(argparse.Namespace(model=None)) == 0
    assert "building" not in capsys.readouterr().out
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert CACHE_ENV in readme


def test_in_process_tokens_per_second_is_warm_and_says_so(tiny_model_dir, tmp_path, capsys):
    ctx = demo_steps.DemoContext(str(tiny_model_dir), tmp_path)
    try:
        demo_steps.step_in_process(ctx)
    finally:
        ctx.target.close()
    out = capsys.readouterr().out
    assert "tokens/s on cpu (fp32; median of 5 forwards after a cold first one, which took " in out
