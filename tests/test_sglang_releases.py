"""The SGLang engine on every supported release's fake: built the way that release builds a
standalone runner, and equal to the HF engine per row in every mode.

Each fake (tests/fake_sglang.py) holds only its wheel's surface, so an API a release
lacks (``Req.set_extend_range`` on 0.5.23, ``ParallelState`` on 0.5.21, a
``ModelRunner`` built before ``publish`` on 0.5.19+) fails here.
"""

from __future__ import annotations

import pytest
import torch

import fake_sglang
from eagle3_target.engines import sglang as sg
from sglang_helpers import assert_rows_match, hf_rows, ragged, use_fake


@pytest.mark.parametrize("release", fake_sglang.ALL)
def test_every_mode_matches_hf_per_row_on_every_release(monkeypatch, tiny_path, hf_runner, release):
    ctx = use_fake(monkeypatch, release)
    r = sg.build(tiny_path, dtype="float32")
    try:
        aux_ids = [5, 0, 3]  # unsorted: SGLang returns captures in layer order
        r.set_aux_layers(aux_ids)
        ids, mask = ragged([9, 17, 4], S=17, seed=1)
        ref = hf_rows(hf_runner, ids, mask, aux_ids)
        for mode, key, slot in (("logits", "logits", 0), ("aux", "aux", 1), ("hidden", "hidden", 2),
                                ("prenorm", "prenorm", 3)):
            before = r.extends
            out = r.forward_packed(ids, mask, mode)
            assert r.extends == before + 1  # one ragged extend for the batch
            assert_rows_match(out["aux"], mask, ref, 1)
            assert_rows_match(out[key], mask, ref, slot)
    finally:
        r.close()
    assert ctx.torn_down == ["model_parallel", "distributed_environment"]


@pytest.mark.parametrize("release", fake_sglang.ALL)
def test_build_follows_the_releases_own_recipe(monkeypatch, tiny_path, release):
    ctx = use_fake(monkeypatch, release)
    f = fake_sglang.RELEASES[release]
    r = sg.build(tiny_path, dtype="float32", max_batch_tokens=256, max_batch_rows=4)
    try:
        mr = r._mr
        # publish where the release has a process-wide config (0.5.17+), with ranks from 0.5.21
        assert ctx.role == ("scheduler" if f["publish"] else None)
        assert (ctx.ranks is not None) == (f["publish"] == "ranks")
        # every GEMM/MoE config initialiser ran, with or without server_args as the release wants
        assert sorted(ctx.initialised) == ["bf16", "fp4", "fp8", "moe"]
        if f["runner"] == "ranks":
            assert mr.ranks["tp_size"] == 1 and mr.steps == ["constructor"]
        else:
            assert mr.steps == ["alloc_memory_pool", "init_attention_backends", "init_cuda_graphs"]
        if f["runner"] == "ps":
            assert mr.ps.tp_size == 1 and mr.ps.gpu_id == 0
        assert ctx.bootstrapped == (f["runner"] == "bootstrap")
        # the page the runner uses, not the raw field (None from 0.5.20, the fake then picks 4)
        assert r._page == mr.page_size
        assert mr.server_args.page_size == (None if f["server_args"] == "struct" else 1)
        assert r._official == f["official"]
        if f["official"]:
            assert mr.server_args.enable_return_aux_hidden_states
            assert mr.server_args.speculative_algorithm == "EAGLE3"
    finally:
        r.close()


@pytest.mark.parametrize("release", ["0.5.9", "0.5.23"])
def test_a_tight_pool_serves_many_batches_with_the_runners_page(monkeypatch, tiny_path, release):
    """The fake's allocator rounds each row up to whole pages: the plan must use the
    page the runner chose, or a batch overflows the pool."""
    use_fake(monkeypatch, release)
    r = sg.build(tiny_path, dtype="float32", max_batch_tokens=40, max_batch_rows=3)
    try:
        r.set_aux_layers([1, 3, 4])
        ids, mask = ragged([5, 9, 3, 7, 2], S=9, seed=4)
        for _ in range(3):
            logits, _ = r.forward_eagle3(ids, mask)
        assert logits.shape == (5, 9, r.vocab_size)
    finally:
        r.close()


def test_version_gate_names_installed_and_supported():
    sg.check_sglang_version("0.5.9")
    sg.check_sglang_version("0.5.16.post1")
    sg.check_sglang_version("0.5.23")
    for bad in ("0.5.24", "0.5.8", "0.6.0", "1.0.0rc1"):
        with pytest.raises(sg.SGLangUnavailableError, match=f"sglang {bad} is installed.*0.5.9 to 0.5.23"):
            sg.check_sglang_version(bad)


def test_version_gate_runs_before_any_model_is_loaded(monkeypatch, tiny_path):
    ctx = use_fake(monkeypatch, "0.5.23")
    pkg = fake_sglang.sys.modules["fakesg_0_5_23"]
    monkeypatch.setattr(pkg, "__version__", "0.5.24")
    with pytest.raises(sg.SGLangUnavailableError, match="0.5.24 is installed"):
        sg.build(tiny_path)
    assert ctx.runners == []
    monkeypatch.setenv(sg.ANY_VERSION_ENV, "1")  # the escape hatch lets it try
    r = sg.build(tiny_path, dtype="float32")
    r.close()


def test_pyproject_declares_the_same_range():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    lo, hi = sg.SUPPORTED_SGLANG
    assert re.search(rf'sglang = \["sglang>={re.escape(lo)},<={re.escape(hi)}"\]', text), \
        "pyproject's sglang extra must say the range engines/sglang.py supports"


def test_an_api_the_release_lacks_is_not_called(monkeypatch, tiny_path):
    """0.5.23's Req has no set_extend_range/prefix_indices and there is no ChunkCache:
    the fake would raise AttributeError/ImportError if the engine reached for them."""
    use_fake(monkeypatch, "0.5.23")
    pkg = "fakesg_0_5_23"
    sb = fake_sglang.sys.modules[pkg + ".srt.managers.schedule_batch"]
    assert not hasattr(sb.Req, "set_extend_range")
    assert pkg + ".srt.mem_cache.chunk_cache" not in fake_sglang.sys.modules
    assert pkg + ".srt.distributed.parallel_state_wrapper" not in fake_sglang.sys.modules
    r = sg.build(tiny_path, dtype="float32")
    try:
        assert r._api.ChunkCache is None and r._api.ParallelState is None
        r.set_aux_layers([1, 3, 4])
        logits, aux = r.forward_eagle3(*ragged([4, 6], S=6))
        assert logits.shape[:2] == aux.shape[:2] == (2, 6)
    finally:
        r.close()
