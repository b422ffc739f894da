"""Engine registry: ``engine="hf" | "sglang"`` names a module that builds a runner.

Engines are imported lazily on first use, so ``import eagle3_target`` never imports
SGLang (or any engine's heavy dependencies). A new engine adds one line to
``_ENGINES`` and a module exposing ``build(model_path, **kwargs) -> TargetRunner``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from eagle3_target.contract import TargetRunner

if TYPE_CHECKING:
    import torch

__all__ = ["ENGINES", "build_runner", "parse_dtype"]

# name -> module (relative to this package) with a `build` function.
_ENGINES: dict[str, str] = {"hf": "hf", "sglang": "sglang"}
ENGINES: tuple[str, ...] = tuple(_ENGINES)


def build_runner(engine: str, model_path: str, **kwargs: Any) -> TargetRunner:
    """Builds the named engine's runner for ``model_path``."""
    if engine not in _ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    module = import_module(f"eagle3_target.engines.{_ENGINES[engine]}")
    return module.build(model_path, **kwargs)


_DTYPES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def parse_dtype(dtype: Any) -> "torch.dtype | None":
    """``None | torch.dtype | "bf16"/"bfloat16"/"fp16"/"fp32"/...`` -> torch dtype or None.

    Only the three floating dtypes a target runs in are accepted; anything else raises.
    """
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return getattr(torch, _DTYPES[dtype.lower()])
    raise ValueError(f"unsupported dtype {dtype!r}: use float32, float16 or bfloat16")
