"""A real server whose engine runs out of memory above a token budget, for the fault
tests: ``python fault_server.py MODEL_DIR OOM_ABOVE_TOKENS LOAD_DELAY_S [--exit-on-disconnect]``.

It is the production ``run_server`` with the production HF runner, wrapped so a
forward over ``OOM_ABOVE_TOKENS`` (rows x columns) raises ``torch.OutOfMemoryError``
exactly as a GPU would, and loading waits ``LOAD_DELAY_S`` (so /health's 503 while
loading can be observed)."""

from __future__ import annotations

import sys
import time

import torch

from eagle3_target import Eagle3TargetModel
from eagle3_target.engines import build_runner
from eagle3_target.server.run import run_server
from eagle3_target.server.settings import ServerSettings


class OOMAbove:
    def __init__(self, runner, limit: int):
        self._runner, self._limit = runner, limit
        self.model = runner.model

    def _check(self, ids: torch.Tensor) -> None:
        if ids.numel() > self._limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {ids.numel()} tokens)")

    def forward_eagle3(self, ids, mask):
        self._check(ids)
        return self._runner.forward_eagle3(ids, mask)

    def forward_eagle3_hidden(self, ids, mask):
        self._check(ids)
        return self._runner.forward_eagle3_hidden(ids, mask)

    def set_aux_layers(self, ids):
        self._runner.set_aux_layers(ids)

    def input_embedding_weight(self):
        return self._runner.input_embedding_weight()

    def lm_head(self):
        return self._runner.lm_head()

    def close(self):
        self._runner.close()


def main() -> int:
    model_dir, limit, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

    def loader() -> Eagle3TargetModel:
        time.sleep(delay)
        runner = build_runner("hf", model_dir, device="cpu", dtype="float32")
        return Eagle3TargetModel(OOMAbove(runner, limit))

    return run_server(loader, ServerSettings(port=0, max_batch_tokens=4096, model_name=model_dir,
                                             engine="hf+oom",
                                             exit_on_disconnect="--exit-on-disconnect" in sys.argv))


if __name__ == "__main__":
    sys.exit(main())
