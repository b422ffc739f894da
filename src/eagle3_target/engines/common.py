"""What every engine shares and none owns: the dtype names a target runs in, the text
config of a (possibly multimodal) model config, the default device, and a quiet
transformers.

Imports nothing from the package, so the contract, the engines and the CLI can all use
it without an import circle.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "parse_dtype", "text_config", "default_device", "resolve_device", "quiet_transformers"]

# Accepted spellings -> torch dtype name. Only the three floating dtypes a target runs in.
DTYPES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def parse_dtype(dtype: Any) -> "torch.dtype | None":
    """``None | "auto" | torch.dtype | "bf16"/"bfloat16"/"fp16"/"fp32"/...`` -> torch dtype
    or None (the engine's default). Anything else raises ValueError."""
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return getattr(torch, DTYPES[dtype.lower()])
    raise ValueError(f"unsupported dtype {dtype!r}: use float32, float16 or bfloat16")


def text_config(config: Any) -> Any:
    """The language model's config: ``config.text_config`` for multimodal wrappers
    (Gemma-3, Llama-4, Qwen-VL), else ``config`` itself."""
    text = getattr(config, "text_config", None)
    return text if text is not None and getattr(text, "num_hidden_layers", None) is not None else config


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: Any) -> "torch.device":
    """``None`` (:func:`default_device`), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a
    torch.device -> a torch.device that exists here; ValueError naming the device and
    the way out otherwise (torch's own errors say "Torch not compiled with CUDA enabled"
    deep inside the first copy to it)."""
    import torch

    try:
        dev = torch.device(device or default_device())
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r} is not a device torch knows ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ValueError(f"--device {device}: {why}; use --device cpu (or a CUDA build of torch on a "
                             f"GPU machine)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s), 0..{n - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: the engines run on cpu or cuda")
    return dev


def quiet_transformers() -> None:
    """transformers' warnings and progress bars off: a library user sees our messages,
    not the loader's (set before a model or tokenizer is loaded)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - an old or absent transformers
        pass
