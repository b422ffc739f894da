"""What each mode answers: a job's response tensors from its slice of the engine output.

One function per mode, registered by name in :data:`POSTPROCESS` beside the protocol's
mode table (:data:`eagle3_target.wire.v1.MODES`, plus NeMo's ``/generate``); each
returns exactly the tensors its mode lists, in that order. Every sequence output goes
through the contract's one shift (left by one, zero tail), so a server answer equals
the in-process result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from eagle3_target.contract import shift_left_with_zero
from eagle3_target.vocab import compute_target_distribution
from eagle3_target.wire.v1 import MODES, NEMO_GENERATE

if TYPE_CHECKING:
    from eagle3_target.server.worker import Job

__all__ = ["POSTPROCESS", "postprocess"]

# (job, out [B,S,V] logits or [B,S,H] final hidden, unshifted) -> tensors after aux
Post = Callable[["Job", torch.Tensor], dict[str, torch.Tensor]]


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _hidden(job: "Job", out: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"final_hidden": _cast(shift_left_with_zero(out), job.out_dtype)}


def _logits(job: "Job", out: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"logits": _cast(shift_left_with_zero(out), job.out_dtype)}


def _draft(job: "Job", out: torch.Tensor) -> dict[str, torch.Tensor]:
    if job.mapping is None or job.loss_mask is None:
        raise ValueError(f"{job.mode} mode needs a vocab mapping and a loss_mask")
    loss = shift_left_with_zero(job.loss_mask.to(out.device))
    probs, pmask = compute_target_distribution(
        shift_left_with_zero(out), job.mapping.selected_token_ids,
        job.mapping.selected_token_mask, loss)
    return {"target_probs": _cast(probs, job.out_dtype), "position_mask": pmask}


def _nemo(job: "Job", out: torch.Tensor) -> dict[str, torch.Tensor]:
    # NeMo's order: the draft form, then input_ids and loss_mask shifted (the route
    # restores the dtypes it received).
    return {**_draft(job, out), "input_ids": shift_left_with_zero(job.input_ids),
            "loss_mask": shift_left_with_zero(job.loss_mask)}


def _topk(job: "Job", out: torch.Tensor) -> dict[str, torch.Tensor]:
    if job.k is None:
        raise ValueError("topk mode needs k")
    values, indices = out.topk(job.k, dim=-1)
    lse = torch.logsumexp(out.float(), dim=-1)
    return {"topk_values": _cast(shift_left_with_zero(values), job.out_dtype),
            "topk_indices": shift_left_with_zero(indices.to(torch.int32)),
            "logsumexp": _cast(shift_left_with_zero(lse), job.out_dtype)}


POSTPROCESS: dict[str, Post] = {"logits": _logits, "draft": _draft, "hidden": _hidden, "topk": _topk,
                                NEMO_GENERATE.name: _nemo}
if set(POSTPROCESS) != set(MODES) | {NEMO_GENERATE.name}:  # a mode added to one table only
    raise ImportError(f"server modes {sorted(POSTPROCESS)} differ from the protocol's {sorted(MODES)}")


@torch.no_grad()
def postprocess(job: "Job", out: torch.Tensor, aux: torch.Tensor) -> dict[str, torch.Tensor]:
    """One job's response tensors, in its mode's order, from its slice of the engine output.

    Args:
        out: unshifted ``logits [B,S,V]`` (kind ``logits``) or ``final_hidden [B,S,H]``
            (kind ``hidden``), engine dtype, engine device.
        aux: ``[B,S,3H]`` engine dtype, unshifted.
    """
    post = POSTPROCESS.get(job.mode)
    if post is None:
        raise ValueError(f"unknown mode {job.mode!r}")
    return {"aux_hidden_states": _cast(aux, job.out_dtype), **post(job, out)}
