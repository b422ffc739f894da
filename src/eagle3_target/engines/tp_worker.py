"""A tensor-parallel worker: ``python -m eagle3_target.engines.tp_worker``, started by
:class:`~eagle3_target.engines.tp.TPGroup` (the protocol is in its module docstring).

It builds its rank's runner with the builder the handshake names, answers ``R``, then
runs every forward rank 0 hands it and answers ``D`` with what it ran. It keeps no
output: rank 0 returns the tensors. Any error is answered ``X`` and ends the process, so
rank 0's watchdog sees the death at once (a worker that stayed alive after failing
would leave rank 0 waiting inside a collective).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

from eagle3_target.wire.frames import FrameReader, die_with_parent, write_frame

__all__ = ["main", "load_builder"]


def load_builder(spec: str) -> Any:
    """``"module:function"`` -> the function."""
    module, _, name = spec.partition(":")
    fn: Any = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    return fn


def main() -> int:
    from eagle3_target.engines.common import quiet_transformers
    from eagle3_target.engines.tp import rows_digest, unpack_forward

    die_with_parent()
    quiet_transformers()  # rank 0 already shows the loader's messages once
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's print goes to stderr, not into the frames
    runner = None
    try:
        hello = json.loads(sys.stdin.buffer.readline())
        builder = load_builder(hello["builder"])
        runner = builder(rank=int(hello["rank"]), world=int(hello["world"]), **hello["kwargs"])
        write_frame(out, b"R", b"{}")
        frames = FrameReader(sys.stdin.fileno())
        while True:
            kind, payload = frames.frame()
            if kind in (b"", b"Q"):  # rank 0 closed the group, or died
                break
            if kind == b"A":
                runner.set_aux_layers(json.loads(payload)["ids"])
                write_frame(out, b"D", b"{}")
            elif kind == b"G":
                runner.gather_weight(json.loads(payload)["what"])
                write_frame(out, b"D", b"{}")
            elif kind == b"F":
                mode, rows = unpack_forward(payload)
                runner.forward_rows(rows, mode)
                write_frame(out, b"D", json.dumps(rows_digest(rows)).encode())
            else:
                raise ValueError(f"unknown frame kind {kind!r}")
    except BaseException as e:  # answered, then the process ends: rank 0 must not wait on us
        try:
            write_frame(out, b"X", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        except OSError:
            pass
        print(f"tensor-parallel worker failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if runner is not None:
            try:
                runner.close()
            except Exception as e:  # the exit code says enough; the message helps
                print(f"closing the worker's runner failed: {e}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
