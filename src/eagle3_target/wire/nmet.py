"""NMET, the binary tensor format of NeMo Automodel 0.7.0's remote target, for the
root (NeMo-compatible) endpoints only.

This is the one hand-written serializer we keep: NeMo's own ``RemoteEagle3TargetModel``
speaks nothing else, so compatibility needs it. The native ``/v1`` protocol uses
safetensors. Unlike NeMo's decoder, :func:`decode` checks every length, code and shape
against the body before reading a byte of tensor data, so a malformed or hostile body
raises :class:`NMETError` (a ValueError naming the entry and the problem) and never
allocates more than the body holds.

Layout (little-endian)::

    u32 magic 0x4E4D4554 ("NMET")
    per entry, until the body ends:
      u32 key_len, key_len bytes UTF-8 key
      u8  flags            bit0 = value is None (nothing follows)
      u8  dtype code       0 f32, 1 f64, 2 f16, 3 bf16, 4 i64, 5 i32, 6 i16, 7 i8, 8 u8, 9 bool
      u8  ndim
      ndim x i64 shape
      u64 nbytes           = prod(shape) * itemsize
      nbytes raw C-contiguous bytes
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import torch

from eagle3_target.errors import NMETError

__all__ = ["MAGIC", "DTYPE_CODES", "NMETError", "encode", "decode", "MAX_KEY_BYTES", "MAX_NDIM", "MAX_ENTRIES"]

MAGIC = 0x4E4D4554

DTYPE_CODES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float64,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.int64,
    5: torch.int32,
    6: torch.int16,
    7: torch.int8,
    8: torch.uint8,
    9: torch.bool,
}
_CODE_OF: dict[torch.dtype, int] = {dt: code for code, dt in DTYPE_CODES.items()}

_FLAG_NONE = 0x01
# Limits on what a request may declare; far above anything the protocol sends.
MAX_KEY_BYTES = 1024
MAX_NDIM = 8
MAX_ENTRIES = 64

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


def encode(tensors: Mapping[str, torch.Tensor | None]) -> bytes:
    """Encodes CPU tensors (or None) in mapping order.

    Raises:
        ValueError: a CUDA tensor (move it to the CPU first) or an unsupported dtype.
    """
    parts: list[bytes | memoryview] = [_U32.pack(MAGIC)]
    for key, t in tensors.items():
        kb = key.encode("utf-8")
        parts.append(_U32.pack(len(kb)))
        parts.append(kb)
        if t is None:
            parts.append(bytes([_FLAG_NONE]))
            continue
        if t.device.type != "cpu":
            raise ValueError(f"NMET encodes CPU tensors; {key!r} is on {t.device}")
        code = _CODE_OF.get(t.dtype)
        if code is None:
            raise ValueError(f"NMET has no code for dtype {t.dtype} of {key!r}")
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        header = bytearray([0, code, t.dim()])
        for d in t.shape:
            header += _I64.pack(int(d))
        header += _U64.pack(flat.numel())
        parts.append(bytes(header))
        parts.append(memoryview(flat.numpy()))
    return b"".join(parts)


def decode(body: bytes | bytearray | memoryview) -> dict[str, torch.Tensor | None]:
    """Decodes an NMET blob into CPU tensors that own their memory.

    Raises:
        NMETError: wrong magic, a length that runs past the body, an unknown dtype code
            or flag, a shape that disagrees with ``nbytes``, a duplicate key, or a bool
            tensor holding bytes other than 0 and 1.
    """
    mv = memoryview(body).cast("B")
    n = len(mv)
    if n < 4:
        raise NMETError(f"body of {n} bytes is too short for the 4-byte NMET magic")
    magic = _U32.unpack_from(mv, 0)[0]
    if magic != MAGIC:
        raise NMETError(f"bad NMET magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
    pos = 4
    out: dict[str, torch.Tensor | None] = {}

    def need(size: int, what: str, key: str | None) -> None:
        if size > n - pos:
            where = f" of entry {key!r}" if key is not None else ""
            raise NMETError(f"truncated body: {what}{where} needs {size} bytes at offset {pos}, "
                            f"{n - pos} left")

    while pos < n:
        if len(out) >= MAX_ENTRIES:
            raise NMETError(f"more than {MAX_ENTRIES} entries")
        need(4, "key length", None)
        key_len = _U32.unpack_from(mv, pos)[0]
        pos += 4
        if key_len > MAX_KEY_BYTES:
            raise NMETError(f"key length {key_len} exceeds {MAX_KEY_BYTES} bytes")
        need(key_len, "key", None)
        try:
            key = bytes(mv[pos:pos + key_len]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise NMETError(f"key at offset {pos} is not UTF-8: {e}") from None
        pos += key_len
        if key in out:
            raise NMETError(f"duplicate key {key!r}")
        need(1, "flags", key)
        flags = mv[pos]
        pos += 1
        if flags & ~_FLAG_NONE:
            raise NMETError(f"entry {key!r}: unknown flag bits 0x{flags:02x}")
        if flags & _FLAG_NONE:
            out[key] = None
            continue
        need(2, "dtype code and ndim", key)
        code, ndim = mv[pos], mv[pos + 1]
        pos += 2
        dtype = DTYPE_CODES.get(code)
        if dtype is None:
            raise NMETError(f"entry {key!r}: unknown dtype code {code} (valid 0..9)")
        if ndim > MAX_NDIM:
            raise NMETError(f"entry {key!r}: ndim {ndim} exceeds {MAX_NDIM}")
        need(8 * ndim, "shape", key)
        shape = [_I64.unpack_from(mv, pos + 8 * i)[0] for i in range(ndim)]
        pos += 8 * ndim
        if any(d < 0 for d in shape):
            raise NMETError(f"entry {key!r}: negative dimension in shape {shape}")
        need(8, "nbytes", key)
        nbytes = _U64.unpack_from(mv, pos)[0]
        pos += 8
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if numel * itemsize != nbytes:
            raise NMETError(f"entry {key!r}: shape {shape} of {dtype} needs {numel * itemsize} "
                            f"bytes but nbytes says {nbytes}")
        need(nbytes, "tensor data", key)
        if nbytes == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            raw = torch.frombuffer(bytearray(mv[pos:pos + nbytes]), dtype=torch.uint8)
            if dtype == torch.bool and bool((raw > 1).any()):
                raise NMETError(f"entry {key!r}: bool tensor holds bytes other than 0 and 1")
            t = raw.view(dtype).reshape(shape)
        pos += nbytes
        out[key] = t
    return out
