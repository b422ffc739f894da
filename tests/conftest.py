"""Shared fixtures: tiny models built from configs (random weights, fixed seed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Every test process builds the tiny model into one per-session cache, never ~/.cache.
_CACHE = os.environ.setdefault(
    "EAGLE3_TARGET_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "eagle3-target")
)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built-in tiny Llama (8 layers, hidden 128, vocab 2048), fp32 on disk."""
    from eagle3_target.tiny import tiny_model_path

    return tiny_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_path(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_runner(tiny_path):
    """The transformers engine on the tiny model, fp32 CPU: the reference the SGLang
    engine suites compare against."""
    from eagle3_target.engines import hf as hf_engine

    r = hf_engine.build(tiny_path, device="cpu", dtype="float32")
    yield r
    r.close()


@pytest.fixture(scope="session")
def tok(tiny_model_dir):
    """The tiny model's tokenizer (ChatML template with generation markers)."""
    from eagle3_target.data.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_target(tiny_model_dir):
    from eagle3_target import Eagle3TargetModel

    t = Eagle3TargetModel.from_pretrained(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    yield t
    t.close()


def pytest_sessionfinish(session, exitstatus):
    # The CPU suite must never need sglang (engines/sglang.py imports it lazily; the
    # SGLang tests use tests/fake_sglang.py).
    if "sglang" in sys.modules and sys.modules["sglang"] is not None:
        print("\nFAILED: the CPU test suite imported sglang", file=sys.stderr)
        session.exitstatus = 1
