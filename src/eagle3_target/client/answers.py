"""What the client accepts from a server: bodies decoded into tensors on the client's
device, every answer checked against the protocol before a trainer sees it, and the
sparse answer's form (:class:`TopKBatch`).

An answer that breaks the protocol (not safetensors, a tensor missing, an LM head of the
wrong form) raises :class:`~eagle3_target.errors.RemoteTargetError` with
``error="bad_response"`` naming the field: a wrong answer is never handed on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from eagle3_target.client.http_pool import Reply
from eagle3_target.contract import LMHead
from eagle3_target.errors import RemoteTargetError, SafetensorsFormatError
from eagle3_target.wire.st_stream import decode_buffer
from eagle3_target.wire.v1 import LM_HEAD_KEYS, MODES

__all__ = ["TopKBatch", "most_bytes", "error_from", "bad_response", "decode_tensors", "check_outputs", "model_info_from",
           "lm_head_from", "identity_diff", "IDENTITY_KEYS", "SHAPE_KEYS"]


@dataclass
class TopKBatch:
    """Sparse supervision (mode ``topk``), shifted like ``Eagle3TargetBatch.logits``.

    Fields:
        aux_hidden_states: ``[B,S,3H]``.
        topk_values: ``[B,S,k]`` logits, descending.
        topk_indices: ``[B,S,k] int32`` target token ids.
        logsumexp: ``[B,S] fp32`` over the full vocabulary (``log p = value - logsumexp``).
        input_ids, loss_mask: ``[B,S]`` shifted; attention_mask ``[B,S]`` unshifted.
    """

    aux_hidden_states: torch.Tensor
    topk_values: torch.Tensor
    topk_indices: torch.Tensor
    logsumexp: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor


def most_bytes(spec: Iterable[tuple[tuple[int, ...], torch.dtype | None]]) -> int:
    """The most an answer of tensors ``(shape, dtype)`` may hold: any float dtype may
    come under ``dtype=auto``, so each element counts at the widest (8 bytes), plus room
    for the safetensors header."""
    return sum(8 * math.prod(shape) for shape, _ in spec) + (1 << 20)


SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size", "aux_layer_ids")
IDENTITY_KEYS = ("model_sha256", "tokenizer_sha256")
"""What ``/v1/model_info`` says a target is: its shapes and aux ids, and fingerprints of
its weights and tokenizer (compared when both servers report them: the same shapes can
be two different models)."""


def identity_diff(ours: Mapping, theirs: Mapping) -> list[str]:
    """``"key: A vs B"`` for each way two ``/v1/model_info`` answers are different targets."""
    out = [f"{k}: {theirs.get(k)} vs {ours.get(k)}" for k in SHAPE_KEYS if theirs.get(k) != ours.get(k)]
    for k in IDENTITY_KEYS:
        a, b = theirs.get(k), ours.get(k)
        if a is not None and b is not None and a != b:
            out.append(f"{k}: {a[:12]}... vs {b[:12]}...")
    return out


def error_from(resp: Reply) -> RemoteTargetError:
    """The error a refused request raises: status, error code and detail from the body."""
    try:
        body = resp.json()
        error, detail = body.get("error"), body.get("detail")
    except (ValueError, AttributeError):
        error, detail = None, resp.text[:500]
    return RemoteTargetError(f"{resp.method} {resp.url} -> {resp.status_code} {error}: {detail}",
                             status=resp.status_code, error=error, detail=detail, url=resp.url)


def bad_response(resp: Reply, detail: str) -> RemoteTargetError:
    """An answer that breaks the protocol: ``error="bad_response"``."""
    return RemoteTargetError(f"{resp.method} {resp.url}: {detail}", status=resp.status_code,
                             error="bad_response", detail=detail, url=resp.url)


def decode_tensors(resp: Reply, device: torch.device) -> dict[str, torch.Tensor]:
    """The safetensors body of ``resp`` as tensors on ``device``. On the CPU they are
    views into the body's buffer; on CUDA, pinned-to-device copies (waited for here, so
    the tensors are ready on any stream when this returns)."""
    buf = resp.buffer
    if buf is None:  # no Content-Length (never from our server): one copy
        buf = torch.frombuffer(bytearray(resp.body or b""), dtype=torch.uint8)
    try:
        tensors, _meta = decode_buffer(buf, what=f"the response of {resp.method} {resp.url}")
    except SafetensorsFormatError as e:
        raise bad_response(resp, str(e)) from None
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    out = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    done.synchronize()
    return out


def check_outputs(resp: Reply, mode: str, tensors: Mapping[str, torch.Tensor],
                  spec: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]]) -> None:
    """Raises unless a ``/v1/supervision`` answer in ``mode`` holds its mode's tensors,
    each of the shape and dtype ``spec`` (:func:`eagle3_target.wire.v1.response_spec`)
    gives; a dtype of None asks for any floating dtype."""
    missing = [name for name in MODES[mode].outputs if name not in tensors]
    if missing:
        raise bad_response(resp, f"the {mode} answer lacks {', '.join(missing)}")
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise bad_response(resp, f"{name}: shape {list(t.shape)}, expected {list(shape)} "
                                     "for this request and the server's model info")
        ok = t.dtype.is_floating_point if dtype is None else t.dtype == dtype
        if not ok:
            want = "a floating dtype" if dtype is None else str(dtype).replace("torch.", "")
            raise bad_response(resp, f"{name}: dtype {str(t.dtype).replace('torch.', '')}, "
                                     f"expected {want}")


def model_info_from(resp: Reply) -> dict[str, Any]:
    """The JSON object of a ``/v1/model_info`` answer, checked for the keys (and their
    types) the client relies on."""
    if resp.status_code != 200:
        raise bad_response(resp, f"status {resp.status_code} where model info (200, JSON) "
                                 "was expected")
    try:
        info = resp.json()
    except ValueError as e:  # not JSON, or not UTF-8
        raise bad_response(resp, f"model info is not JSON ({e}); is this an eagle3-target "
                                 "server?") from None
    if not isinstance(info, dict):
        raise bad_response(resp, f"model info is a JSON {type(info).__name__}, not an object")
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        v = info.get(key)
        if type(v) is not int or v < 1:
            raise bad_response(resp, f"model info field {key!r}: expected a positive integer, "
                                     f"got {str(v)[:64]}")
    aux = info.get("aux_layer_ids")
    if (not isinstance(aux, list) or not aux or not all(type(i) is int for i in aux)):
        raise bad_response(resp, f"model info field 'aux_layer_ids': expected a non-empty list "
                                 f"of integers, got {str(aux)[:64]}")
    return info


def lm_head_from(resp: Reply, tensors: Mapping[str, torch.Tensor], device: torch.device) -> LMHead:
    """The LM head in a ``/v1/lm_head`` answer, on ``device``."""
    try:
        head = LMHead.from_tensors(tensors)
    except ValueError as e:
        raise bad_response(resp, f"{e} (expected {', '.join(LM_HEAD_KEYS)})") from None
    return LMHead(weight=head.weight.to(device), bias=None if head.bias is None else head.bias.to(device),
                  scale=head.scale, softcap=head.softcap)
