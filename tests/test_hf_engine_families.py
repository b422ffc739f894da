"""The transformers engine on every family users train drafts for (eagle3_target.families),
tiny random configs on the CPU in fp32: aux id k is transformers' output of decoder layer
k before the final norm, logits are the model's own, ragged right-padded rows equal
per-row runs, the LM head the client and the dump rebuild (tied, scaled, soft-capped)
gives the logits, the pre-norm state normed is the final hidden state, and families
whose attention needs it run with eager attention by default."""

from __future__ import annotations

import pytest
import torch

from eagle3_target import Eagle3TargetModel
from eagle3_target.contract import LMHead
from eagle3_target.engines import hf as hf_engine
from eagle3_target.families import FAMILIES, make_family_model

from batches import right_padded_batch

TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = str(make_family_model(name, root / name, head_scale=4.0))
        return made[name]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def runner(request, family_dirs):
    r = hf_engine.build(family_dirs(request.param), device="cpu", dtype="float32")
    yield request.param, r
    r.close()


def test_aux_logits_and_prenorm_equal_transformers(runner):
    name, r = runner
    n = r.model.config.num_hidden_layers
    aux_ids = [n - 1, 0, n // 2]  # the last layer too, and out of order
    r.set_aux_layers(aux_ids)
    v = r.model.config.vocab_size
    ids, mask = right_padded_batch([11, 7, 3], v, seed=2)
    logits, aux = r.forward_eagle3(ids, mask)
    pre, aux_p = r.forward_eagle3_prenorm(ids, mask)
    final, _ = r.forward_eagle3_hidden(ids, mask)
    with torch.no_grad():
        ref = r.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    h = r.model.config.hidden_size
    real = mask.bool()
    # ids below N-1: transformers' hidden_states[k+1]; N-1: hidden_states[N] is normed, so
    # the last layer's output is checked through the norm
    for j, k in enumerate(aux_ids):
        got = aux[..., j * h:(j + 1) * h]
        want = pre if k == n - 1 else ref.hidden_states[k + 1]
        torch.testing.assert_close(got[real], want[real], **TOL)
    torch.testing.assert_close(aux_p, aux)
    torch.testing.assert_close(logits, ref.logits, **TOL)
    torch.testing.assert_close(final[real], ref.hidden_states[n][real], **TOL)
    norm = r._decoder().norm
    with torch.no_grad():
        torch.testing.assert_close(norm(pre)[real], final[real], **TOL)


def test_ragged_rows_equal_per_row_runs(runner):
    name, r = runner
    n = r.model.config.num_hidden_layers
    r.set_aux_layers([1, n // 2, n - 2])
    lengths = [13, 9, 4]
    ids, mask = right_padded_batch(lengths, r.model.config.vocab_size, seed=5)
    logits, aux = r.forward_eagle3(ids, mask)
    for b, k in enumerate(lengths):
        row = ids[b:b + 1, :k]
        lg, ax = r.forward_eagle3(row, torch.ones_like(row))
        torch.testing.assert_close(logits[b, :k], lg[0], **TOL)
        torch.testing.assert_close(aux[b, :k], ax[0], **TOL)


def test_lm_head_rebuilds_the_logits(runner):
    name, r = runner
    n = r.model.config.num_hidden_layers
    r.set_aux_layers([0, 1, 2])
    ids, mask = right_padded_batch([8, 5], r.model.config.vocab_size, seed=7)
    logits, _ = r.forward_eagle3(ids, mask)
    final, _ = r.forward_eagle3_hidden(ids, mask)
    head = r.lm_head()
    # what a client or the dump rebuilds from the serialised pieces
    client = LMHead(weight=head.weight.clone(), bias=head.bias, scale=head.scale, softcap=head.softcap)
    torch.testing.assert_close(client(final), logits, **TOL)
    if name in ("qwen3", "gemma2", "gemma3"):
        assert head.weight.data_ptr() == r.input_embedding_weight().data_ptr()  # tied
    if name == "gemma2":
        assert head.softcap == 30.0


@pytest.mark.parametrize("name, default", [("gemma2", "eager"), ("gpt-oss", "eager"), ("llama", "sdpa"),
                                           ("gemma3", "sdpa")])
def test_attention_implementation_defaults_to_one_the_family_supports(family_dirs, name, default):
    path = family_dirs(name)
    assert hf_engine.default_attn_implementation(path) == default
    with Eagle3TargetModel.from_pretrained(path, device="cpu", dtype="float32") as t:
        assert t.runner.model.config._attn_implementation == default
    with Eagle3TargetModel.from_pretrained(path, device="cpu", dtype="float32",
                                           attn_implementation="eager") as t:  # the flag overrides
        assert t.runner.model.config._attn_implementation == "eager"


def test_router_scale_multiplies_exactly_the_moe_routers(tmp_path):
    from safetensors.torch import load_file

    from eagle3_target.families import is_router, make_family_model

    base = load_file(make_family_model("qwen3-moe", tmp_path / "a") / "model.safetensors")
    scaled = load_file(make_family_model("qwen3-moe", tmp_path / "b", router_scale=8.0) / "model.safetensors")
    routers = [k for k in base if is_router(k)]
    assert routers and all(k.endswith("mlp.gate.weight") for k in routers)
    for k, v in base.items():
        want = v * 8.0 if k in routers else v
        assert torch.equal(scaled[k], want), k
