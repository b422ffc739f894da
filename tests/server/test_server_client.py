"""RemoteTarget behaviour that needs no fault: argument checks, URLs with credentials,
async and prefetch order, spreading over servers, and refusing a server that serves a
different model."""

from __future__ import annotations

import pytest
import torch

from eagle3_target.client import RemoteTarget, RemoteTargetError
from eagle3_target.client.failover import split_userinfo as split_userinfo
from eagle3_target.server.process import ServerProcess
from server_helpers import make_inputs, server_args


def test_urls_and_arguments_are_checked_before_any_request():
    url, auth = split_userinfo("http://trainer:s%40cret@10.0.0.1:8001/")
    assert url == "http://10.0.0.1:8001" and auth is not None
    assert split_userinfo("http://[::1]:8000") == ("http://[::1]:8000", None)
    for bad in ("ftp://host:1", "host:8000", "http://"):
        with pytest.raises(ValueError, match="expected http"):
            RemoteTarget(bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        RemoteTarget("http://127.0.0.1:9", mode="probs")
    with pytest.raises(ValueError, match="topk=k"):
        RemoteTarget("http://127.0.0.1:9", mode="topk")
    with pytest.raises(ValueError, match="topk must lie"):
        RemoteTarget("http://127.0.0.1:9", mode="topk", topk=65)
    with pytest.raises(ValueError, match="at least one server"):
        RemoteTarget([])


def test_async_and_prefetch_keep_order(server, token, reference):
    inputs = [make_inputs(700 + i, 1 + i % 3, 10 + 3 * i) for i in range(7)]
    with RemoteTarget(server.url, token=token, mode="logits") as rt:
        fut = rt.generate_batch_async(*inputs[0])
        as_dicts = [dict(zip(("input_ids", "attention_mask", "loss_mask"), x)) for x in inputs]
        got = list(rt.prefetch(as_dicts, depth=3))
        first = fut.result(60)
        with pytest.raises(ValueError, match="depth"):
            next(rt.prefetch(inputs, depth=0))
    assert len(got) == len(inputs)
    for x, b in zip(inputs, got):
        torch.testing.assert_close(b.logits, reference.generate_batch(*x).logits,
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first.logits, got[0].logits, rtol=1e-4, atol=1e-4)


def test_draft_mode_needs_a_mapping(server, token):
    with RemoteTarget(server.url, token=token, mode="draft") as rt:
        with pytest.raises(RuntimeError, match="set_vocab_mapping"):
            rt.generate_batch(*make_inputs(1, 1, 4))
        with pytest.raises(ValueError, match="vocabulary of 10"):
            from eagle3_target import VocabMapping

            rt.set_vocab_mapping(VocabMapping.from_ids(torch.arange(3), 10))


def test_wrong_token_is_not_retried(server):
    with pytest.raises(RemoteTargetError) as e:
        RemoteTarget(server.url, token="wrong", retries=5)
    assert e.value.status == 401 and e.value.error == "unauthorized"


@pytest.fixture(scope="module")
def other_aux_server(tiny_path, token):
    """The same weights served with different aux layers: a different target."""
    srv = ServerProcess(server_args(tiny_path, "--aux-layers", "0,2,5"), token=token).start()
    yield srv
    srv.stop()


def test_requests_spread_over_servers_and_a_different_model_is_refused(server, token,
                                                                        other_aux_server):
    with RemoteTarget(other_aux_server.url, token=token) as rt:
        assert rt.aux_layer_ids == [0, 2, 5]
    with RemoteTarget([server.url, server.url.replace("127.0.0.1", "localhost")], token=token,
                      mode="hidden", max_in_flight=4) as rt:
        list(rt.prefetch([make_inputs(i, 1, 8) for i in range(8)], depth=4))
        used = [k for k, v in rt.stats.items() if k.startswith("served_by:") and v > 0]
        assert len(used) == 2, rt.stats
    with RemoteTarget([server.url, other_aux_server.url], token=token, mode="hidden",
                      retries=0) as rt:
        with pytest.raises(RemoteTargetError, match="serves a different model"):
            list(rt.prefetch([make_inputs(i, 1, 8) for i in range(4)], depth=2))
