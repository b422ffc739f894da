"""The capture table in action: each SGLang family's capture rules (tests/fake_sglang.py
encodes them as read from the wheels) give aux id k = the output of layer k, or the
engine refuses the family with a reason.

A wrong mapping (DeepSeek's setter), a packed output read as a list, an unreset capture
(flag-based families) or a captured tensor that is not the residual stream (Gemma-3 on
0.5.17+) fails a test here.
"""

from __future__ import annotations

import pytest
import torch

import fake_sglang
from eagle3_target.engines import sglang as sg
from sglang_helpers import assert_rows_match, family_dir, hf_rows, ragged, use_fake


@pytest.fixture(scope="module")
def dirs(tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda arch: family_dir(tiny_path, root, arch)


def _check(r, hf_runner, aux_ids, seed=0):
    r.set_aux_layers(aux_ids)
    ids, mask = ragged([7, 12, 3], S=12, seed=seed)
    _, aux = r.forward_eagle3(ids, mask)
    assert_rows_match(aux, mask, hf_rows(hf_runner, ids, mask, aux_ids), 1)


@pytest.mark.parametrize("release", ["0.5.9", "0.5.16", "0.5.23"])
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM",
                                  "Qwen3MoeForCausalLM", "GptOssForCausalLM", "DeepseekV3ForCausalLM"])
def test_aux_ids_mean_layer_outputs_for_each_family(monkeypatch, dirs, hf_runner, arch, release):
    use_fake(monkeypatch, release)
    r = sg.build(dirs(arch), dtype="float32")
    try:
        _check(r, hf_runner, [1, 3, 4])
        _check(r, hf_runner, [6, 0, 2], seed=1)  # a second set replaces the first
    finally:
        r.close()


@pytest.mark.parametrize("release", ["0.5.16", "0.5.23"])
def test_flag_based_family_captures_only_the_last_set(monkeypatch, dirs, hf_runner, release):
    """Qwen-MoE's setter flags layers and never clears them: without the engine clearing
    them, the second set would capture six layers."""
    use_fake(monkeypatch, release)
    r = sg.build(dirs("Qwen3MoeForCausalLM"), dtype="float32")
    try:
        r.set_aux_layers([1, 3, 4])
        r.set_aux_layers([0, 2, 5])
        assert r._flagged() == [1, 3, 6]
        _check(r, hf_runner, [0, 2, 5])
        r.forward_packed(*ragged([4], S=4), mode="stock")  # stock clears, then restores
        assert r._flagged() == [1, 3, 6]
    finally:
        r.close()


@pytest.mark.parametrize("release", ["0.5.16", "0.5.17", "0.5.23"])
def test_deepseek_index_quirk_is_corrected_and_packed_aux_is_split(monkeypatch, dirs, hf_runner, release):
    """DeepSeek's setter adds the +1 only when the first id is 1, and packs [T,3H] from
    0.5.17: ids [0,2,5] must still mean layers 0, 2 and 5."""
    use_fake(monkeypatch, release)
    r = sg.build(dirs("DeepseekV3ForCausalLM"), dtype="float32")
    try:
        assert r.model.packed == (release != "0.5.16")
        _check(r, hf_runner, [5, 0, 2])
        assert r.model.model.layers_to_capture == [1, 3, 6]
    finally:
        r.close()


@pytest.mark.parametrize("arch", ["GptOssForCausalLM", "Gemma3ForCausalLM"])
def test_families_that_capture_the_last_layer_may(monkeypatch, dirs, hf_runner, arch):
    use_fake(monkeypatch, "0.5.16")
    r = sg.build(dirs(arch), dtype="float32")
    try:
        _check(r, hf_runner, [7, 1, 4])  # 7 = the last of 8 layers, before the final norm
    finally:
        r.close()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_the_last_layer_is_refused_where_the_family_cannot_capture_it(monkeypatch, dirs, arch):
    use_fake(monkeypatch, "0.5.23")
    r = sg.build(dirs(arch), dtype="float32")
    try:
        with pytest.raises(ValueError, match=r"aux id 7 \(the last decoder layer\).*engine='hf'"):
            r.set_aux_layers([1, 3, 7])
    finally:
        r.close()


@pytest.mark.parametrize("release", ["0.5.17", "0.5.20", "0.5.23"])
def test_gemma3_is_refused_where_its_capture_is_not_the_residual_stream(monkeypatch, dirs, release):
    ctx = use_fake(monkeypatch, release)
    with pytest.raises(sg.SGLangUnavailableError, match="Gemma-3.*not the residual stream.*0.5.9-0.5.16"):
        sg.build(dirs("Gemma3ForCausalLM"), dtype="float32")
    assert ctx.torn_down  # the half-built runner's groups were torn down


def test_gemma3_on_0516_captures_the_stream(monkeypatch, dirs, hf_runner):
    use_fake(monkeypatch, "0.5.16")
    r = sg.build(dirs("Gemma3ForCausalLM"), dtype="float32")
    try:
        _check(r, hf_runner, [2, 5, 3])
    finally:
        r.close()


def test_the_gemma3_refusal_is_what_keeps_it_right(monkeypatch, dirs, hf_runner):
    """Without the refusal, 0.5.17's Gemma-3 capture gives wrong aux: the check matters."""
    use_fake(monkeypatch, "0.5.17")
    monkeypatch.setitem(sg.CAPTURE_TABLE, "Gemma3ForCausalLM", sg.Capture("Gemma-3-unchecked", last_layer=True))
    r = sg.build(dirs("Gemma3ForCausalLM"), dtype="float32")
    try:
        with pytest.raises(AssertionError):
            _check(r, hf_runner, [2, 5, 3])
    finally:
        r.close()


@pytest.mark.parametrize("arch, family", [("MixtralForCausalLM", "Mixtral"), ("Gemma2ForCausalLM", "Gemma-2")])
def test_families_without_capture_are_refused_before_loading(monkeypatch, dirs, arch, family):
    ctx = use_fake(monkeypatch, "0.5.23")
    with pytest.raises(sg.SGLangUnavailableError, match=f"no EAGLE-3 capture for {arch}.*engine='hf'"):
        sg.build(dirs(arch))
    assert ctx.runners == []


def test_capture_table_rows_are_consistent():
    for arch, rule in sg.CAPTURE_TABLE.items():
        assert rule.index in ("k+1", "k+1 if ids[0]==1"), arch
        assert rule.refuse is None or "engine='hf'" in rule.refuse, arch
    assert sg.capture_rule("DeepseekV3ForCausalLM").packed
    assert not sg.capture_rule("Qwen3MoeForCausalLM").resets
    assert sg.capture_rule("GptOssForCausalLM").last_layer
    assert sg.capture_rule("LlamaForCausalLM").last_layer is False
