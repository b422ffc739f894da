"""eagle3-target: supervision for EAGLE-3 draft training from a real target model.

Importing this package imports no engine: engines load lazily by name.
"""

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

__version__ = "0.1.0"

__all__ = [
    "Eagle3TargetBatch",
    "Eagle3TargetModel",
    "HiddenRunner",
    "LMHead",
    "TargetRunner",
    "VocabMapping",
    "build_vocab_mapping",
    "compute_target_distribution",
    "default_aux_layer_ids",
    "shift_left_with_zero",
    "validate_aux_layer_ids",
    "__version__",
]
