"""The tensor-parallel process group on the CPU, with real worker processes: start,
the batch hand-off (frames, no pickles), a worker that dies or fails, and close."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from eagle3_target.engines.tp import TPGroup, TPWorkerError, WorkerSpec, pack_forward, unpack_forward

HERE = str(Path(__file__).resolve().parent)
ROWS = [[5, 17, 2, 31], [9], [3, 30, 12, 0, 7, 7, 7]]


def spec(**kwargs) -> WorkerSpec:
    path = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
    return WorkerSpec("tp_fakes:echo_runner", kwargs, env={"PYTHONPATH": path})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_forward_frames_carry_ragged_rows_exactly():
    assert unpack_forward(pack_forward("logits", ROWS)) == ("logits", ROWS)
    payload = pack_forward("hidden", ROWS)
    with pytest.raises(ValueError, match="id bytes"):
        unpack_forward(payload[:-8])


def test_a_group_starts_runs_forwards_and_stops_every_worker():
    g = TPGroup(3, spec())
    pids = g.pids
    try:
        g.wait_ready()
        g.set_aux_layers([1, 3, 4])
        for _ in range(3):
            g.start_forward("logits", ROWS)
            g.finish_forward(ROWS)  # each worker reports what it decoded; rank 0 compares
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        g.close()
    assert not any(alive(p) for p in pids)
    g.close()  # idempotent


def test_the_hand_off_is_checked_against_rank_0s_rows():
    g = TPGroup(2, spec())
    try:
        g.wait_ready()
        g.start_forward("logits", ROWS)
        with pytest.raises(TPWorkerError, match="ran other rows than rank 0"):
            g.finish_forward(ROWS[:2])  # rank 0 believes it sent other rows
        with pytest.raises(TPWorkerError):
            g.start_forward("logits", ROWS)  # a failed group stays failed
    finally:
        g.close()


def test_a_worker_killed_mid_forward_ends_the_wait_with_an_error_naming_it():
    failures = []
    g = TPGroup(3, spec(sleep_s=60), on_failure=failures.append)
    try:
        g.wait_ready()
        g.start_forward("logits", ROWS)
        os.kill(g.pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(TPWorkerError, match="rank 2 exited with code -9"):
            g.finish_forward(ROWS)  # rank 1 still sleeps: the watchdog must end the wait
        assert time.monotonic() - t0 < 10
        assert failures and "rank 2" in failures[0]
    finally:
        g.close(timeout=5)


def test_a_worker_that_raises_is_reported_with_its_error():
    g = TPGroup(2, spec(fail="CUDA out of memory (simulated)"))
    try:
        g.wait_ready()
        g.start_forward("hidden", ROWS)
        with pytest.raises(TPWorkerError, match="rank 1 failed: RuntimeError: CUDA out of memory"):
            g.finish_forward(ROWS)
    finally:
        g.close()


def test_a_worker_that_cannot_build_fails_the_start():
    g = TPGroup(2, spec(build_fail="no GPU 1 here"))
    try:
        with pytest.raises(TPWorkerError, match="rank 1 failed: RuntimeError: no GPU 1 here"):
            g.wait_ready()
    finally:
        g.close()


def test_a_group_needs_two_ranks():
    with pytest.raises(ValueError, match="at least 2 ranks"):
        TPGroup(1, spec())
