"""The server is bounded in time and memory before authentication, against a real server
process on loopback with short limits: header size and count, header/body/idle
timeouts, 401 and 413 from the headers alone, clients that never read, the tensor cap,
strict parameters, rows over the model's context, and a shutdown with a stalled client."""

from __future__ import annotations

import json
import signal
import socket
import struct
import time

import httpx
import pytest
import torch

from eagle3_target.server.process import ServerProcess
from eagle3_target.wire.v1 import MAX_REQUEST_TENSORS, encode_safetensors
from server_helpers import make_inputs, metric, server_args

HEADER_T, BODY_T, SEND_T = 1.5, 2.0, 2.0
LIMITS = ["--max-batch-tokens", "8192", "--max-request-bytes", str(1 << 20),
          "--header-timeout", str(HEADER_T), "--body-timeout", str(BODY_T),
          "--send-timeout", str(SEND_T), "--idle-timeout", "1", "--shutdown-timeout", "2",
          "--max-header-bytes", "16384", "--max-headers", "50"]


@pytest.fixture(scope="module")
def limited(tiny_path, token):
    srv = ServerProcess(server_args(tiny_path, *LIMITS), token=token)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def authed(limited, token):
    with httpx.Client(base_url=limited.url, headers={"Authorization": f"Bearer {token}"},
                      trust_env=False, timeout=60) as c:
        yield c


def _connect(srv: ServerProcess, rcvbuf: int | None = None) -> socket.socket:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    s.settimeout(15)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _healthy(srv: ServerProcess) -> float:
    t0 = time.monotonic()
    assert httpx.get(srv.url + "/health", trust_env=False, timeout=10).status_code == 200
    return time.monotonic() - t0


# ----------------------------------------------------------------------------- headers
def test_a_huge_header_value_is_431_and_costs_nothing(limited):
    s = _connect(limited)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    try:
        for _ in range(64):  # 64 MiB offered; the server answers long before
            s.sendall(b"a" * (1 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass
    raw = _read_all(s)
    s.close()
    assert _status(raw) == 431 and b"headers_too_large" in raw
    assert _healthy(limited) < 1


def test_too_many_headers_is_431(limited):
    s = _connect(limited)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60))
              + b"\r\n")
    raw = _read_all(s)
    s.close()
    assert _status(raw) == 431 and b"too_many_headers" in raw


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a"])
def test_headers_that_do_not_arrive_in_time_end_the_connection(limited, sent):
    s = _connect(limited)
    t0 = time.monotonic()
    s.sendall(sent)
    raw = _read_all(s)
    took = time.monotonic() - t0
    s.close()
    assert HEADER_T - 0.3 < took < HEADER_T + 2, took
    assert _status(raw) == 408 and b"request_timeout" in raw


def test_a_keep_alive_connection_idle_after_a_request_is_closed(limited):
    s = _connect(limited)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    first = s.recv(65536)
    assert _status(first) == 200
    t0 = time.monotonic()
    assert _read_all(s) == b""
    assert time.monotonic() - t0 < HEADER_T + 2


# ----------------------------------------------------------------------------- bodies
def test_a_body_that_does_not_arrive_in_time_ends_the_connection(limited, token):
    s = _connect(limited)
    s.sendall(b"POST /v1/supervision?mode=logits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
              + token.encode() + b"\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
    t0 = time.monotonic()
    _read_all(s)
    took = time.monotonic() - t0
    s.close()
    assert BODY_T - 0.3 < took < BODY_T + 2, took
    assert _healthy(limited) < 1


@pytest.mark.parametrize("auth, status", [(False, 401), (True, 413)])
def test_401_and_413_come_from_the_headers_without_reading_the_body(limited, token, auth, status):
    s = _connect(limited)
    head = (b"POST /v1/supervision?mode=logits HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1000000000000\r\n")
    if auth:
        head += b"Authorization: Bearer " + token.encode() + b"\r\n"
    t0 = time.monotonic()
    s.sendall(head + b"\r\n" + b"x" * 100)
    raw = _read_all(s)
    s.close()
    assert _status(raw) == status, raw[:200]
    assert time.monotonic() - t0 < 1.5  # answered at once, not after 10^12 bytes or a timeout


def test_a_body_answered_early_is_not_taken_for_the_next_requests_headers(authed):
    # A 422 on the query comes before the body is read; the 200 KiB body that follows on
    # the keep-alive connection is a body, not 200 KiB of headers for the next request.
    ids = torch.zeros(1, 25_000, dtype=torch.int64)
    body = encode_safetensors({"input_ids": ids, "attention_mask": ids})
    r = authed.post("/v1/supervision", params={"mode": "bogus"}, content=body)
    assert r.status_code == 422 and r.json()["field"] == "mode"
    assert authed.get("/health").status_code == 200
    assert authed.post("/v1/supervision", params={"mode": "bogus"}, content=body).status_code == 422


# ----------------------------------------------------------------------------- answers
def _big_request(token: str, seq: int = 4096) -> bytes:
    # The logits answer is seq x 2048 fp32: 32 MiB for 4096, far above any socket buffer.
    ids, mask, loss = make_inputs(5, 1, seq)
    body = encode_safetensors({"input_ids": ids, "attention_mask": mask})
    return (b"POST /v1/supervision?mode=logits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + token.encode() + b"\r\nContent-Type: application/octet-stream\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_a_client_that_never_reads_is_cut_off_and_others_are_served(limited, token):
    stalled = [_connect(limited, rcvbuf=4096) for _ in range(3)]
    for s in stalled:
        s.sendall(_big_request(token))
    time.sleep(1.0)
    assert _healthy(limited) < 1  # the stalled ones hold nobody up
    time.sleep(SEND_T + 6)  # the engine runs the three, then each stalls and is cut off
    for s in stalled:
        got = _read_all(s)
        assert 0 < len(got) < 32 << 20  # some of the answer, never all of it
        s.close()
    assert _healthy(limited) < 1


# ----------------------------------------------------------------------------- bodies' content
def _safetensors_with(entries: list[tuple[str, dict]], data: bytes) -> bytes:
    raw = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}"
    raw = raw.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def test_duplicate_tensor_names_are_400(authed):
    entry = {"dtype": "I64", "shape": [1, 2], "data_offsets": [0, 16]}
    body = _safetensors_with([("input_ids", entry), ("attention_mask", entry),
                              ("input_ids", entry)], bytes(16))
    r = authed.post("/v1/supervision", params={"mode": "logits"}, content=body)
    assert r.status_code == 400 and "'input_ids' appears twice" in r.json()["detail"]


def test_more_tensors_than_the_cap_are_400_before_parsing(authed):
    n = MAX_REQUEST_TENSORS + 1
    body = _safetensors_with([(f"t{i}", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})
                              for i in range(n)], b"")
    r = authed.post("/v1/supervision", params={"mode": "logits"}, content=body)
    assert r.status_code == 400 and f"holds {n} tensors" in r.json()["detail"]


@pytest.mark.parametrize("k", [" 4 ", "\u0664", "1_0", "+4", "4.0", "04x"])
def test_k_must_be_ascii_digits(authed, k):
    ids, mask, _ = make_inputs(1, 1, 8)
    r = authed.post("/v1/supervision", params={"mode": "topk", "k": k},
                    content=encode_safetensors({"input_ids": ids, "attention_mask": mask}))
    assert r.status_code == 422 and r.json()["field"] == "k", r.text


def test_a_row_longer_than_the_models_context_is_413(authed):
    assert authed.get("/v1/model_info").json()["max_context"] == 4096
    ids = torch.ones(1, 4097, dtype=torch.int64)
    r = authed.post("/v1/supervision", params={"mode": "logits"},
                    content=encode_safetensors({"input_ids": ids, "attention_mask": ids}))
    assert r.status_code == 413 and r.json()["error"] == "row_too_long"
    assert "context of 4096" in r.json()["detail"]


# ----------------------------------------------------------------------------- shutdown
def _answer_started(s: socket.socket) -> bool:
    try:
        return bool(s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def test_shutdown_with_stalled_clients_is_quick_and_quiet(tiny_path, token):
    srv = ServerProcess(server_args(tiny_path, *LIMITS, "--send-timeout", "60"), token=token)
    srv.start()
    stalled = [_connect(srv, rcvbuf=4096) for _ in range(2)]
    for s in stalled:
        s.sendall(_big_request(token, seq=1024))  # 8 MiB answers nobody reads
    half = _connect(srv)
    half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    deadline = time.monotonic() + 120
    while not all(_answer_started(s) for s in stalled):  # the engine is done; sending stalls
        assert time.monotonic() < deadline
        time.sleep(0.1)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    while "stopped" not in srv.output():
        assert srv.proc.poll() is None or "stopped" in srv.output(), srv.output()[-2000:]
        assert time.monotonic() - t0 < 30, srv.output()[-2000:]
        time.sleep(0.05)
    took = time.monotonic() - t0
    code = srv.proc.wait(60)  # what is left is the interpreter's exit
    srv.stop()
    for s in stalled + [half]:
        s.close()
    # --shutdown-timeout 2: the stalled clients are cut off then, not after uvicorn's 60 s
    # or never; the rest is closing the engine.
    assert code == 0 and took < 2 + 3, (took, srv.output()[-2000:])
    assert "Traceback" not in srv.output() and "CancelledError" not in srv.output()


def test_requests_still_queued_after_the_drain_timeout_get_a_503_to_retry(tiny_path, token):
    # --drain-timeout 0.2: requests still waiting for the engine then are cancelled, each
    # with a 503 that says when to retry (as the server's other 503s do), not a cut socket.
    srv = ServerProcess(server_args(tiny_path, *LIMITS, "--drain-timeout", "0.2", "--max-batch-tokens", "4096"),
                        token=token)
    srv.start()
    queued = [_connect(srv) for _ in range(12)]
    for s in queued:
        s.sendall(_big_request(token, seq=4096))  # one batch each: they wait in turn
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    answers = [_read_all(s) for s in queued]
    code = srv.proc.wait(60)
    srv.stop()
    for s in queued:
        s.close()
    statuses = [_status(a) for a in answers]
    cancelled = [a for a in answers if _status(a) == 503]
    assert cancelled and set(statuses) <= {200, 503}, statuses
    for a in cancelled:
        head = a.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\r\nretry-after: 2" in head and b'"error":"stopping"' in a.replace(b" ", b""), a[:400]
    assert code == 0 and "Traceback" not in srv.output()
