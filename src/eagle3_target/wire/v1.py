"""The native ``/v1`` protocol: names, modes, parameters, request validation, errors.

Shared by the server (which parses and checks) and the client (which builds requests
and reads answers), so the two can never disagree on a key name: :data:`MODES` is the
one table of modes, with the tensors each answers with. ``docs/protocol.md`` is the
prose version.

Every check raises :class:`ApiError` with an HTTP status, a stable machine-readable
``error`` code and a ``detail`` that names the field, what was expected and what came.
Nothing here touches the engine: a request is fully validated before it is queued.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from eagle3_target.errors import ApiError
from eagle3_target.wire import TOKEN_ENV
from eagle3_target.wire.st_stream import byte_view, layout

__all__ = [
    "PROTOCOL_VERSION",
    "TOKEN_ENV",
    "WireMode",
    "MODES",
    "NEMO_GENERATE",
    "LM_HEAD_KEYS",
    "MAX_TOPK",
    "BATCH_POLICIES",
    "OUTPUT_DTYPES",
    "INPUT_KEYS",
    "RESPONSE_KEYS",
    "ApiError",
    "SupervisionParams",
    "parse_supervision_params",
    "check_inputs",
    "decode_safetensors",
    "encode_safetensors",
    "safetensors_parts",
    "MAX_REQUEST_TENSORS",
    "response_spec",
]

PROTOCOL_VERSION = 1
MAX_TOPK = 64

# How a request may share the engine (query parameter ``batch``). A merged call pads
# every row to the longest and changes the kernels' shapes, so its floats can differ
# in the last bits from the same rows run alone; ``alone`` trades throughput for bytes
# that depend on the request only (the dump asks for it: its resumes are byte-identical).
BATCH_POLICIES = ("shared", "alone")


@dataclass(frozen=True)
class WireMode:
    """One supervision mode of ``/v1/supervision``."""

    name: str
    forward: str
    """The target forward it runs: ``logits`` (through the LM head) or ``hidden`` (not)."""
    outputs: tuple[str, ...]
    """Response tensors, ``aux_hidden_states`` first."""
    needs_mapping: bool = False
    """Takes ``mapping_id`` (a draft vocabulary registered with ``/v1/vocab_mapping``)."""
    needs_loss_mask: bool = False
    needs_k: bool = False
    """Takes ``k`` (1..:data:`MAX_TOPK`)."""
    help: str = ""


MODES: dict[str, WireMode] = {m.name: m for m in (
    WireMode("logits", "logits", ("aux_hidden_states", "logits"),
             help="aux + all-position logits [B,S,V]"),
    WireMode("draft", "logits", ("aux_hidden_states", "target_probs", "position_mask"),
             needs_mapping=True, needs_loss_mask=True,
             help="aux + the target distribution over a draft vocabulary [B,S,Vd] fp32"),
    WireMode("hidden", "hidden", ("aux_hidden_states", "final_hidden"),
             help="aux + the final-norm hidden state [B,S,H]; the client rebuilds the logits"),
    WireMode("topk", "logits", ("aux_hidden_states", "topk_values", "topk_indices", "logsumexp"),
             needs_k=True, help="aux + the k largest logits, their ids and the logsumexp"),
)}

# NeMo Automodel's ``/generate`` (a root endpoint, NMET bodies): the draft form plus the
# shifted input_ids and loss_mask, in NeMo's order.
NEMO_GENERATE = WireMode("nemo", "logits", ("aux_hidden_states", "target_probs", "position_mask",
                                            "input_ids", "loss_mask"),
                         needs_mapping=True, needs_loss_mask=True, help="NeMo's /generate")

# Requested wire dtype of float outputs; "auto" keeps the model's dtype (fp32 for
# target_probs and logsumexp, which are computed in fp32).
OUTPUT_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}

INPUT_KEYS = ("input_ids", "attention_mask", "loss_mask")

# Tensors in a /v1/supervision response, per mode (the table above, by name).
RESPONSE_KEYS: dict[str, tuple[str, ...]] = {name: m.outputs for name, m in MODES.items()}

# GET /v1/lm_head: the LM head's tensors (LMHead.to_tensors()).
LM_HEAD_KEYS = ("weight", "bias", "logit_scale", "logit_softcap")

# A request body holds at most this many tensors (the three of INPUT_KEYS, or a mapping's
# two); the header is checked before the library parses it, so a header of a million
# empty tensors costs nothing (NMET caps its entries the same way).
MAX_REQUEST_TENSORS = 64
_MAX_REQUEST_HEADER = 1 << 20

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_MASK_DTYPES = _INT_DTYPES + (torch.bool,)


@dataclass(frozen=True)
class SupervisionParams:
    """Query parameters of ``POST /v1/supervision``."""

    mode: str = "logits"
    mapping_id: str | None = None
    dtype: str = "auto"
    k: int | None = None
    batch: str = "shared"
    """``shared``: the server may merge the request with others into one engine call
    (padded to the longest row); ``alone``: it runs in an engine call of its own, so
    its bytes never depend on other traffic (:data:`BATCH_POLICIES`)."""
    extra: dict[str, str] = field(default_factory=dict)

    def to_query(self) -> dict[str, str]:
        q = {"mode": self.mode}
        if self.batch != "shared":
            q["batch"] = self.batch
        if self.mapping_id is not None:
            q["mapping_id"] = self.mapping_id
        if self.dtype != "auto":
            q["dtype"] = self.dtype
        if self.k is not None:
            q["k"] = str(self.k)
        return q


def _bad_param(name: str, detail: str) -> ApiError:
    return ApiError(422, "invalid_parameter", f"query parameter {name!r}: {detail}", field=name)


def parse_supervision_params(query: Mapping[str, str]) -> SupervisionParams:
    """Checks the query of ``/v1/supervision``; unknown names are an error, not ignored."""
    known = {"mode", "mapping_id", "dtype", "k", "batch"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise _bad_param(unknown[0], f"unknown parameter (known: {', '.join(sorted(known))})")
    mode = query.get("mode", "logits")
    if mode not in MODES:
        raise _bad_param("mode", f"got {mode[:64]!r}, expected one of {', '.join(MODES)}")
    dtype = query.get("dtype", "auto")
    if dtype not in OUTPUT_DTYPES:
        raise _bad_param("dtype", f"got {dtype[:64]!r}, expected one of {', '.join(OUTPUT_DTYPES)}")
    spec = MODES[mode]
    mapping_id = query.get("mapping_id")
    if spec.needs_mapping:
        if not mapping_id:
            raise _bad_param("mapping_id", "required in draft mode (register the mapping with "
                                           "POST /v1/vocab_mapping first)")
        if len(mapping_id) > 128 or not mapping_id.isalnum():
            raise _bad_param("mapping_id", f"got {mapping_id[:64]!r}, expected the hex id "
                                           "returned by /v1/vocab_mapping")
    elif mapping_id is not None:
        raise _bad_param("mapping_id", f"only used in draft mode, not in {mode} mode")
    k: int | None = None
    if spec.needs_k:
        raw = query.get("k")
        if raw is None:
            raise _bad_param("k", f"required in topk mode (1..{MAX_TOPK})")
        # ASCII digits only: int() would also take " 4 ", "1_0" and other scripts' digits.
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 8):
            raise _bad_param("k", f"got {raw[:64]!r}, expected an integer 1..{MAX_TOPK} "
                                  "written in ASCII digits")
        k = int(raw)
        if not 1 <= k <= MAX_TOPK:
            raise _bad_param("k", f"got {k}, expected 1..{MAX_TOPK}")
    elif "k" in query:
        raise _bad_param("k", f"only used in topk mode, not in {mode} mode")
    batch = query.get("batch", "shared")
    if batch not in BATCH_POLICIES:
        raise _bad_param("batch", f"got {batch[:64]!r}, expected one of {', '.join(BATCH_POLICIES)}")
    return SupervisionParams(mode=mode, mapping_id=mapping_id, dtype=dtype, k=k, batch=batch)


def response_spec(mode: str, *, rows: int, seq: int, info: Mapping[str, Any], dtype: str = "auto",
                  k: int | None = None, draft_vocab: int | None = None
                  ) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """What a ``/v1/supervision`` answer in ``mode`` holds: ``name -> (shape, dtype)``
    for a ``[rows, seq]`` request, from the server's model info (``hidden_size``,
    ``vocab_size``, ``aux_layer_ids``). A dtype of None means "any floating dtype" (the
    model's own, under ``dtype=auto``)."""
    h, v = int(info["hidden_size"]), int(info["vocab_size"])
    aux = len(info["aux_layer_ids"]) * h
    wire = OUTPUT_DTYPES[dtype]
    fp32 = wire or torch.float32  # computed in fp32: cast only when a dtype is asked for
    b, s = rows, seq
    specs: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
        "aux_hidden_states": ((b, s, aux), wire),
        "logits": ((b, s, v), wire),
        "final_hidden": ((b, s, h), wire),
        "target_probs": ((b, s, draft_vocab or 0), fp32),
        "position_mask": ((b, s, 1), torch.bool),
        "topk_values": ((b, s, k or 0), wire),
        "topk_indices": ((b, s, k or 0), torch.int32),
        "logsumexp": ((b, s), fp32),
    }
    return {name: specs[name] for name in MODES[mode].outputs}


def _invalid(field_name: str, detail: str, error: str = "invalid_input") -> ApiError:
    return ApiError(422, error, f"{field_name}: {detail}", field=field_name)


def check_inputs(
    tensors: Mapping[str, torch.Tensor | None],
    *,
    vocab_size: int,
    need_loss_mask: bool,
    max_tokens: int,
    max_seq: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validates request tensors and returns ``(input_ids, attention_mask, loss_mask)``
    as ``[B,S] int64`` (loss_mask None where absent and not needed).

    Raises ApiError 422 naming the field (missing, unknown, dtype, shape, range, mask
    values, empty rows), or 413 when ``B*S`` exceeds ``max_tokens`` or ``S`` the model's
    context ``max_seq``.
    """
    unknown = sorted(set(tensors) - set(INPUT_KEYS))
    if unknown:
        raise _invalid(unknown[0], f"unknown tensor (expected {', '.join(INPUT_KEYS)})")
    required = ["input_ids", "attention_mask"] + (["loss_mask"] if need_loss_mask else [])
    for name in required:
        if tensors.get(name) is None:
            raise _invalid(name, "missing", error="missing_input")
    ids = tensors["input_ids"]
    assert ids is not None
    for name in INPUT_KEYS:
        t = tensors.get(name)
        if t is None:
            continue
        allowed = _INT_DTYPES if name == "input_ids" else _MASK_DTYPES
        if t.dtype not in allowed:
            kinds = "an integer" if name == "input_ids" else "an integer or bool"
            raise _invalid(name, f"must be {kinds} tensor, got dtype {t.dtype}".replace("torch.", ""))
        if t.dim() != 2:
            raise _invalid(name, f"must be 2-D [B,S], got shape {list(t.shape)}")
        if name != "input_ids" and tuple(t.shape) != tuple(ids.shape):
            raise _invalid(name, f"shape {list(t.shape)} differs from input_ids shape "
                                 f"{list(ids.shape)}")
    b, s = ids.shape
    if b == 0 or s == 0:
        raise _invalid("input_ids", f"empty batch: shape {[b, s]}")
    if b * s > max_tokens:
        raise ApiError(413, "too_many_tokens",
                       f"input_ids: {b}x{s} = {b * s} tokens exceeds this server's limit of "
                       f"{max_tokens} tokens per request (split the batch)", field="input_ids")
    if max_seq is not None and s > max_seq:
        raise ApiError(413, "row_too_long",
                       f"input_ids: rows of {s} tokens exceed the model's context of {max_seq} "
                       "tokens (truncate or split the rows)", field="input_ids")
    ids = ids.to(torch.int64)
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        where = bad.nonzero()[:3].tolist()
        vals = ids[bad][:3].tolist()
        raise _invalid("input_ids", f"token ids must lie in [0, {vocab_size}); got {vals} at "
                                    f"[row, col] {where}")
    out: dict[str, torch.Tensor | None] = {}
    for name in ("attention_mask", "loss_mask"):
        t = tensors.get(name)
        if t is None:
            out[name] = None
            continue
        t = t.to(torch.int64)
        bad = (t != 0) & (t != 1)
        if bool(bad.any()):
            vals = sorted(set(t[bad].tolist()))[:3]
            raise _invalid(name, f"must hold only 0 and 1, got {vals}")
        out[name] = t
    mask = out["attention_mask"]
    assert mask is not None
    empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise _invalid("attention_mask", f"rows {empty[:5]} have no real token")
    return ids, mask, out["loss_mask"]


def decode_safetensors(body: bytes, what: str = "body") -> dict[str, torch.Tensor]:
    """Parses a safetensors body; raises ApiError 400 naming the problem."""
    if not body:
        raise ApiError(400, "bad_body", f"{what} is empty: expected safetensors bytes")
    _check_request_header(body, what)
    try:
        tensors = st_load(bytes(body))
    except SafetensorError as e:
        raise ApiError(400, "bad_body", f"{what} is not valid safetensors: {e}") from None
    except Exception as e:  # safetensors raises plain errors on some malformed headers
        raise ApiError(400, "bad_body", f"{what} is not valid safetensors: "
                                        f"{type(e).__name__}: {e}") from None
    for k, t in tensors.items():
        # A bool tensor whose bytes are not 0/1 is undefined behaviour in torch.
        if t.dtype == torch.bool and t.numel() and bool((t.view(torch.uint8) > 1).any()):
            raise ApiError(400, "bad_body", f"{k}: bool tensor holds bytes other than 0 and 1",
                           field=k)
    return tensors


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ApiError(400, "bad_body", f"tensor name {k[:64]!r} appears twice in the "
                                            "safetensors header (names must be unique)", field=k)
        out[k] = v
    return out


def _check_request_header(body: bytes, what: str) -> None:
    """Bounds a request's safetensors header before the library parses it: at most
    :data:`MAX_REQUEST_TENSORS` tensors, unique names (the library keeps the last of a
    duplicated name without a word)."""
    if len(body) < 8:
        raise ApiError(400, "bad_body", f"{what} is not valid safetensors: {len(body)} bytes, "
                                        "shorter than the 8-byte header length")
    n = int.from_bytes(body[:8], "little")
    if n > _MAX_REQUEST_HEADER:
        raise ApiError(400, "bad_body", f"{what}: safetensors header of {n} bytes exceeds "
                                        f"{_MAX_REQUEST_HEADER} (a request holds at most "
                                        f"{MAX_REQUEST_TENSORS} tensors)")
    try:
        header = json.loads(bytes(body[8:8 + n]), object_pairs_hook=_unique_names)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, "bad_body", f"{what} is not valid safetensors: the header is not "
                                        f"UTF-8 JSON ({e})") from None
    count = len(header) - ("__metadata__" in header) if isinstance(header, dict) else 0
    if count > MAX_REQUEST_TENSORS:
        raise ApiError(400, "bad_body", f"{what} holds {count} tensors; a request holds at most "
                                        f"{MAX_REQUEST_TENSORS}")


def encode_safetensors(tensors: Mapping[str, torch.Tensor],
                       metadata: Mapping[str, str] | None = None) -> bytes:
    """CPU tensors -> safetensors bytes (contiguous copies where needed)."""
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (a caller passing one mask twice).
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        flat[k] = v
    return st_save(flat, metadata=dict(metadata) if metadata else None)


def safetensors_parts(tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[memoryview]]:
    """The bytes of :func:`encode_safetensors` as ``(header, byte views of the tensors
    in file order)``: the same safetensors body (metadata keys sorted), but without
    serialising a copy -- contiguous CPU tensors (the engine's pinned results) are sent
    from their own memory. Others are made contiguous on the CPU first."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header, order = layout(flat, metadata)
    return header, [byte_view(t) for t in order if t.numel()]
