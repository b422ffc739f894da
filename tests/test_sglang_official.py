"""SGLang's official capture switch (``enable_return_aux_hidden_states``, 0.5.23): the
engine uses it for the aux and hidden modes and arms its own logits-processor wrapper
only for all-position logits; on releases without it the wrapper does all modes."""

from __future__ import annotations

import pytest

from eagle3_target.engines import sglang as sg
from sglang_helpers import assert_rows_match, hf_rows, ragged, use_fake


@pytest.mark.parametrize("release, official", [("0.5.22", False), ("0.5.23", True)])
def test_who_produces_each_mode(monkeypatch, tiny_path, hf_runner, release, official):
    use_fake(monkeypatch, release)
    r = sg.build(tiny_path, dtype="float32")
    try:
        aux_ids = [4, 1, 6]
        r.set_aux_layers(aux_ids)
        ids, mask = ragged([8, 5, 11], S=11, seed=3)
        ref = hf_rows(hf_runner, ids, mask, aux_ids)
        lp = r._wrappers[0].inner
        for mode, key, slot, stock in (("aux", "aux", 1, official), ("hidden", "hidden", 2, official),
                                       ("logits", "logits", 0, False)):
            lp.calls.clear()
            out = r.forward_packed(ids, mask, mode)
            # the stock processor ran (official output) or the wrapper took over
            assert ("stock" in lp.calls) == stock, (mode, lp.calls)
            assert_rows_match(out["aux"], mask, ref, 1)
            assert_rows_match(out[key], mask, ref, slot)
    finally:
        r.close()


def test_official_output_with_a_missing_capture_is_an_error(monkeypatch, tiny_path):
    use_fake(monkeypatch, "0.5.23")
    r = sg.build(tiny_path, dtype="float32")
    try:
        r.set_aux_layers([1, 3, 4])
        r.model.model.layers_to_capture = [2, 4]  # as if the model captured only two layers
        with pytest.raises(RuntimeError, match=r"packed aux states of shape \(5, 256\), expected \[5, 384\]"):
            r.forward_packed(*ragged([5], S=5), mode="aux")
    finally:
        r.close()
