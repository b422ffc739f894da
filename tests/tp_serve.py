"""``python tests/tp_serve.py serve ARGS...``: ``eagle3-target`` with the SGLang engine
pointed at the fake release named in ``$EAGLE3_TEST_FAKE_SGLANG`` and as many "GPUs" as
``--tp-size`` asks, so a real server process can run a tensor-parallel target on the CPU
(its workers build their ranks through ``tp_fakes.fake_sglang_rank``)."""

from __future__ import annotations

import os
import sys

import fake_sglang
from eagle3_target.cli import main
from eagle3_target.engines import sglang as sg
from tp_fakes import FAKE_RELEASE_ENV

if __name__ == "__main__":
    pkg = fake_sglang.install(os.environ[FAKE_RELEASE_ENV])
    real = sg._load_api
    sg._load_api = lambda: real(pkg)
    sg._cuda_device_count = lambda: 8
    sg._set_device = lambda i: None
    sg.WORKER_BUILDER = "tp_fakes:fake_sglang_rank"
    sys.exit(main(sys.argv[1:]))
