"""The NMET codec: exact bytes, round trips, interop with NeMo 0.7.0's own codec, and
a clear NMETError (never a crash or a huge allocation) on every malformed body."""

from __future__ import annotations

import struct
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eagle3_target.wire import nmet
from eagle3_target.wire.nmet import NMETError, decode, encode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # NeMo's import chain, not ours
    # `make test` installs nemo-automodel==0.7.0 --no-deps; never skipped, CI runs it.
    from nemo_automodel.components.speculative.eagle.remote import wire as nemo_wire

ALL_DTYPES = list(nmet.DTYPE_CODES.values())


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def test_exact_bytes_of_a_small_blob():
    blob = encode({"a": torch.tensor([1, 2], dtype=torch.int32), "n": None})
    expected = (struct.pack("<I", 0x4E4D4554)
                + struct.pack("<I", 1) + b"a" + bytes([0, 5, 1]) + struct.pack("<q", 2)
                + struct.pack("<Q", 8) + struct.pack("<ii", 1, 2)
                + struct.pack("<I", 1) + b"n" + bytes([1]))
    assert blob == expected


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_every_dtype(dtype):
    t = {"x": _sample(dtype, (3, 4)), "scalar": _sample(dtype, ()), "none": None,
         "empty": torch.empty((0, 5), dtype=dtype)}
    out = decode(encode(t))
    assert list(out) == list(t)
    assert out["none"] is None
    for k in ("x", "scalar", "empty"):
        assert out[k].dtype == dtype and out[k].shape == t[k].shape
        assert torch.equal(out[k], t[k])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_interop_with_nemo_codec(dtype):
    t = {"aux_hidden_states": _sample(dtype, (2, 3, 4)), "maybe": None,
         "input_ids": _sample(dtype, (2, 3))}
    ours, theirs = encode(t), nemo_wire.encode_to_bytes(t)
    assert ours == theirs
    back = nemo_wire.decode(ours)
    assert all(torch.equal(back[k], t[k]) for k in ("aux_hidden_states", "input_ids"))
    assert back["maybe"] is None


def test_non_contiguous_input_is_encoded_by_value():
    t = torch.arange(12, dtype=torch.int64).reshape(3, 4).T
    assert torch.equal(decode(encode({"t": t}))["t"], t)


def test_decoded_tensors_own_their_memory():
    body = bytearray(encode({"t": torch.arange(4)}))
    t = decode(body)["t"]
    body[-8:] = b"\xff" * 8
    assert t.tolist() == [0, 1, 2, 3]


def test_rejects_cuda_and_unsupported_dtypes():
    with pytest.raises(ValueError, match="no code for dtype"):
        encode({"c": torch.zeros(2, dtype=torch.complex64)})


def _valid() -> bytes:
    return encode({"input_ids": torch.arange(6).reshape(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool)})


@pytest.mark.parametrize("body, match", [
    (b"", "too short"),
    (b"NME", "too short"),
    (struct.pack("<I", 0x12345678), "bad NMET magic"),
    (struct.pack("<I", nmet.MAGIC) + b"\x01", "truncated body: key length"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 2**32 - 1), "exceeds 1024"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 10) + b"abc", "truncated body: key"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 2) + b"\xff\xfe" + b"\x00", "not UTF-8"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k", "flags"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k" + b"\x02", "unknown flag"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k" + bytes([0, 42, 1]), "unknown dtype code 42"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k" + bytes([0, 4, 200]), "ndim 200"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k" + bytes([0, 4, 2]) + struct.pack("<q", 3), "shape"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k" + bytes([0, 4, 1]) + struct.pack("<q", -3)
     + struct.pack("<Q", 0), "negative dimension"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k" + bytes([0, 4, 1]) + struct.pack("<q", 3)
     + struct.pack("<Q", 2**63), "needs 24 bytes but nbytes says"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k" + bytes([0, 4, 1]) + struct.pack("<q", 2**40)
     + struct.pack("<Q", 8 * 2**40), "truncated body: tensor data"),
    (struct.pack("<I", nmet.MAGIC) + struct.pack("<I", 1) + b"k" + bytes([0, 9, 1]) + struct.pack("<q", 2)
     + struct.pack("<Q", 2) + b"\x01\x07", "bool tensor holds bytes"),
    (encode({"a": None}) + encode({"a": None})[4:], "duplicate key"),
])
def test_malformed_bodies_name_the_problem(body, match):
    with pytest.raises(NMETError, match=match):
        decode(body)


def test_every_truncation_of_a_valid_blob_is_an_error_or_a_prefix():
    blob = _valid()
    full = decode(blob)
    for cut in range(len(blob)):
        try:
            out = decode(blob[:cut])
        except NMETError:
            continue
        # Only a cut on an entry boundary decodes, to a strict prefix of the entries.
        assert list(out) == list(full)[: len(out)] and len(out) < len(full)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    for body in (data, struct.pack("<I", nmet.MAGIC) + data):
        try:
            decode(body)
        except NMETError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255))
def test_byte_flips_never_crash(pos, value):
    blob = bytearray(_valid())
    blob[pos % len(blob)] = value
    try:
        decode(bytes(blob))
    except NMETError:
        pass
