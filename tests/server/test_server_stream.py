"""``/v1/supervision`` streams its body from the result tensors; the bytes are those
``safetensors.torch.save`` gives for the same tensors and metadata, under both of
uvicorn's HTTP implementations."""

from __future__ import annotations

import json
import struct

import httpx
import pytest
from safetensors.torch import load, save

from eagle3_target.server.process import ServerProcess
from eagle3_target.wire.v1 import encode_safetensors
from server_helpers import make_inputs, server_args


def _same_as_save(body: bytes) -> None:
    """``body`` is ``save(load(body), its metadata)`` byte for byte, except that the
    library writes several metadata keys in (varying) hash order and we sort them."""
    n = struct.unpack("<Q", body[:8])[0]
    header = json.loads(body[8:8 + n])
    meta = header["__metadata__"]
    assert list(meta) == sorted(meta)
    ref = save(load(body), metadata=meta)
    assert len(ref) == len(body) and ref[:8] == body[:8] and ref[8 + n:] == body[8 + n:]
    ref_header = json.loads(ref[8:8 + n])
    assert ref_header == header and list(ref_header) == list(header)


# h11 is not offered: the connection limits live in the guarded httptools protocol.
@pytest.mark.parametrize("http_impl", ["httptools"])
def test_streamed_supervision_is_save_bytes(tiny_path, token, http_impl):
    with ServerProcess(server_args(tiny_path, "--http", http_impl), token=token).start() as srv, \
            httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"},
                         trust_env=False, timeout=60) as c:
        ids, mask, loss = make_inputs(7, 3, 33)
        body = encode_safetensors({"input_ids": ids, "attention_mask": mask, "loss_mask": loss})
        for params in ({"mode": "hidden"}, {"mode": "logits", "dtype": "bfloat16"},
                       {"mode": "topk", "k": "5"}):
            r = c.post("/v1/supervision", params=params, content=body,
                       headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200, r.text
            assert int(r.headers["content-length"]) == len(r.content)
            _same_as_save(r.content)
            t = load(r.content)
            assert t["aux_hidden_states"].shape[:2] == (3, 33)
        # The connection stays usable after a streamed body (keep-alive framing intact).
        assert c.get("/v1/model_info").status_code == 200
