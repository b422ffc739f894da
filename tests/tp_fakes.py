"""Runners for the tensor-parallel worker tests: built in a real worker process by
``eagle3_target.engines.tp_worker`` (this folder is put on the worker's PYTHONPATH)."""

from __future__ import annotations

import os
import time


class EchoRunner:
    """Does nothing but what a test asks: sleep in a forward (rank 0 then waits, as inside
    a collective), raise, or exit hard; ``build_fail`` fails the build itself."""

    def __init__(self, rank: int, world: int, sleep_s: float = 0.0, fail: str | None = None,
                 exit_on_forward: bool = False):
        self.rank, self.world = rank, world
        self.sleep_s, self.fail, self.exit_on_forward = sleep_s, fail, exit_on_forward
        self.aux: list[int] | None = None

    def set_aux_layers(self, ids):
        self.aux = list(ids)

    def forward_rows(self, rows, mode):
        if self.exit_on_forward:
            os._exit(3)
        if self.fail:
            raise RuntimeError(self.fail)
        time.sleep(self.sleep_s)

    def close(self):
        pass


def echo_runner(*, rank: int, world: int, build_fail: str | None = None, **kw) -> EchoRunner:
    if build_fail:
        raise RuntimeError(build_fail)
    return EchoRunner(rank, world, **kw)


FAKE_RELEASE_ENV = "EAGLE3_TEST_FAKE_SGLANG"


def fake_sglang_rank(*, rank: int, world: int, **rank_kwargs):
    """A worker's rank of the SGLang engine over the fake release named in
    ``$EAGLE3_TEST_FAKE_SGLANG`` (what ``sglang_helpers.use_fake`` wires in the test process)."""
    import fake_sglang
    from eagle3_target.engines import sglang as sg

    pkg = fake_sglang.install(os.environ[FAKE_RELEASE_ENV])
    real = sg._load_api
    sg._load_api = lambda: real(pkg)
    sg._cuda_device_count = lambda: world
    sg._set_device = lambda i: None
    return sg.build_rank(rank=rank, world=world, **rank_kwargs)
