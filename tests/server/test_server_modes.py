"""Every mode through a real server equals the in-process target, and the client's
``hidden`` rebuild equals what the server sends in ``logits`` and ``draft`` mode."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from eagle3_target import build_vocab_mapping, compute_target_distribution
from eagle3_target.client import RemoteTarget, RemoteTargetError
from eagle3_target.wire.v1 import encode_safetensors
from server_helpers import make_inputs

# One server process runs every forward; a request alone in its engine call has the
# same shapes as in process, so fp32 results agree to the last bit or nearly.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(100, 3, 40)


@pytest.fixture(scope="module")
def mapping(reference):
    counts = torch.randint(0, 50, (reference.vocab_size,), generator=torch.Generator().manual_seed(1))
    return build_vocab_mapping(counts, 300, [0, 1])


@pytest.fixture(scope="module")
def expected(reference, inputs, mapping):
    batch = reference.generate_batch(*inputs)
    probs, pmask = compute_target_distribution(batch.logits, mapping.selected_token_ids,
                                               mapping.selected_token_mask, batch.loss_mask)
    aux, hidden = reference.generate_hidden(*inputs)
    return batch, probs, pmask, hidden


def _remote(server, token, **kw):
    return RemoteTarget(server.url, token=token, **kw)


def test_model_info_matches(server, token, reference):
    with _remote(server, token, mode="logits") as rt:
        assert rt.aux_layer_ids == reference.aux_layer_ids
        assert (rt.vocab_size, rt.hidden_size, rt.num_hidden_layers) == (
            reference.vocab_size, reference.hidden_size, reference.num_hidden_layers)
        assert rt.info["modes"] == ["logits", "draft", "hidden", "topk"]
        assert rt.info["dtype"] == "float32" and rt.info["protocol"] == 1


def test_logits_mode_equals_in_process(server, token, inputs, expected):
    batch = expected[0]
    with _remote(server, token, mode="logits") as rt:
        got = rt.generate_batch(*inputs)
    torch.testing.assert_close(got.logits, batch.logits, **TOL)
    torch.testing.assert_close(got.aux_hidden_states, batch.aux_hidden_states, **TOL)
    for name in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(getattr(got, name), getattr(batch, name)), name
    assert not got.logits[:, -1].any()


def test_draft_mode_equals_in_process(server, token, inputs, mapping, expected):
    batch, probs, pmask, _ = expected
    with _remote(server, token, mode="draft") as rt:
        rt.set_vocab_mapping(mapping)
        got = rt.generate_batch(*inputs)
    assert got.logits is None
    torch.testing.assert_close(got.target_probs, probs, **TOL)
    assert got.target_probs.dtype == torch.float32
    assert torch.equal(got.position_mask, pmask)
    torch.testing.assert_close(got.aux_hidden_states, batch.aux_hidden_states, **TOL)


def test_hidden_mode_equals_in_process_and_rebuilds_logits_and_draft(server, token, inputs,
                                                                     mapping, expected):
    batch, probs, pmask, hidden = expected
    with _remote(server, token, mode="hidden") as rt:
        aux, got_hidden = rt.generate_hidden(*inputs)
        torch.testing.assert_close(got_hidden, hidden, **TOL)
        rebuilt = rt.generate_batch(*inputs)
        torch.testing.assert_close(rebuilt.logits, batch.logits, **TOL)
        torch.testing.assert_close(rebuilt.aux_hidden_states, batch.aux_hidden_states, **TOL)
        rt.set_vocab_mapping(mapping)
        rebuilt_draft = rt.generate_batch(*inputs)
    # ... and equal to what the server itself sends in logits and draft mode.
    with _remote(server, token, mode="logits") as rt:
        served = rt.generate_batch(*inputs)
    with _remote(server, token, mode="draft") as rt:
        rt.set_vocab_mapping(mapping)
        served_draft = rt.generate_batch(*inputs)
    torch.testing.assert_close(rebuilt.logits, served.logits, **TOL)
    torch.testing.assert_close(rebuilt_draft.target_probs, served_draft.target_probs, **TOL)
    assert torch.equal(rebuilt_draft.position_mask, served_draft.position_mask)
    torch.testing.assert_close(rebuilt_draft.target_probs, probs, **TOL)


def test_topk_mode_equals_in_process(server, token, inputs, expected):
    batch = expected[0]
    with _remote(server, token, mode="topk", topk=16) as rt:
        got = rt.generate_topk(*inputs)
        with pytest.raises(ValueError, match="generate_topk"):
            rt.generate_batch(*inputs)
    values, idx = batch.logits.topk(16, dim=-1)
    lse = torch.logsumexp(batch.logits, dim=-1)
    torch.testing.assert_close(got.topk_values[:, :-1], values[:, :-1], **TOL)
    assert torch.equal(got.topk_indices[:, :-1].long(), idx[:, :-1])
    assert got.topk_indices.dtype == torch.int32
    torch.testing.assert_close(got.logsumexp[:, :-1], lse[:, :-1], **TOL)
    assert not got.topk_values[:, -1].any() and not got.logsumexp[:, -1].any()
    assert torch.equal(got.input_ids, batch.input_ids)


def test_bf16_on_request_halves_the_bytes(server, token, inputs, expected):
    batch = expected[0]
    sizes = {}
    for dtype in ("auto", "bfloat16"):
        with _remote(server, token, mode="hidden", dtype=dtype) as rt:
            rt.lm_head()
            before = rt.stats["bytes_received"]
            aux, hidden = rt.generate_hidden(*inputs)
            sizes[dtype] = rt.stats["bytes_received"] - before
            got = rt.generate_batch(*inputs)
        assert aux.dtype == (torch.float32 if dtype == "auto" else torch.bfloat16)
    torch.testing.assert_close(got.logits, batch.logits, rtol=0.05, atol=0.05)
    assert sizes["bfloat16"] < 0.51 * sizes["auto"]


def test_embeddings_and_lm_head_equal_the_model(server, token, reference):
    with _remote(server, token, mode="hidden") as rt:
        assert torch.equal(rt.get_input_embeddings().weight,
                           reference.get_input_embeddings().weight)
        head, ref_head = rt.lm_head(), reference.lm_head()
        assert torch.equal(head.weight, ref_head.weight)
        assert (head.scale, head.softcap, head.bias) == (ref_head.scale, ref_head.softcap, None)


def test_server_side_errors_reach_the_client_unretried(server, token, inputs):
    with _remote(server, token, mode="logits", retries=3) as rt:
        with pytest.raises(ValueError, match="input_ids out of range"):
            rt.generate_batch(inputs[0] + 5000, *inputs[1:])  # caught before the wire
        before = rt.stats["requests"]
        with pytest.raises(RemoteTargetError) as e:
            rt._request("POST", "/v1/supervision", params={"mode": "nope"}, content=b"x")
        assert e.value.status == 422 and e.value.error == "invalid_parameter"
        assert rt.stats["requests"] == before + 1 and rt.stats["retries"] == 0


def test_draft_mapping_unknown_to_the_server_is_registered_on_demand(server, token, http,
                                                                     inputs, reference):
    fresh = build_vocab_mapping(torch.arange(reference.vocab_size), 123)
    body = encode_safetensors({"input_ids": inputs[0], "attention_mask": inputs[1],
                               "loss_mask": inputs[2]})
    r = http.post("/v1/supervision", params={"mode": "draft", "mapping_id": fresh.mapping_id},
                  content=body)
    assert r.status_code == 422 and r.json()["error"] == "unknown_mapping"
    with _remote(server, token, mode="draft") as rt:
        rt._mapping = fresh  # as if the server had restarted since set_vocab_mapping
        rt._device_mapping = (fresh.selected_token_ids, fresh.selected_token_mask)
        got = rt.generate_batch(*inputs)
    assert got.target_probs.shape[-1] == 123
    r = http.post("/v1/supervision", params={"mode": "draft", "mapping_id": fresh.mapping_id},
                  content=body)
    assert r.status_code == 200 and set(load(r.content)) == {
        "aux_hidden_states", "target_probs", "position_mask"}


def test_vocab_mapping_registration_is_content_addressed(http, mapping):
    ids_only = encode_safetensors({"selected_token_ids": mapping.selected_token_ids})
    with_mask = encode_safetensors({"selected_token_ids": mapping.selected_token_ids,
                                    "selected_token_mask": mapping.selected_token_mask})
    a = http.post("/v1/vocab_mapping", content=ids_only).json()
    b = http.post("/v1/vocab_mapping", content=with_mask).json()
    assert a == b == {"mapping_id": mapping.mapping_id, "draft_vocab_size": 300,
                      "target_vocab_size": 2048}
    dup = http.post("/v1/vocab_mapping", content=encode_safetensors(
        {"selected_token_ids": torch.tensor([1, 1, 2])}))
    assert dup.status_code == 422 and "duplicate" in dup.json()["detail"]
    wrong_mask = http.post("/v1/vocab_mapping", content=encode_safetensors(
        {"selected_token_ids": torch.tensor([1, 2]),
         "selected_token_mask": torch.zeros(2048, dtype=torch.bool)}))
    assert wrong_mask.status_code == 422
    assert "selected_token_mask" in wrong_mask.json()["detail"]


def test_the_client_in_the_protocol_doc_works(server, token, inputs, expected):
    """docs/protocol.md promises a client can be written from the page alone: run its
    example against the server."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    code = re.search(r"## A complete client\n\n```python\n(.*?)```", doc, re.S).group(1)
    code = code.replace('"http://127.0.0.1:8000", "..."', f'"{server.url}", "{token}"')
    ns: dict = {}
    exec(compile(code, "docs/protocol.md", "exec"), ns)
    aux, logits, ids, loss = ns["supervision"](*inputs)
    batch = expected[0]
    torch.testing.assert_close(logits.float(), batch.logits, rtol=0.05, atol=0.05)  # bf16 wire
    assert torch.equal(ids, batch.input_ids) and torch.equal(loss, batch.loss_mask)
    assert aux.dtype == torch.bfloat16
