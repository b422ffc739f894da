"""eagle3-target: supervision for EAGLE-3 draft training from a real target model.

Importing this package imports no engine, and not torch either: the names below load
on first use (PEP 562), so a process that needs only the chat data (the dump's render
process) starts in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Eagle3TargetBatch": "eagle3_target.contract",
    "Eagle3TargetModel": "eagle3_target.contract",
    "HiddenRunner": "eagle3_target.contract",
    "LMHead": "eagle3_target.contract",
    "TargetRunner": "eagle3_target.contract",
    "default_aux_layer_ids": "eagle3_target.contract",
    "shift_left_with_zero": "eagle3_target.contract",
    "validate_aux_layer_ids": "eagle3_target.contract",
    "VocabMapping": "eagle3_target.vocab",
    "build_vocab_mapping": "eagle3_target.vocab",
    "compute_target_distribution": "eagle3_target.vocab",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from eagle3_target.contract import (
        Eagle3TargetBatch,
        Eagle3TargetModel,
        HiddenRunner,
        LMHead,
        TargetRunner,
        default_aux_layer_ids,
        shift_left_with_zero,
        validate_aux_layer_ids,
    )
    from eagle3_target.vocab import VocabMapping, build_vocab_mapping, compute_target_distribution


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eagle3_target' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
