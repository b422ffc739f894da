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
