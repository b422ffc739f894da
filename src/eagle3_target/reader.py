"""Deprecated import path, kept for one release: use :mod:`eagle3_target.dump.reader`
(``from eagle3_target.dump import Eagle3Dataset``)."""

import warnings

from eagle3_target.dump.reader import Eagle3Dataset, collate_eagle3, load_lm_head, rebuild_supervision

__all__ = ["Eagle3Dataset", "collate_eagle3", "rebuild_supervision", "load_lm_head"]

warnings.warn("eagle3_target.reader is deprecated: import from eagle3_target.dump "
              "(e.g. `from eagle3_target.dump import Eagle3Dataset`)", DeprecationWarning, stacklevel=2)
