"""HTTP behaviour of a real server: auth on every endpoint but /health, 404/405/413/415
as JSON, metrics, and the serve command's refusal to bind exposed without a token."""

from __future__ import annotations

import base64
import subprocess
import sys

import httpx
import pytest
import torch

from eagle3_target.wire import nmet
from eagle3_target.wire.v1 import encode_safetensors
from server_helpers import MAX_BATCH_TOKENS, MAX_REQUEST_BYTES, make_inputs, metric

ENDPOINTS = [("GET", "/v1/model_info"), ("GET", "/v1/input_embeddings"), ("GET", "/v1/lm_head"),
             ("POST", "/v1/vocab_mapping"), ("POST", "/v1/supervision"), ("GET", "/metrics"),
             ("POST", "/model_info"), ("POST", "/input_embeddings"), ("POST", "/generate"),
             ("POST", "/set_vocab_mapping"), ("POST", "/init_nccl"), ("POST", "/heartbeat"),
             ("POST", "/disconnect"), ("GET", "/no/such/path")]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_every_endpoint_but_health_needs_the_token(server, token, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": _basic("u", "wrong")},
                    {"Authorization": f"Token {token}"}):
        r = httpx.request(method, server.url + path, headers=headers, content=b"", trust_env=False, timeout=60)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"] == "unauthorized"
        assert "Bearer" in r.headers["www-authenticate"]


def test_bearer_and_basic_are_accepted_and_health_is_open(server, token):
    get = lambda headers: httpx.get(server.url + "/v1/model_info", headers=headers,  # noqa: E731
                                    trust_env=False, timeout=60)
    assert get({"Authorization": f"Bearer {token}"}).status_code == 200
    assert get({"Authorization": _basic("anyone", token)}).status_code == 200
    assert httpx.get(server.url.replace("http://", f"http://x:{token}@") + "/v1/model_info",
                     trust_env=False, timeout=60).status_code == 200
    assert httpx.get(server.url + "/health", trust_env=False, timeout=60).json() == {"status": "ok"}


def test_unknown_paths_404_and_wrong_methods_405_as_json(http):
    r = http.get("/v2/supervision")
    assert r.status_code == 404 and r.json() == {"error": "not_found",
                                                 "detail": "no endpoint /v2/supervision"}
    for method, path in (("GET", "/v1/supervision"), ("DELETE", "/generate"),
                         ("POST", "/v1/model_info"), ("POST", "/health")):
        r = http.request(method, path)
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed", (method, path)
        assert r.headers["allow"]


def test_body_over_the_cap_is_413_and_the_server_stays_up(http):
    big = b"\0" * (MAX_REQUEST_BYTES + 1)
    for path in ("/v1/supervision", "/generate", "/v1/vocab_mapping"):
        r = http.post(path, content=big)
        assert r.status_code == 413 and r.json()["error"] == "body_too_large", path
    # Chunked (no Content-Length) is counted as it streams.
    r = http.post("/v1/supervision", content=iter([b"\0" * 65536] * 17))
    assert r.status_code == 413
    assert http.get("/health").status_code == 200


def test_tokens_over_the_cap_are_413(http):
    rows = MAX_BATCH_TOKENS // 64 + 1
    ids, mask, loss = make_inputs(0, rows, 64)
    r = http.post("/v1/supervision", content=encode_safetensors(
        {"input_ids": ids.to(torch.int16), "attention_mask": mask.bool(), "loss_mask": loss.bool()}))
    assert r.status_code == 413 and r.json()["error"] == "too_many_tokens"
    r = http.post("/generate", content=nmet.encode(
        {"input_ids": ids.to(torch.int16), "attention_mask": mask.bool(), "loss_mask": loss.bool()}))
    assert r.status_code == 413


def test_wrong_content_type_is_415(http):
    r = http.post("/v1/supervision", json={"input_ids": [[1, 2]]})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"


def test_metrics_count_requests_tokens_bytes_and_errors(http):
    before = http.get("/metrics").text
    ids, mask, loss = make_inputs(5, 2, 10)
    body = encode_safetensors({"input_ids": ids, "attention_mask": mask, "loss_mask": loss})
    ok = http.post("/v1/supervision", params={"mode": "hidden"}, content=body)
    assert ok.status_code == 200 and ok.headers["x-eagle3-batch-requests"] == "1"
    assert http.post("/v1/supervision", params={"mode": "bad"}, content=body).status_code == 422
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    d = lambda name, **kw: metric(after.text, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert d("eagle3_requests_total", endpoint="/v1/supervision", code="200") == 1
    assert d("eagle3_errors_total", endpoint="/v1/supervision", code="422") == 1
    assert d("eagle3_supervision_tokens_total", mode="hidden") == int(mask.sum())
    assert d("eagle3_response_bytes_total", endpoint="/v1/supervision") >= len(ok.content)
    assert d("eagle3_engine_batches_total", kind="hidden") == 1
    assert metric(after.text, "eagle3_ready") == 1
    for name in ("eagle3_queue_depth", "eagle3_request_duration_seconds_count",
                 "eagle3_engine_seconds_count", "eagle3_requests_in_flight"):
        assert name in after.text


def test_serve_refuses_an_exposed_bind_without_a_token(tiny_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "EAGLE3_TARGET_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "eagle3_target.cli", "serve", "--model", tiny_path,
                        "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2
    assert "refusing to serve on non-loopback address '0.0.0.0' without a token" in r.stderr
