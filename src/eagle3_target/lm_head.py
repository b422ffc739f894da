"""The target's final projection, :class:`LMHead`: what turns a final-norm hidden state
into the logits the target gives, and the one codec between a head and tensors (the
``/v1/lm_head`` body and a hidden-mode dump's ``lm_head.safetensors``). The contract
(:mod:`eagle3_target.contract`) re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["LMHead"]


@dataclass(frozen=True)
class LMHead:
    """The target's final projection: ``logits = softcap(scale * (h @ weight.T + bias))``.

    Attributes:
        weight: ``[V,H]`` model dtype.
        bias: ``[V]`` or None.
        scale: multiplies the logits (Cohere's ``logit_scale``; 1/``logits_scaling`` for Granite).
        softcap: ``cap * tanh(logits / cap)`` when set (Gemma-2's ``final_logit_softcapping``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [...,H]`` -> logits ``[...,V]`` in the weight's dtype."""
        w = self.weight.to(hidden.device)
        logits = torch.nn.functional.linear(
            hidden.to(w.dtype), w, None if self.bias is None else self.bias.to(hidden.device)
        )
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # The one codec between an LM head and tensors, for the wire and for the disk.
    # Tensors: ``weight``, ``bias`` (if any), and the scalars as 0-d fp64 tensors named
    # ``logit_scale`` and ``logit_softcap`` (if set): the ``/v1/lm_head`` body. A v1
    # dump's ``lm_head.safetensors`` keeps the scalars in its header metadata as
    # ``scale`` and ``softcap`` instead (``scalars="metadata"``); both read back here.
    _SCALARS = (("scale", "logit_scale"), ("softcap", "logit_softcap"))

    def to_tensors(self, *, scalars: str = "tensors") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, metadata)``: ``scalars="tensors"`` puts the scale and soft-cap in
        the tensors (metadata empty), ``"metadata"`` in the metadata (v1 dump layout)."""
        if scalars not in ("tensors", "metadata"):
            raise ValueError(f"scalars must be 'tensors' or 'metadata', got {scalars!r}")
        tensors = {"weight": self.weight.detach()}
        if self.bias is not None:
            tensors["bias"] = self.bias.detach()
        meta: dict[str, Any] = {}
        for attr, name in self._SCALARS:
            value = getattr(self, attr)
            if scalars == "metadata":
                meta[attr] = None if value is None else float(value)
            elif value is not None:
                tensors[name] = torch.tensor(float(value), dtype=torch.float64)
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, Any] | None = None) -> "LMHead":
        """The head :meth:`to_tensors` wrote, in either layout; raises ValueError naming a
        missing weight or an unknown tensor."""
        known = {"weight", "bias"} | {name for _, name in cls._SCALARS}
        unknown = sorted(set(tensors) - known)
        if "weight" not in tensors or unknown:
            raise ValueError(f"an LM head needs a 'weight' tensor and no other than {sorted(known)}; "
                             f"got {sorted(tensors)}")
        meta = metadata or {}
        values: dict[str, float | None] = {}
        for attr, name in cls._SCALARS:
            raw = tensors[name] if name in tensors else meta.get(attr)
            values[attr] = None if raw is None else float(raw)
        scale = values["scale"]
        return cls(weight=tensors["weight"], bias=tensors.get("bias"),
                   scale=1.0 if scale is None else scale, softcap=values["softcap"] or None)
