"""The client's transport against a scripted HTTP server on loopback: malformed
safetensors answers are a clear RemoteTargetError (not retried), cut-off bodies are
retried, pooled connections the server closed are replaced silently, auth headers
travel, and the body lands in one buffer whose tensors are views."""

from __future__ import annotations

import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save

from eagle3_target.client import RemoteTarget, RemoteTargetError, RemoteTargetUnavailable

INFO = {"protocol": 1, "num_hidden_layers": 2, "hidden_size": 4, "vocab_size": 16,
        "aux_layer_ids": [0, 0, 1], "modes": ["logits", "draft", "hidden", "topk"]}
B, S = 2, 3
GOOD = save({"aux_hidden_states": torch.arange(B * S * 12, dtype=torch.float32).view(B, S, 12),
             "logits": torch.ones(B, S, 16)}, metadata={"mode": "logits"})


def _garble(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(B * S * 16 * 4 + B * S * 12 * 4)


OVERLAP = _garble({
    "aux_hidden_states": {"dtype": "F32", "shape": [B, S, 12], "data_offsets": [0, 288]},
    "logits": {"dtype": "F32", "shape": [B, S, 16], "data_offsets": [200, 584]}})


class Script:
    """What the scripted server answers: ``body`` for /v1/supervision, optionally
    announcing ``declared`` bytes and closing after the response."""

    def __init__(self):
        self.body = GOOD
        self.declared: int | None = None
        self.close_after = False
        self.supervision_calls = 0
        self.auth: list[str | None] = []
        self.connections: set[int] = set()


@pytest.fixture()
def scripted():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _send(self, body: bytes, ctype: str, declared: int | None = None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(declared if declared is not None else len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            if script.close_after or declared is not None:
                # Closed without "Connection: close", as an idle keep-alive timeout does.
                self.close_connection = True

        def do_GET(self):
            script.auth.append(self.headers.get("Authorization"))
            script.connections.add(self.client_address[1])
            self._send(json.dumps(INFO).encode(), "application/json")

        def do_POST(self):
            script.auth.append(self.headers.get("Authorization"))
            script.connections.add(self.client_address[1])
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            script.supervision_calls += 1
            self._send(script.body, "application/octet-stream", script.declared)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield script
    httpd.shutdown()
    httpd.server_close()


def _batch():
    ids = torch.randint(0, 16, (B, S), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones(B, S, dtype=torch.int64), torch.ones(B, S, dtype=torch.int64)


def test_body_is_read_into_one_buffer_and_decoded_as_views(scripted):
    with RemoteTarget(scripted.url, token="tok", mode="logits", retries=0) as rt:
        got = rt.generate_batch(*_batch())
        assert rt.stats["bytes_received"] == len(GOOD) + len(json.dumps(INFO))
    assert torch.equal(got.aux_hidden_states,
                       torch.arange(B * S * 12, dtype=torch.float32).view(B, S, 12))
    assert torch.equal(got.logits, torch.ones(B, S, 16))
    # Both tensors live in the one buffer the body was read into.
    a, lg = got.aux_hidden_states, got.logits
    assert a.untyped_storage().data_ptr() == lg.untyped_storage().data_ptr()
    assert scripted.auth and all(h == "Bearer tok" for h in scripted.auth)


@pytest.mark.parametrize("body, message", [
    (GOOD[:-10], "out of range"),
    (OVERLAP, "overlaps the previous tensor"),
    (b"\x05\x00\x00", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10 ** 12) + b"{}", "exceeds"),
    (_garble({"aux_hidden_states": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 872]}}),
     "unknown dtype"),
])
def test_a_malformed_answer_is_a_clear_error_and_not_retried(scripted, body, message):
    scripted.body = body
    with RemoteTarget(scripted.url, mode="logits", retries=3, backoff=0.01) as rt:
        with pytest.raises(RemoteTargetError, match=message) as info:
            rt.generate_batch(*_batch())
    assert info.value.error == "bad_response" and "/v1/supervision" in str(info.value)
    assert scripted.supervision_calls == 1


def test_a_cut_off_body_is_retried_then_unavailable(scripted):
    scripted.declared = len(GOOD) + 1000
    with RemoteTarget(scripted.url, mode="logits", retries=2, backoff=0.01,
                      max_backoff=0.02) as rt:
        with pytest.raises(RemoteTargetUnavailable, match="closed after"):
            rt.generate_batch(*_batch())
    assert scripted.supervision_calls == 3


def test_pooled_connections_the_server_closed_are_replaced_silently(scripted):
    scripted.close_after = True
    with RemoteTarget("http://user:s3cret@" + scripted.url[len("http://"):], mode="logits",
                      retries=0) as rt:
        for _ in range(3):
            rt.generate_batch(*_batch())
        assert rt.stats["retries"] == 0 and rt.stats["requests"] == 4
    assert scripted.supervision_calls == 3 and len(scripted.connections) == 4
    assert set(scripted.auth) == {"Basic dXNlcjpzM2NyZXQ="}  # base64("user:s3cret")
