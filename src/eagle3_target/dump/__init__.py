"""The offline dump: chat data -> a resumable, verified dataset of EAGLE-3 supervision.

- :mod:`.config` - :class:`DumpConfig`, the one source of the dump's defaults;
- :mod:`.modes` - the mode table (what each mode stores and how it is computed);
- :mod:`.job` - :func:`run_dump`: load, check, resume, repair, summarise;
- :mod:`.produce` - rows -> batches -> target -> shards, and the manifest;
- :mod:`.batching` - greedy batches, packing, read-ahead;
- :mod:`.host` - device-to-host copies into pinned memory, off the engine's thread;
- :mod:`.render` - the chat template in a child process;
- :mod:`.summary` - what a dump reports;
- :mod:`.format` - the files on disk: manifests, shards, the LM head, their writer;
- :mod:`.integrity` - the accounting and structure rules verify, the reader and a rerun share;
- :mod:`.repair` - a rerun's repairs of a damaged manifest or lost shards;
- :mod:`.verify` - the checker; :mod:`.reader` - :class:`Eagle3Dataset` for trainers;
- :mod:`.faults` - the fault-injection points the resume tests kill at.

Names load on first use (PEP 562): the render child runs ``python -m
eagle3_target.dump.render`` and must not import torch through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "DumpConfig": "eagle3_target.dump.config",
    "MODES": "eagle3_target.dump.modes",
    "ModeSpec": "eagle3_target.dump.modes",
    "TargetSource": "eagle3_target.dump.modes",
    "run_dump": "eagle3_target.dump.job",
    "DumpSummary": "eagle3_target.dump.summary",
    "greedy_batches": "eagle3_target.dump.batching",
    "pack_batch": "eagle3_target.dump.batching",
    "read_ahead": "eagle3_target.dump.batching",
    "verify_dump": "eagle3_target.dump.verify",
    "VerifyReport": "eagle3_target.dump.verify",
    "Eagle3Dataset": "eagle3_target.dump.reader",
    "collate_eagle3": "eagle3_target.dump.reader",
    "rebuild_supervision": "eagle3_target.dump.reader",
    "load_lm_head": "eagle3_target.dump.format",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from eagle3_target.dump.batching import greedy_batches, pack_batch, read_ahead
    from eagle3_target.dump.config import DumpConfig
    from eagle3_target.dump.format import load_lm_head
    from eagle3_target.dump.job import run_dump
    from eagle3_target.dump.modes import MODES, ModeSpec, TargetSource
    from eagle3_target.dump.reader import Eagle3Dataset, collate_eagle3, rebuild_supervision
    from eagle3_target.dump.summary import DumpSummary
    from eagle3_target.dump.verify import VerifyReport, verify_dump


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eagle3_target.dump' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
