"""What the client accepts from a server: bodies decoded into tensors on the client's
device, and every answer checked against the protocol before a trainer sees it.

An answer that breaks the protocol (not safetensors, a tensor missing, an LM head of the
wrong form) raises :class:`~eagle3_target.errors.RemoteTargetError` with
``error="bad_response"`` naming the field: a wrong answer is never handed on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from eagle3_target.client.http_pool import Reply
from eagle3_target.contract import LMHead
from eagle3_target.errors import RemoteTargetError, SafetensorsFormatError
from eagle3_target.wire.st_stream import decode_buffer
from eagle3_target.wire.v1 import LM_HEAD_KEYS, MODES

__all__ = ["error_from", "bad_response", "decode_tensors", "check_outputs", "lm_head_from", "identity_diff",
           "IDENTITY_KEYS", "SHAPE_KEYS"]

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


def check_outputs(resp: Reply, mode: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raises unless a ``/v1/supervision`` answer in ``mode`` holds its mode's tensors."""
    missing = [name for name in MODES[mode].outputs if name not in tensors]
    if missing:
        raise bad_response(resp, f"the {mode} answer lacks {', '.join(missing)}")


def lm_head_from(resp: Reply, tensors: Mapping[str, torch.Tensor], device: torch.device) -> LMHead:
    """The LM head in a ``/v1/lm_head`` answer, on ``device``."""
    try:
        head = LMHead.from_tensors(tensors)
    except ValueError as e:
        raise bad_response(resp, f"{e} (expected {', '.join(LM_HEAD_KEYS)})") from None
    return LMHead(weight=head.weight.to(device), bias=None if head.bias is None else head.bias.to(device),
                  scale=head.scale, softcap=head.softcap)
