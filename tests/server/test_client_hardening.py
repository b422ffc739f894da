"""The client never accepts a wrong answer and never waits past its deadline, against a
scripted HTTP server on loopback that lies: tensors of the wrong shape or dtype, a
missing tensor, an empty 204, a Content-Length of 10^13, model info that is not JSON, a
server that drips one byte a second, and a Retry-After of 27 hours."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save

from eagle3_target.client import RemoteTarget, RemoteTargetError, RemoteTargetUnavailable
from eagle3_target.client.failover import MAX_COOL_DOWN, Server

V, H, B, S = 16, 4, 2, 3
INFO = {"protocol": 1, "num_hidden_layers": 2, "hidden_size": H, "vocab_size": V,
        "aux_layer_ids": [0, 0, 1], "modes": ["logits", "draft", "hidden", "topk"]}


def _answer(**tensors: torch.Tensor) -> bytes:
    return save(tensors, metadata={"mode": "logits"})


GOOD = {"aux_hidden_states": torch.zeros(B, S, 3 * H), "logits": torch.zeros(B, S, V)}


class Script:
    def __init__(self):
        self.info = json.dumps(INFO).encode()
        self.body = _answer(**GOOD)
        self.status = 200
        self.headers: dict[str, str] = {}
        self.declared: int | None = None
        self.drip: float | None = None  # seconds between bytes of the supervision answer
        self.calls = 0


@pytest.fixture()
def scripted():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str], declared=None,
                  drip=None):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if status != 204:
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
            self.end_headers()
            try:
                if drip is None:
                    self.wfile.write(body)
                else:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(drip)
            except OSError:
                pass
            if declared is not None:
                self.close_connection = True

        def do_GET(self):
            self._send(200, script.info, {"Content-Type": "application/json"})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            script.calls += 1
            self._send(script.status, script.body if script.status != 204 else b"",
                       script.headers, script.declared, script.drip)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield script
    httpd.shutdown()
    httpd.server_close()


def _batch():
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones(B, S, dtype=torch.int64), torch.ones(B, S, dtype=torch.int64)


@pytest.mark.parametrize("tensors, message", [
    ({**GOOD, "logits": torch.zeros(B, S, 21)}, r"logits: shape \[2, 3, 21\], expected \[2, 3, 16\]"),
    ({**GOOD, "aux_hidden_states": torch.zeros(B + 1, S, 3 * H)},
     r"aux_hidden_states: shape \[3, 3, 12\], expected \[2, 3, 12\]"),
    ({**GOOD, "logits": torch.zeros(B, S, V, dtype=torch.int64)},
     "logits: dtype int64, expected a floating dtype"),
    ({"aux_hidden_states": GOOD["aux_hidden_states"]}, "the logits answer lacks logits"),
])
def test_a_wrong_tensor_is_refused_naming_the_field(scripted, tensors, message):
    scripted.body = _answer(**tensors)
    with RemoteTarget(scripted.url, mode="logits", retries=2, backoff=0.01) as rt:
        with pytest.raises(RemoteTargetError, match=message) as info:
            rt.generate_batch(*_batch())
    assert info.value.error == "bad_response"
    assert scripted.calls == 1  # a wrong answer is not retried


def test_an_explicit_wire_dtype_must_come_back(scripted):
    with RemoteTarget(scripted.url, mode="logits", dtype="bfloat16", retries=0) as rt:
        with pytest.raises(RemoteTargetError, match="aux_hidden_states: dtype float32, expected bfloat16"):
            rt.generate_batch(*_batch())


def test_topk_indices_and_k_are_checked(scripted):
    scripted.body = _answer(aux_hidden_states=torch.zeros(B, S, 3 * H),
                            topk_values=torch.zeros(B, S, 4), logsumexp=torch.zeros(B, S),
                            topk_indices=torch.zeros(B, S, 4, dtype=torch.int32))
    with RemoteTarget(scripted.url, mode="topk", topk=3, retries=0) as rt:
        with pytest.raises(RemoteTargetError, match=r"topk_values: shape \[2, 3, 4\], expected \[2, 3, 3\]"):
            rt.generate_topk(*_batch())
        assert rt.generate_topk(*_batch(), k=4).topk_values.shape == (B, S, 4)


def test_an_empty_204_is_a_bad_response(scripted):
    scripted.status = 204
    with RemoteTarget(scripted.url, mode="logits", retries=0) as rt:
        with pytest.raises(RemoteTargetError, match="status 204, expected 200") as info:
            rt.generate_batch(*_batch())
    assert info.value.error == "bad_response"


def test_a_huge_content_length_is_refused_before_allocating(scripted):
    scripted.declared = 10 ** 13
    with RemoteTarget(scripted.url, mode="logits", retries=0) as rt:
        t0 = time.monotonic()
        with pytest.raises(RemoteTargetError, match=f"declares a {10 ** 13}-byte body") as info:
            rt.generate_batch(*_batch())
        assert time.monotonic() - t0 < 5
    assert info.value.error == "bad_response"


@pytest.mark.parametrize("info, message", [
    (b"<html>gateway</html>", "model info is not JSON"),
    (b"[1, 2]", "model info is a JSON list"),
    (json.dumps({**INFO, "vocab_size": "16"}).encode(), "'vocab_size': expected a positive integer"),
    (json.dumps({k: v for k, v in INFO.items() if k != "aux_layer_ids"}).encode(), "'aux_layer_ids'"),
])
def test_model_info_that_is_not_ours_is_a_remote_target_error(scripted, info, message):
    scripted.info = info
    with pytest.raises(RemoteTargetError, match=message) as e:
        RemoteTarget(scripted.url, mode="logits", retries=0)
    assert e.value.error == "bad_response"


def test_the_timeout_is_a_deadline_for_the_whole_request(scripted):
    scripted.drip = 0.2  # a complete answer would take minutes; every read returns a byte
    t0 = time.monotonic()
    with RemoteTarget(scripted.url, mode="logits", timeout=1.5, retries=1, backoff=0.01,
                      max_backoff=0.01) as rt:
        with pytest.raises(RemoteTargetUnavailable, match="within the 1.5 s deadline"):
            rt.generate_batch(*_batch())
    took = time.monotonic() - t0
    assert took < 2 * 1.5 + 1.5, took  # two attempts of 1.5 s each, and some slack
    assert scripted.calls == 2


def test_retry_after_is_capped():
    srv = Server("http://127.0.0.1:9", token=None, timeout=1.0, pool=1)
    srv.mark_down(100000.0)
    assert srv.down_until - time.monotonic() <= MAX_COOL_DOWN
    srv.mark_down(-5.0)
    assert srv.down_until <= time.monotonic()
    srv.http.close()


def test_a_server_that_says_retry_after_100000_is_tried_again_within_the_cap(scripted):
    scripted.status, scripted.headers = 503, {"Retry-After": "100000"}
    with RemoteTarget(scripted.url, mode="logits", retries=0) as rt:
        with pytest.raises(RemoteTargetUnavailable):
            rt.generate_batch(*_batch())
        (srv,) = list(rt._servers)
        assert srv.down_until - time.monotonic() <= MAX_COOL_DOWN
