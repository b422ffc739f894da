"""Engine registry: ``engine="hf" | "sglang"`` names a module that builds a runner.

Engines are imported lazily on first use, so ``import eagle3_target`` never imports
SGLang (or any engine's heavy dependencies). A new engine adds one line to
``_ENGINES`` and a module exposing ``build(model_path, **kwargs) -> TargetRunner``.

Shared helpers live beside it: :mod:`.common` (dtypes, text config, quiet
transformers) and :mod:`.packing` (right-padding, row spans, gather and scatter).
Nothing here imports the contract at run time, so the contract may call
:func:`build_runner` without an import circle.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from eagle3_target.engines.common import parse_dtype

if TYPE_CHECKING:
    from eagle3_target.contract import TargetRunner

__all__ = ["ENGINES", "build_runner", "parse_dtype"]

# name -> module (relative to this package) with a `build` function.
_ENGINES: dict[str, str] = {"hf": "hf", "sglang": "sglang"}
ENGINES: tuple[str, ...] = tuple(_ENGINES)


def build_runner(engine: str, model_path: str, **kwargs: Any) -> "TargetRunner":
    """Builds the named engine's runner for ``model_path``."""
    if engine not in _ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    module = import_module(f"eagle3_target.engines.{_ENGINES[engine]}")
    return module.build(model_path, **kwargs)
