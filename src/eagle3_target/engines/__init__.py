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

import inspect
from importlib import import_module
from typing import TYPE_CHECKING, Any

from eagle3_target.engines.common import parse_dtype

if TYPE_CHECKING:
    from eagle3_target.contract import TargetRunner

__all__ = ["ENGINES", "build_runner", "build_options", "check_options", "parse_dtype"]

# name -> module (relative to this package) with a `build` function.
_ENGINES: dict[str, str] = {"hf": "hf", "sglang": "sglang"}
ENGINES: tuple[str, ...] = tuple(_ENGINES)


def build_options(build: Any) -> list[str] | None:
    """The keyword options a ``build`` function takes, or None when it takes any
    (``**kwargs``, checked by the engine itself)."""
    params = inspect.signature(build).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD
                                                                   and p.default is not p.empty)]


def check_options(engine: str, kwargs: dict[str, Any]) -> Any:
    """The named engine's module, after checking that its ``build()`` takes every option
    in ``kwargs`` (ValueError listing those it does take otherwise)."""
    if engine not in _ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    module = import_module(f"eagle3_target.engines.{_ENGINES[engine]}")
    options = build_options(module.build)
    unknown = sorted(set(kwargs) - set(options)) if options is not None else []
    if unknown:
        raise ValueError(f"engine {engine!r} has no option {', '.join(unknown)} (--engine-arg); it takes: "
                         f"{', '.join(o for o in options if o not in ('device', 'dtype'))}, and --device, "
                         f"--dtype")
    return module


def build_runner(engine: str, model_path: str, **kwargs: Any) -> "TargetRunner":
    """Builds the named engine's runner for ``model_path``; an option the engine's
    ``build()`` does not take is refused with the list of those it does."""
    return check_options(engine, kwargs).build(model_path, **kwargs)
