"""A request that asks to run alone (``batch=alone``) gets the same bytes whatever the
server batches beside it: its answers under another client's traffic are byte-identical
to its answer on a quiet server and never shared an engine call, while ``shared``
requests under the same traffic do get merged (the case that made ``--server`` dumps
differ from run to run)."""

from __future__ import annotations

import concurrent.futures
import threading

import httpx

from eagle3_target.wire.v1 import encode_safetensors
from server_helpers import make_inputs

OURS = encode_safetensors(dict(zip(("input_ids", "attention_mask", "loss_mask"), make_inputs(11, 2, 40))))
OTHER = encode_safetensors(dict(zip(("input_ids", "attention_mask", "loss_mask"), make_inputs(12, 2, 300))))


def _ask(http: httpx.Client, body: bytes, batch: str | None) -> httpx.Response:
    params = {"mode": "logits", **({"batch": batch} if batch else {})}
    r = http.post("/v1/supervision", params=params, content=body)
    assert r.status_code == 200, r.text
    return r


def _under_traffic(server, token, batch: str | None, rounds: int = 12) -> list[httpx.Response]:
    """Our request sent ``rounds`` times while two other clients keep the engine busy."""
    stop = threading.Event()

    def other_client():
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                          trust_env=False, timeout=120) as c:
            while not stop.is_set():
                _ask(c, OTHER, None)

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        others = [ex.submit(other_client) for _ in range(2)]
        try:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                              trust_env=False, timeout=120) as c:
                mine = list(ex.map(lambda _: _ask(c, OURS, batch), range(rounds)))
        finally:
            stop.set()
        for f in others:
            f.result()
    return mine


def test_alone_requests_are_byte_identical_whatever_runs_beside_them(http, server, token):
    quiet = _ask(http, OURS, "alone").content
    busy = _under_traffic(server, token, "alone")
    assert [r.headers["x-eagle3-batch-requests"] for r in busy] == ["1"] * len(busy)
    assert all(r.content == quiet for r in busy)


def test_shared_requests_do_get_merged_under_the_same_traffic(server, token):
    busy = _under_traffic(server, token, None)
    assert max(int(r.headers["x-eagle3-batch-requests"]) for r in busy) > 1


def test_batch_parameter_is_checked(http):
    r = http.post("/v1/supervision", params={"mode": "logits", "batch": "solo"}, content=OURS)
    assert r.status_code == 422 and r.json()["field"] == "batch"
