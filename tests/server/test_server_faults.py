"""Faults with real server processes: kill -9 mid-run (the client fails over, or waits
for the restart, and the training loop sees every batch exactly once), SIGTERM with a
request in flight, engine out-of-memory (503 + Retry-After, server keeps serving, merged
batches split), 503 while loading, --exit-on-disconnect."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from eagle3_target.client import RemoteTarget, RemoteTargetUnavailable
from eagle3_target.wire import nmet
from eagle3_target.server.process import ServerProcess
from eagle3_target.wire.v1 import encode_safetensors
from server_helpers import make_inputs, metric, server_args

FAULT_SERVER = str(Path(__file__).with_name("fault_server.py"))


def _inputs(n: int):
    return [make_inputs(5000 + i, 1 + i % 2, 12 + (i * 5) % 20) for i in range(n)]


def _check_stream(seen, inputs, reference):
    """The loop saw each batch once, in order, each equal to its own in-process result."""
    assert len(seen) == len(inputs)
    for (ids, mask, loss), got in zip(inputs, seen):
        ref = reference.generate_batch(ids, mask, loss)
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.aux_hidden_states, ref.aux_hidden_states, rtol=1e-4,
                                   atol=1e-4)
        assert torch.equal(got.input_ids, ref.input_ids)


@pytest.fixture(scope="module")
def pair(tiny_path, token):
    a = ServerProcess(server_args(tiny_path), token=token)
    b = ServerProcess(server_args(tiny_path), token=token)
    threads = [threading.Thread(target=s.start) for s in (a, b)]  # start both at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.url and b.url
    yield a, b
    a.stop()
    b.stop()


def test_kill_9_fails_over_and_every_batch_is_seen_once(pair, token, reference):
    a, b = pair
    inputs = _inputs(24)
    seen = []
    with RemoteTarget([a.url, b.url], token=token, mode="hidden", retries=6,
                      backoff=0.05) as rt:
        for i, batch in enumerate(rt.prefetch(inputs, depth=4)):
            seen.append(batch)
            if i == 6:
                a.kill()
        assert rt.stats["retries"] >= 1
    _check_stream(seen, inputs, reference)


def test_sigterm_lets_the_request_in_flight_finish(pair, token):
    _, b = pair
    ids, mask, loss = make_inputs(77, 8, 512)  # long enough to be mid-engine at SIGTERM
    body = encode_safetensors({"input_ids": ids, "attention_mask": mask, "loss_mask": loss})
    auth = {"Authorization": f"Bearer {token}"}
    box = {}

    def call():
        box["r"] = httpx.post(b.url + "/v1/supervision", params={"mode": "logits"}, content=body,
                              headers=auth, timeout=120, trust_env=False)

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 30
    while metric(httpx.get(b.url + "/metrics", headers=auth, trust_env=False, timeout=60).text,
                 "eagle3_requests_in_flight") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert b.stop() == 0
    t.join(60)
    r = box["r"]
    assert r.status_code == 200
    assert len(r.content) > 8 * 512 * 2048 * 4  # the whole logits tensor came back
    assert "stopped" in b.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(b.url + "/health", trust_env=False, timeout=60)


def test_kill_9_then_restart_on_the_same_port(tiny_path, token, reference):
    srv = ServerProcess(server_args(tiny_path), token=token).start()
    port = srv.url.rsplit(":", 1)[1]
    inputs = _inputs(10)
    seen = []
    restarted = {}

    def restart():
        time.sleep(0.5)
        restarted["srv"] = ServerProcess(server_args(tiny_path, "--port", port), token=token).start()

    try:
        # ~2 minutes of retries: a restart is slow on a loaded 2-core machine.
        with RemoteTarget(srv.url, token=token, mode="logits", retries=150, backoff=0.1,
                          max_backoff=1.0) as rt:
            for i, args in enumerate(inputs):
                seen.append(rt.generate_batch(*args))
                if i == 3:
                    srv.kill()
                    threading.Thread(target=restart).start()
            assert rt.stats["retries"] >= 1
    finally:
        srv.kill()
        deadline = time.monotonic() + 180
        while "srv" not in restarted and time.monotonic() < deadline:
            time.sleep(0.1)
        if "srv" in restarted:
            restarted["srv"].stop()
    _check_stream(seen, inputs, reference)


def test_no_server_left_is_a_clear_error(tiny_path, token):
    with pytest.raises(RemoteTargetUnavailable, match="after 3 attempts"):
        RemoteTarget("http://127.0.0.1:9", token=token, retries=2, backoff=0.01)


@pytest.fixture(scope="module")
def oom_server(tiny_path, token):
    srv = ServerProcess([], token=token, command=[sys.executable, FAULT_SERVER, tiny_path,
                                                  "256", "2.0", "--exit-on-disconnect"])
    srv.start(wait_healthy=False)
    # The loader sleeps 2 s after the socket listens: the first probe sees it loading.
    srv.first_health = httpx.get(srv.url + "/health", trust_env=False, timeout=60)
    deadline = time.monotonic() + 180
    while httpx.get(srv.url + "/health", trust_env=False, timeout=60).status_code != 200:
        assert time.monotonic() < deadline, srv.output()
        time.sleep(0.05)
    yield srv
    srv.stop()


def test_503_while_loading_then_ready(oom_server):
    r = oom_server.first_health
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    assert r.headers["retry-after"]
    assert httpx.get(oom_server.url + "/health", trust_env=False, timeout=60).json() == {"status": "ok"}


def test_generate_before_set_vocab_mapping_is_409(oom_server, token):
    ids, mask, loss = make_inputs(1, 1, 8)
    r = httpx.post(oom_server.url + "/generate", headers={"Authorization": f"Bearer {token}"},
                   content=nmet.encode({"input_ids": ids, "attention_mask": mask,
                                        "loss_mask": loss}), trust_env=False, timeout=60)
    assert r.status_code == 409 and r.json()["error"] == "no_vocab_mapping"


def test_engine_oom_is_503_with_retry_after_and_the_server_keeps_serving(oom_server, token,
                                                                         reference):
    auth = {"Authorization": f"Bearer {token}"}
    post = lambda inputs: httpx.post(  # noqa: E731
        oom_server.url + "/v1/supervision", params={"mode": "logits"}, headers=auth, timeout=60,
        trust_env=False, content=encode_safetensors(dict(zip(
            ("input_ids", "attention_mask", "loss_mask"), inputs))))
    r = post(make_inputs(1, 2, 200))  # 400 tokens > 256
    assert r.status_code == 503 and r.json()["error"] == "engine_out_of_memory"
    assert int(r.headers["retry-after"]) >= 1
    assert post(make_inputs(2, 1, 64)).status_code == 200

    # Eight 100-token requests at once: merged calls over 256 tokens run out of memory,
    # are split, and every request still gets its own correct answer.
    inputs = [make_inputs(300 + i, 1, 100) for i in range(8)]
    out = [None] * 8
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, post(inputs[i])))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    from safetensors.torch import load

    for args, r in zip(inputs, out):
        assert r.status_code == 200, r.text
        ref = reference.generate_batch(*args)
        torch.testing.assert_close(load(r.content)["logits"], ref.logits, rtol=1e-4, atol=1e-4)
    text = httpx.get(oom_server.url + "/metrics", headers=auth, trust_env=False, timeout=60).text
    assert metric(text, "eagle3_engine_oom_total") >= 1
    assert metric(text, "eagle3_errors_total", endpoint="/v1/supervision", code="503") == 1


def test_exit_on_disconnect(oom_server, token):
    r = httpx.post(oom_server.url + "/disconnect", headers={"Authorization": f"Bearer {token}"},
                   content=b"{}", trust_env=False, timeout=60)
    assert r.json() == {"status": "ok"}
    assert oom_server.proc.wait(30) == 0
