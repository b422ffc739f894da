"""What the SGLang engine suites share: a fake release wired into the engine, tiny model
folders that name an SGLang architecture, ragged batches, and per-row HF references.

The engine's real ``_load_api`` imports the fake package (tests/fake_sglang.py) by name,
so the symbol paths are checked too; only the CUDA probes are replaced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import fake_sglang
from eagle3_target.engines import sglang as sg

TOL = dict(atol=2e-5, rtol=1e-4)
_REAL_LOAD_API = sg._load_api


def use_fake(monkeypatch, release: str):
    """Points the engine at the fake ``release``; returns the fake's process context."""
    pkg = fake_sglang.install(release)
    monkeypatch.setattr(sg, "_load_api", lambda: _REAL_LOAD_API(pkg))
    monkeypatch.setattr(sg, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(sg, "_set_device", lambda i: None)
    return fake_sglang.ctx_of(release)


def family_dir(tiny_path: str, root: Path, architecture: str) -> str:
    """A copy of the tiny Llama whose config names ``architecture`` (the fake picks the
    SGLang family from it; the weights stay Llama's)."""
    out = root / architecture
    if not out.exists():
        shutil.copytree(tiny_path, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg["architectures"] = [architecture]
        (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def ragged(lengths, S, vocab=2048, seed=0, left=False):
    """``(ids [B,S], mask [B,S])`` with each row's real tokens on one side, pads = 7."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), S), generator=g)
    pos = torch.arange(S)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = (pos >= S - n) if left else (pos < n)
    return torch.where(mask, ids, torch.full_like(ids, 7)), mask.to(torch.int64)


def hf_rows(hf_runner, ids, mask, aux_ids):
    """The HF engine on each row alone, real tokens only: ``(logits, aux, final, prenorm)``."""
    hf_runner.set_aux_layers(aux_ids)
    out = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()][None]
        ones = torch.ones_like(row)
        logits, aux = hf_runner.forward_eagle3(row, ones)
        final, _ = hf_runner.forward_eagle3_hidden(row, ones)
        pre, _ = hf_runner.forward_eagle3_prenorm(row, ones)
        out.append((logits[0], aux[0], final[0], pre[0]))
    return out


def assert_rows_match(got: torch.Tensor, mask: torch.Tensor, ref: list, slot: int) -> None:
    """Each row's real positions equal the per-row reference; pads are zero."""
    for b in range(got.shape[0]):
        real = mask[b].bool()
        torch.testing.assert_close(got[b][real], ref[b][slot], **TOL)
        assert not got[b][~real].any()
