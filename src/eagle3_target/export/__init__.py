"""Our dump in the offline formats trainers read: ``eagle3-target export DUMP --to FORMAT``.

- :mod:`.speculators` - vllm-project/speculators' ``datasets`` folder + ``hs_{i}`` files;
- :mod:`.nemo` - NeMo Automodel's EAGLE-3 offline cache (format version 2);
- :mod:`.source` - the dump and the extra inputs a format needs, checked up front;
- :mod:`.files` - atomic files, the sha256 sidecar, resume and :func:`verify_export`;
- :mod:`.readers` - reading either format back into our samples.

:data:`FORMATS` is the one table of formats (the ``--to`` choices and help). Names load
on first use, so building the command line imports no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["ExportFormat", "FORMATS", "NEMO_SHARD_SIZE", "export", "verify_export", "TrainerDataset"]

NEMO_SHARD_SIZE = 64
"""Samples per NeMo cache shard (``--shard-size``). NeMo's own producer takes 256; a shard
is built in memory before it is written, and at the 8B shape a padded position costs
88,601 bytes (bf16), so 256 samples of 2,048 positions would hold 46 GB: 64 hold
11.6 GB. NeMo's reader takes any size."""


@dataclass(frozen=True)
class ExportFormat:
    """A trainer's format: the module and function that write it, what it needs, its help."""

    name: str
    module: str
    function: str
    help: str


FORMATS: dict[str, ExportFormat] = {
    "speculators": ExportFormat("speculators", "eagle3_target.export.speculators", "export_speculators",
                                "vllm-project/speculators: a datasets folder + hidden_states/hs_{i}.safetensors "
                                "(needs a dump with --with-prenorm, or --model)"),
    "nemo": ExportFormat("nemo", "eagle3_target.export.nemo", "export_nemo",
                         "NeMo Automodel's EAGLE-3 offline cache v2 (needs --vocab and --model)"),
}


def export(to: str, dump: str, out: str, **kwargs: Any) -> Any:
    """Runs the exporter of format ``to``; returns its :class:`~.files.ExportSummary`."""
    if to not in FORMATS:
        raise ValueError(f"unknown format {to!r}: choose one of {', '.join(FORMATS)}")
    f = FORMATS[to]
    return getattr(importlib.import_module(f.module), f.function)(dump, out, **kwargs)


_LAZY = {"verify_export": "eagle3_target.export.files", "TrainerDataset": "eagle3_target.export.readers"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eagle3_target.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
