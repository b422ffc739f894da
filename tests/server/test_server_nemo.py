"""NeMo Automodel 0.7.0's own remote client (NCCL off) against our server gets the same
supervision as NeMo's in-process ``HFEagle3TargetModel`` + ``compute_supervision``.

Uses the real ``nemo-automodel==0.7.0`` wheel (installed ``--no-deps`` by the
Makefile's setup path); the token travels as the HTTP Basic password in the URL,
since NeMo's client cannot set headers."""

from __future__ import annotations

import warnings

import httpx
import pytest
import torch

from eagle3_target import build_vocab_mapping
from eagle3_target.wire import nmet
from server_helpers import make_inputs

with warnings.catch_warnings():
    # NeMo's import chain triggers torch.jit deprecation warnings that are not ours.
    warnings.simplefilter("ignore", DeprecationWarning)
    # Not skipped when missing: CI must run this test, and `make test` installs
    # nemo-automodel==0.7.0 --no-deps (plus pillow and requests from the test extras).
    from nemo_automodel.components.speculative.eagle.remote import wire as nemo_wire
    from nemo_automodel.components.speculative.eagle.remote.client import (
        RemoteEagle3TargetModel,
    )
    from nemo_automodel.components.speculative.eagle.remote.server import compute_supervision
    from nemo_automodel.components.speculative.eagle.target import HFEagle3TargetModel


@pytest.fixture(scope="module")
def nemo_inprocess(tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32,
                                                 attn_implementation="sdpa",
                                                 local_files_only=True)
    return HFEagle3TargetModel(model)


@pytest.fixture(scope="module")
def mapping():
    counts = torch.randint(0, 30, (2048,), generator=torch.Generator().manual_seed(7))
    return build_vocab_mapping(counts, 256, [0])


@pytest.fixture()
def nemo_client(server, token, monkeypatch):
    monkeypatch.setenv("NEMO_EAGLE_ENABLE_NCCL", "0")
    url = server.url.replace("http://", f"http://trainer:{token}@")
    client = RemoteEagle3TargetModel([url], device=torch.device("cpu"), timeout=60, max_retries=1)
    yield client
    client.close()


def test_nemo_client_gets_nemo_in_process_supervision(nemo_client, nemo_inprocess, mapping):
    info = nemo_client.model_info()
    assert info == {"num_hidden_layers": 8, "hidden_size": 128, "vocab_size": 2048,
                    "aux_layer_ids": nemo_inprocess.aux_layer_ids}
    weight = nemo_client.get_input_embeddings().weight
    assert torch.equal(weight, nemo_inprocess.get_input_embeddings().weight)
    nemo_client.set_vocab_mapping(mapping.selected_token_ids, mapping.selected_token_mask)
    for seed, (rows, seq) in enumerate([(2, 33), (1, 7), (4, 64)]):
        ids, mask, loss = make_inputs(200 + seed, rows, seq)
        ref = compute_supervision(nemo_inprocess, mapping.selected_token_ids,
                                  mapping.selected_token_mask, ids, mask, loss)
        for batch in (nemo_client.generate_batch(ids, mask, loss),
                      nemo_client.generate_batch_async(ids, mask, loss).result(60)):
            assert batch.logits is None
            for key, want in ref.items():
                got = getattr(batch, key)
                assert got.dtype == want.dtype and got.shape == want.shape, key
                if want.dtype.is_floating_point:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                else:
                    assert torch.equal(got, want), key
            assert torch.equal(batch.attention_mask, mask)


def test_disconnect_is_acknowledged_and_the_server_keeps_serving(server, token, nemo_client):
    nemo_client.close()  # POSTs /disconnect
    r = httpx.get(f"{server.url}/health", trust_env=False, timeout=60)
    assert r.status_code == 200
    auth = {"Authorization": f"Bearer {token}"}
    for path, expect in (("/init_nccl", {"status": "disabled"}), ("/heartbeat", {"status": "ok"}),
                         ("/disconnect", {"status": "ok"})):
        r = httpx.post(server.url + path, content=b"{}", headers=auth, trust_env=False, timeout=60)
        assert (r.status_code, r.json()) == (200, expect)
        assert r.headers["content-type"] == "application/json"


def test_generate_response_is_nmet_in_nemo_key_order(server, token, mapping):
    auth = {"Authorization": f"Bearer {token}"}
    httpx.post(server.url + "/set_vocab_mapping", headers=auth, trust_env=False, timeout=60,
               content=nemo_wire.encode_to_bytes({"selected_token_ids": mapping.selected_token_ids,
                                                  "selected_token_mask": mapping.selected_token_mask}))
    ids, mask, loss = make_inputs(300, 2, 12)
    r = httpx.post(server.url + "/generate", headers=auth, trust_env=False, timeout=60,
                   content=nmet.encode({"input_ids": ids, "attention_mask": mask, "loss_mask": loss}))
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    out = nmet.decode(r.content)
    assert list(out) == ["aux_hidden_states", "target_probs", "position_mask", "input_ids",
                         "loss_mask"]
    assert out["position_mask"].shape == (2, 12, 1) and out["position_mask"].dtype == torch.bool
    assert out["target_probs"].shape == (2, 12, 256) and out["target_probs"].dtype == torch.float32
    httpx.post(server.url + "/disconnect", headers=auth, content=b"{}", trust_env=False, timeout=60)


def test_nemo_endpoints_validate_like_the_native_ones(server, token):
    auth = {"Authorization": f"Bearer {token}"}
    post = lambda path, body: httpx.post(server.url + path, headers=auth, content=body,  # noqa: E731
                                         trust_env=False, timeout=60)
    r = post("/generate", b"NMET-but-not-really")
    assert r.status_code == 400 and "magic" in r.json()["detail"]
    ids, mask, loss = make_inputs(1, 1, 4)
    r = post("/generate", nmet.encode({"input_ids": ids.float(), "attention_mask": mask,
                                        "loss_mask": loss}))
    assert r.status_code == 422 and r.json()["field"] == "input_ids"
    r = post("/generate", nmet.encode({"input_ids": ids, "attention_mask": mask}))
    assert r.status_code == 422 and r.json()["field"] == "loss_mask"
    r = post("/set_vocab_mapping", nmet.encode({"selected_token_ids": torch.tensor([5000])}))
    assert r.status_code == 422 and "[0, 2048)" in r.json()["detail"]


def _nemo_mapping_body(m) -> bytes:
    return nemo_wire.encode_to_bytes({"selected_token_ids": m.selected_token_ids,
                                      "selected_token_mask": m.selected_token_mask})


def test_a_second_clients_different_mapping_is_refused_never_swapped(server, token, mapping):
    """Client A sets MA, client B tries MB and /generate races: every 200 carries MA's
    draft vocabulary; B is told about the one-mapping limit and the /v1 way out."""
    import concurrent.futures

    auth = {"Authorization": f"Bearer {token}"}
    post = lambda path, body: httpx.post(server.url + path, headers=auth, content=body,  # noqa: E731
                                         trust_env=False, timeout=60)
    other = build_vocab_mapping(torch.randint(0, 30, (2048,), generator=torch.Generator().manual_seed(8)),
                                300, [0])
    post("/disconnect", b"{}")
    assert post("/set_vocab_mapping", _nemo_mapping_body(mapping)).status_code == 200
    ids, mask, loss = make_inputs(400, 2, 16)
    gen = nmet.encode({"input_ids": ids, "attention_mask": mask, "loss_mask": loss})

    def b_sets():
        return post("/set_vocab_mapping", _nemo_mapping_body(other))

    def a_generates():
        return post("/generate", gen)

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(b_sets if i % 3 == 0 else a_generates) for i in range(24)]
        answers = [f.result() for f in futs]
    for i, r in enumerate(answers):
        if i % 3 == 0:
            assert r.status_code == 409, r.text
            body = r.json()
            assert body["error"] == "vocab_mapping_conflict"
            assert "one NeMo mapping at a time" in body["detail"] and "/v1" in body["detail"]
        else:
            assert r.status_code == 200
            assert nmet.decode(r.content)["target_probs"].shape == (2, 16, 256)
    # Setting the held mapping again is fine (a retry); after A's /disconnect B may set its own.
    assert post("/set_vocab_mapping", _nemo_mapping_body(mapping)).status_code == 200
    assert post("/disconnect", b"{}").status_code == 200
    assert post("/set_vocab_mapping", _nemo_mapping_body(other)).status_code == 200
    assert nmet.decode(post("/generate", gen).content)["target_probs"].shape == (2, 16, 300)
    post("/disconnect", b"{}")
