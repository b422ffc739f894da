"""A tensor-parallel world behind one runner: rank 0 in this process, ranks 1..N-1 in
worker processes that this module starts, feeds and stops.

Every rank runs the same forward on its shard of the weights; the engine's own
collectives (SGLang's, over NCCL) carry the tensors between them, so only the batch has
to reach the workers. It goes over each worker's stdin as frames
(:mod:`eagle3_target.wire.frames`), no pickles:

- ``A`` set the aux layers: JSON ``{"ids": [...]}``;
- ``G`` gather a weight over the ranks' vocabulary shards (a collective): JSON
  ``{"what": "embeddings" | "lm_head" | "lm_head_bias"}``;
- ``F`` forward: ``u32 header length | JSON {"mode", "lengths"} | int64 token ids`` (the
  rows' real tokens back to back);
- ``Q`` quit: close the runner and exit 0.

A worker answers on its stdout: ``R`` ready (JSON, after its runner is built), ``D`` done
(JSON ``{"tokens": n, "sum": s}`` of what it ran, so rank 0 can check the hand-off), ``X``
error (JSON ``{"error"}``). The handshake is one JSON line on stdin before any frame:
``{"rank", "world", "builder": "module:function", "kwargs"}``; the worker calls
``builder(rank=..., world=..., **kwargs)`` for its runner (:mod:`.tp_worker`).

Failure is loud and bounded: a worker that exits, or answers ``X``, makes the group
*failed*; every later call raises :class:`TPWorkerError` naming the rank, its exit code
and the end of its stderr. A watchdog thread notices a death within a second even while
rank 0 waits inside a collective, and calls ``on_failure`` (the engine aborts its
process groups there, so the collective returns with an error instead of hanging).
Workers die with this process (``PR_SET_PDEATHSIG`` on Linux, end-of-file on stdin), and
:meth:`TPGroup.close` stops every one, killing what does not exit in time.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from eagle3_target.wire.frames import FrameReader, write_frame

__all__ = ["TPGroup", "TPWorkerError", "WorkerSpec", "pack_forward", "unpack_forward", "rows_digest"]

_U32 = struct.Struct("<I")


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker failed; the runner cannot continue (close it and build a
    new one)."""


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker builds its rank's runner: ``builder`` (``module:function``) is called
    as ``builder(rank=r, world=n, **kwargs)``; ``kwargs`` must be JSON. ``env`` adds to the
    worker's environment (``CUDA_VISIBLE_DEVICES`` stays as it is: ranks pick their GPU)."""

    builder: str
    kwargs: dict[str, Any]
    env: dict[str, str] | None = None


def pack_forward(mode: str, rows: Sequence[Sequence[int]]) -> bytes:
    """The ``F`` payload for ``rows`` (token ids) in ``mode``."""
    import numpy as np

    header = json.dumps({"mode": mode, "lengths": [len(r) for r in rows]}).encode()
    ids = np.concatenate([np.asarray(r, dtype="<i8") for r in rows]) if rows else np.zeros(0, "<i8")
    return _U32.pack(len(header)) + header + ids.tobytes()


def unpack_forward(payload: bytes) -> tuple[str, list[list[int]]]:
    """``(mode, rows)`` of an ``F`` payload; ValueError on a malformed one."""
    import numpy as np

    if len(payload) < _U32.size:
        raise ValueError("forward frame shorter than its header length")
    (n,) = _U32.unpack_from(payload)
    header = json.loads(payload[_U32.size:_U32.size + n])
    lengths = [int(x) for x in header["lengths"]]
    data = payload[_U32.size + n:]
    if len(data) != 8 * sum(lengths):
        raise ValueError(f"forward frame holds {len(data)} id bytes, its lengths say {8 * sum(lengths)}")
    ids = np.frombuffer(data, dtype="<i8")
    rows, pos = [], 0
    for k in lengths:
        rows.append(ids[pos:pos + k].tolist())
        pos += k
    return str(header["mode"]), rows


def rows_digest(rows: Sequence[Sequence[int]]) -> dict[str, int]:
    """What a worker reports of the rows it ran (``D``): rank 0 compares it with its own."""
    return {"tokens": sum(len(r) for r in rows), "sum": sum(sum(int(t) * (i + 1) for i, t in enumerate(r))
                                                          for r in rows) % (1 << 61)}


class _Worker:
    def __init__(self, rank: int, world: int, spec: WorkerSpec):
        self.rank = rank
        self.stderr = tempfile.TemporaryFile()
        env = {**os.environ, **(spec.env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "eagle3_target.engines.tp_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.frames = FrameReader(self.proc.stdout.fileno())
        hello = {"rank": rank, "world": world, "builder": spec.builder, "kwargs": spec.kwargs}
        self.stdin.write((json.dumps(hello) + "\n").encode())
        self.stdin.flush()

    def tail(self, limit: int = 2000) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read().decode("utf-8", "replace")[-limit:].strip()
        except (OSError, ValueError):
            return ""


class TPGroup:
    """Ranks ``1..world-1`` of a tensor-parallel runner, as worker processes.

    Args:
        world: the number of ranks (this process is rank 0).
        spec: how each worker builds its runner.
        on_failure: called once, from the watchdog thread, when a worker dies.
    """

    def __init__(self, world: int, spec: WorkerSpec, *, on_failure: Callable[[str], None] | None = None):
        if isinstance(world, bool) or not isinstance(world, int) or world < 2:
            raise ValueError(f"a tensor-parallel group needs at least 2 ranks, got {world!r}")
        self.world = world
        self.failure: str | None = None
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._closing = False
        self._workers = [_Worker(r, world, spec) for r in range(1, world)]
        self._watchdog = threading.Thread(target=self._watch, name="eagle3-tp-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    # -- failure ----------------------------------------------------------------------
    def _fail(self, why: str) -> None:
        with self._lock:
            if self.failure is not None or self._closing:
                return
            self.failure = why
        if self._on_failure is not None:
            try:
                self._on_failure(why)
            except Exception:  # the failure itself is what the caller will see
                pass

    def _watch(self) -> None:
        while not self._closing:
            for w in self._workers:
                code = w.proc.poll()
                if code is not None and not self._closing:
                    self._fail(f"tensor-parallel rank {w.rank} exited with code {code}"
                               + (f"; its last output:\n{w.tail()}" if w.tail() else ""))
                    return
            time.sleep(0.2)

    def _check(self) -> None:
        if self.failure is not None:
            raise TPWorkerError(self.failure)

    def _answer(self, w: _Worker, want: bytes) -> dict[str, Any]:
        # Wait in short polls, not one blocking read: another rank's death (seen by the
        # watchdog) must end this wait even while this rank's worker is still running.
        while not w.frames.buffered() and not select.select([w.frames.fd], [], [], 0.2)[0]:
            self._check()
        kind, payload = w.frames.frame()
        if kind == want:
            return json.loads(payload or b"{}")
        if kind == b"X":
            msg = json.loads(payload).get("error", "?")
            self._fail(f"tensor-parallel rank {w.rank} failed: {msg}")
        else:
            code = w.proc.wait(5) if w.proc.poll() is None else w.proc.returncode
            self._fail(f"tensor-parallel rank {w.rank} exited with code {code}"
                       + (f"; its last output:\n{w.tail()}" if w.tail() else ""))
        self._check()
        raise AssertionError("unreachable")

    # -- protocol ---------------------------------------------------------------------
    def wait_ready(self) -> None:
        """Waits until every worker has built its runner (they build while rank 0 does:
        the distributed init is a rendezvous of all ranks)."""
        for w in self._workers:
            self._answer(w, b"R")

    def _send(self, kind: bytes, payload: bytes) -> None:
        self._check()
        for w in self._workers:
            try:
                write_frame(w.stdin, kind, payload)
            except (BrokenPipeError, OSError) as e:
                self._fail(f"tensor-parallel rank {w.rank} is gone ({e})"
                           + (f"; its last output:\n{w.tail()}" if w.tail() else ""))
                self._check()

    def start_call(self, kind: bytes, body: dict[str, Any]) -> None:
        """Sends ``kind`` with a JSON ``body`` to every worker (``A``, ``G``)."""
        self._send(kind, json.dumps(body).encode())

    def finish_call(self) -> None:
        """Waits for every worker's ``D`` to the last :meth:`start_call`."""
        for w in self._workers:
            self._answer(w, b"D")

    def set_aux_layers(self, ids: Sequence[int]) -> None:
        self.start_call(b"A", {"ids": [int(i) for i in ids]})
        self.finish_call()

    def start_forward(self, mode: str, rows: Sequence[Sequence[int]]) -> None:
        """Hands ``rows`` to every worker; call before rank 0's own forward of them."""
        self._send(b"F", pack_forward(mode, rows))

    def finish_forward(self, rows: Sequence[Sequence[int]]) -> None:
        """Waits for every worker's forward of ``rows`` and checks each ran those rows."""
        want = rows_digest(rows)
        for w in self._workers:
            got = self._answer(w, b"D")
            if got != want:
                self._fail(f"tensor-parallel rank {w.rank} ran other rows than rank 0 ({got} vs {want})")
                self._check()

    def close(self, timeout: float = 30.0) -> None:
        """Stops every worker (``Q``, then SIGKILL after ``timeout``). Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        for w in self._workers:
            try:
                write_frame(w.stdin, b"Q", b"")
                w.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for w in self._workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.stderr.close()
