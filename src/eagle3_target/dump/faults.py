"""Fault injection for the resume tests: ``EAGLE3_TARGET_DUMP_KILL_AT=name:n`` kills the
dump's process with SIGKILL the n-th time it passes the point ``name``
(``batch_done``, ``shard_written``, ``shard_renamed``, ``manifest_written``; an export's
``export_file_written``, ``export_file_renamed``).

Unset (every user's case), a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_ENV", "kill_point"]

KILL_ENV = "EAGLE3_TARGET_DUMP_KILL_AT"


def kill_point(name: str) -> None:
    """Fault injection for the resume tests: ``EAGLE3_TARGET_DUMP_KILL_AT=name:n`` kills
    this process with SIGKILL the n-th time it passes ``name``."""
    spec = os.environ.get(KILL_ENV)
    if not spec or not spec.startswith(name + ":"):
        return
    counts = kill_point.__dict__.setdefault("counts", {})
    counts[name] = counts.get(name, 0) + 1
    if counts[name] == int(spec.split(":")[1]):
        os.kill(os.getpid(), signal.SIGKILL)
