"""The streamed safetensors writer gives ``safetensors.torch.save``'s bytes, and the
zero-copy reader decodes them (and refuses malformed bodies, naming the problem)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from eagle3_target.wire.st_stream import (
    ST_DTYPES,
    SafetensorsFormatError,
    byte_view,
    decode_buffer,
    layout,
)


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(ST_DTYPES):
        raw = torch.randint(0, 256, (3 * dt.itemsize * (i + 1),), dtype=torch.uint8, generator=g)
        if dt == torch.bool:
            raw = raw % 2
        # Names out of dtype order, so the library's sort is exercised both ways.
        out[f"t{(7 * i) % 17:02d}_{str(dt)[6:]}"] = raw.view(dt).reshape(i + 1, 3)
    out["empty"] = torch.zeros(0, 4, dtype=torch.float32)
    out["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    out["naïve \"key\"\n"] = torch.arange(5, dtype=torch.int64)
    return out


def _streamed(tensors, metadata=None) -> bytes:
    header, order = layout(tensors, metadata)
    return header + b"".join(bytes(byte_view(t)) for t in order)


@pytest.mark.parametrize("metadata", [None, {"eagle3": json.dumps({"a": [1, 2]})}])
def test_layout_gives_save_bytes_for_every_dtype(metadata):
    t = _all_dtypes()
    assert _streamed(t, metadata) == save(t, metadata=metadata)


def test_layout_of_nothing_and_of_the_server_metadata():
    assert _streamed({}) == save({})
    # Several metadata keys: the library writes them in Rust hash order (it varies from
    # call to call), we write them sorted; everything else is byte for byte the same.
    t = {"aux_hidden_states": torch.randn(2, 3, 12).bfloat16(),
         "final_hidden": torch.randn(2, 3, 4).bfloat16()}
    meta = {"protocol": "1", "mode": "hidden", "aux_layer_ids": "[1, 3, 4]"}
    ours, ref = _streamed(t, meta), save(t, metadata=meta)
    n = struct.unpack("<Q", ours[:8])[0]
    assert len(ours) == len(ref) and ours[:8] == ref[:8] and ours[8 + n:] == ref[8 + n:]
    h_ours, h_ref = json.loads(ours[8:8 + n]), json.loads(ref[8:8 + n])
    assert h_ours == h_ref and list(h_ours) == list(h_ref)
    assert list(h_ours["__metadata__"]) == sorted(meta)


def test_decode_is_zero_copy_and_round_trips():
    t = _all_dtypes()
    data = save(t, metadata={"k": "v"})
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    got, meta = decode_buffer(buf)
    assert meta == {"k": "v"} and set(got) == set(t)
    ref = load(data)
    for k, v in got.items():
        assert v.dtype == ref[k].dtype and v.shape == ref[k].shape, k
        assert torch.equal(v.reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k
        if v.numel():
            lo = buf.data_ptr()
            assert lo <= v.data_ptr() < lo + buf.numel(), f"{k} was copied"


def _body(header: dict, data: bytes, pad: bool = True) -> torch.Tensor:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return torch.frombuffer(bytearray(struct.pack("<Q", len(raw)) + raw + data), dtype=torch.uint8)


def _entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = save({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, dtype=torch.int64)})


@pytest.mark.parametrize("body, message", [
    (torch.zeros(0, dtype=torch.uint8), "shorter than the 8-byte header length"),
    (torch.frombuffer(bytearray(GOOD[:5]), dtype=torch.uint8), "shorter than the 8-byte"),
    (torch.frombuffer(bytearray(GOOD[:40]), dtype=torch.uint8), "does not fit"),
    (torch.frombuffer(bytearray(GOOD[:-3]), dtype=torch.uint8), "out of range"),
    (torch.frombuffer(bytearray(struct.pack("<Q", 1 << 40) + b"{}"), dtype=torch.uint8),
     "exceeds"),
    (torch.frombuffer(bytearray(struct.pack("<Q", 8) + b"\xff\xfe{}    "), dtype=torch.uint8),
     "not UTF-8 JSON"),
    (torch.frombuffer(bytearray(struct.pack("<Q", 8) + b"[1,2]   "), dtype=torch.uint8),
     "not an object"),
    (_body({"a": _entry("F33", [2], 0, 8)}, bytes(8)), "unknown dtype"),
    (_body({"a": _entry("F32", [3], 0, 8)}, bytes(8)), "data_offsets span 8"),
    (_body({"a": _entry("F32", [-2], 0, 8)}, bytes(8)), "non-negative integers"),
    (_body({"a": _entry("F32", [2], 0, 16)}, bytes(8)), "out of range"),
    (_body({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12)),
     "overlaps"),
    (_body({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, bytes(12)),
     "leaves a gap"),
    (_body({"a": _entry("F32", [1], 0, 4)}, bytes(12)), "cover 4 bytes"),
    (_body({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "exactly dtype, shape"),
    (_body({"a": _entry("F32", [1], 0, 4), "__metadata__": {"x": 1}}, bytes(4)),
     "__metadata__"),
    (_body({"m": _entry("BOOL", [2], 0, 2)}, b"\x01\x07"), "other than 0 and 1"),
])
def test_decode_refuses_bad_bodies(body, message):
    with pytest.raises(SafetensorsFormatError, match=message):
        decode_buffer(body, "response")


def test_decode_refuses_duplicate_names():
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},' \
          b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    raw += b" " * (-len(raw) % 8)
    buf = torch.frombuffer(bytearray(struct.pack("<Q", len(raw)) + raw + b"\x01"), dtype=torch.uint8)
    with pytest.raises(SafetensorsFormatError, match="appears twice"):
        decode_buffer(buf)


def test_decode_copies_only_a_misaligned_tensor():
    # Valid safetensors the library would not write: an int64 at byte offset 1.
    body = _body({"u": _entry("U8", [1], 0, 1), "x": _entry("I64", [2], 1, 17)},
                 b"\x05" + struct.pack("<qq", -3, 9))
    got, _ = decode_buffer(body)
    assert got["u"].tolist() == [5] and got["x"].tolist() == [-3, 9]
