"""The transformers engine against transformers itself: real model code, tiny random
weights, fp32 on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eagle3_target import Eagle3TargetModel
from eagle3_target.engines.hf import HFTargetRunner, find_decoder_layers

from batches import right_padded_batch


def _tiny(kind: str, layers: int = 6) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(1)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    else:
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    return m.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_aux_and_logits_equal_transformers(kind):
    model = _tiny(kind)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = right_padded_batch([9, 6, 3], 96, seed=3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    # transformers keeps hooks of its own once output_hidden_states was asked for; ours
    # must leave exactly those behind.
    layers = find_decoder_layers(model)
    hooks_before = [dict(layer._forward_hooks) for layer in layers]
    target = Eagle3TargetModel(HFTargetRunner(model), aux_layer_ids=[0, 2, 4])
    logits, aux = target.runner.forward_eagle3(ids, mask)
    expected_aux = torch.cat([ref.hidden_states[k + 1] for k in (0, 2, 4)], dim=-1)
    assert aux.shape == (3, 9, 96) and logits.shape == (3, 9, 96)
    torch.testing.assert_close(aux, expected_aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    # Hooks are gone and the weights are untouched.
    assert [dict(layer._forward_hooks) for layer in layers] == hooks_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_aux_order_follows_ids(tiny_target):
    ids, mask = right_padded_batch([7], tiny_target.vocab_size, seed=5)
    runner = tiny_target.runner
    h = tiny_target.hidden_size
    _, aux = runner.forward_eagle3(ids, mask)
    runner.set_aux_layers([4, 1, 3])
    try:
        _, aux_rev = runner.forward_eagle3(ids, mask)
    finally:
        runner.set_aux_layers(tiny_target.aux_layer_ids)
    assert tiny_target.aux_layer_ids == [1, 3, 4]
    torch.testing.assert_close(aux_rev[..., :h], aux[..., 2 * h:])
    torch.testing.assert_close(aux_rev[..., h:2 * h], aux[..., :h])


def test_right_padding_matches_unpadded_row(tiny_target):
    v = tiny_target.vocab_size
    ids, mask = right_padded_batch([12, 5], v, seed=7)
    loss = mask.clone()
    padded = tiny_target.generate_batch(ids, mask, loss)
    alone = tiny_target.generate_batch(ids[1:, :5], mask[1:, :5], loss[1:, :5])
    torch.testing.assert_close(padded.aux_hidden_states[1, :5], alone.aux_hidden_states[0],
                               rtol=1e-5, atol=1e-5)
    # Shifted logits: position i predicts token i+1; the last real one (i=4) has no target
    # in the short row, so compare the 4 positions with a target and the zero tail.
    torch.testing.assert_close(padded.logits[1, :4], alone.logits[0, :4], rtol=1e-5, atol=1e-5)
    assert bool((alone.logits[0, 4] == 0).all())
    assert torch.equal(padded.loss_mask[1, :4], alone.loss_mask[0, :4])


def test_row_alone_equals_row_in_batch_of_four(tiny_target):
    v = tiny_target.vocab_size
    ids, mask = right_padded_batch([20, 13, 20, 8], v, seed=11)
    loss = mask.clone()
    batch = tiny_target.generate_batch(ids, mask, loss)
    for i, n in enumerate([20, 13, 20, 8]):
        one = tiny_target.generate_batch(ids[i:i + 1, :n], mask[i:i + 1, :n], loss[i:i + 1, :n])
        torch.testing.assert_close(batch.aux_hidden_states[i, :n], one.aux_hidden_states[0],
                                   rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(batch.logits[i, :n - 1], one.logits[0, :n - 1],
                                   rtol=1e-5, atol=2e-5)


def test_hidden_mode_rebuilds_the_logits(tiny_target):
    ids, mask = right_padded_batch([10, 4], tiny_target.vocab_size, seed=2)
    loss = mask.clone()
    full = tiny_target.generate_batch(ids, mask, loss)
    aux, hidden = tiny_target.generate_hidden(ids, mask, loss)
    assert hidden.shape == (2, 10, tiny_target.hidden_size)
    torch.testing.assert_close(aux, full.aux_hidden_states)
    torch.testing.assert_close(tiny_target.lm_head()(hidden), full.logits, rtol=1e-5, atol=1e-5)


def test_input_embeddings(tiny_target):
    w = tiny_target.get_input_embeddings().weight
    assert w.shape == (tiny_target.vocab_size, tiny_target.hidden_size)
    assert torch.equal(w, tiny_target.runner.model.get_input_embeddings().weight)


def test_unsupported_layout_is_a_clear_error():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="cannot find the decoder layers of NotAnLM"):
        HFTargetRunner(NotAnLM())


def test_close_is_idempotent_and_final(tiny_model_dir):
    t = Eagle3TargetModel.from_pretrained(str(tiny_model_dir), device="cpu")
    t.close()
    t.close()
    ids, mask = right_padded_batch([3], 100)
    with pytest.raises(RuntimeError, match="closed"):
        t.generate_batch(ids, mask, mask)


def test_from_pretrained_rejects_bad_engine_and_dtype(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        Eagle3TargetModel.from_pretrained(str(tiny_model_dir), engine="vllm")
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        Eagle3TargetModel.from_pretrained(str(tiny_model_dir), dtype="int8")


def test_bf16_load(tiny_model_dir):
    t = Eagle3TargetModel.from_pretrained(str(tiny_model_dir), device="cpu", dtype="bf16")
    try:
        ids, mask = right_padded_batch([6], t.vocab_size)
        out = t.generate_batch(ids, mask, mask)
        assert out.logits.dtype == torch.bfloat16 and out.aux_hidden_states.dtype == torch.bfloat16
    finally:
        t.close()
