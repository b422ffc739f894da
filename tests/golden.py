"""Golden files: the formats pinned independently of our own writers.

``tests/assets/golden/`` holds bytes written by the writers as they were when the
formats were fixed: a small v1 dump of the first sample chats (hidden mode: manifest,
two shards, the LM head), a NeMo NMET blob as ``/generate`` answers, and
``/v1/supervision`` response bodies in logits and hidden mode. ``tests/test_golden.py``
builds each again with the current code and compares every byte.

Everything here is exactly computable on any CPU: the target is :class:`DetRunner`,
whose outputs are small multiples of 1/4 derived from the token ids and positions
(no kernel rounding, no transcendental function), and the tokenizer and chats are
files under ``tests/assets/golden/``, so a change of library version cannot move a
byte. Regenerating the files (``python tests/golden.py --write``) is a deliberate
format change.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ASSETS = Path(__file__).resolve().parent / "assets" / "golden"
MODEL_DIR = ASSETS / "model"  # config.json + the tiny tokenizer (no weights)
CHATS = ASSETS / "chats.jsonl"  # the first 12 bundled sample chats
DUMP_DIR = ASSETS / "dump-v1-hidden"
NMET_FILE = ASSETS / "nemo-generate.nmet"
V1_BODIES = {mode: ASSETS / f"v1-supervision-{mode}.safetensors" for mode in ("logits", "hidden")}

LAYERS, H, V = 8, 8, 2048


class DetRunner:
    """A deterministic target: ``final[b,s,h]`` and ``aux[b,s,j]`` are multiples of 1/4 in
    [-2, 2] computed from the token id and the position, the LM head is a fixed pattern
    of multiples of 1/4, and the logits are ``final @ weight.T`` (exact in fp32: every
    product and partial sum is a small multiple of 1/16)."""

    def __init__(self, dtype: torch.dtype = torch.float32, vocab: int = V):
        self.dtype, self.vocab = dtype, vocab
        model = torch.nn.Linear(1, 1, bias=False).to(dtype)
        model.config = SimpleNamespace(num_hidden_layers=LAYERS, hidden_size=H, vocab_size=vocab)
        self.model = model
        v = torch.arange(vocab)[:, None]
        h = torch.arange(H)[None, :]
        self.weight = (((v * 5 + h * 3) % 9 - 4) / 4).to(dtype)
        self.aux_ids: list[int] | None = None

    def set_aux_layers(self, ids) -> None:
        self.aux_ids = list(ids)

    def _states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_ids.to(torch.int64)[..., None]
        pos = torch.arange(ids.shape[1])[None, :, None]
        final = ((ids * 7 + pos * 3 + torch.arange(H) * 5) % 17 - 8) / 4
        aux = ((ids * 11 + pos + torch.arange(3 * H) * 13) % 15 - 7) / 4
        return final.to(self.dtype), aux.to(self.dtype)

    def forward_eagle3(self, input_ids, attention_mask):
        final, aux = self._states(input_ids)
        return torch.nn.functional.linear(final, self.weight), aux

    def forward_eagle3_hidden(self, input_ids, attention_mask):
        return self._states(input_ids)

    def lm_head(self):
        from eagle3_target.contract import LMHead

        return LMHead(weight=self.weight)

    def input_embedding_weight(self) -> torch.Tensor:
        return self.weight

    def close(self) -> None:
        pass


def target(dtype: torch.dtype = torch.float32, vocab: int = V):
    from eagle3_target import Eagle3TargetModel

    return Eagle3TargetModel(DetRunner(dtype, vocab), aux_layer_ids=[1, 3, 4])


def tokenizer():
    from eagle3_target.data.tokenizer import load_tokenizer

    return load_tokenizer(str(MODEL_DIR))


def write_dump(out: Path) -> Path:
    """The golden dump of the first 12 sample chats (hidden mode, bf16, two shards)."""
    from eagle3_target.dump import DumpConfig, run_dump

    cfg = DumpConfig(out=str(out), data=[str(CHATS)], model=str(MODEL_DIR), mode="hidden",
                     shard_size_mb=0.08, batch_tokens=1024, render="thread", progress=False,
                     writer_threads=2)
    run_dump(cfg, source=target(torch.bfloat16), tokenizer=tokenizer(), log=lambda s: None)
    return out


def nmet_tensors() -> dict[str, torch.Tensor | None]:
    """What NeMo's ``/generate`` answers, in its order, plus a None entry."""
    g = torch.arange(2 * 5 * 6).reshape(2, 5, 6)
    return {
        "aux_hidden_states": ((g % 9 - 4) / 4).to(torch.bfloat16),
        "target_probs": ((g[..., :4] % 4) / 8).float(),
        "position_mask": (g[..., :1] % 3 == 0),
        "input_ids": (g[..., 0] % 97).to(torch.int64),
        "loss_mask": (g[..., 0] % 2).to(torch.int64),
        "extra": None,
    }


def supervision_request() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded rows (6 and 4 tokens) as ``[2,6] int64``."""
    ids = torch.tensor([[5, 17, 2, 31, 8, 1], [9, 3, 30, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    loss = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    return ids, mask, loss


def supervision_body(mode: str) -> bytes:
    """The ``/v1/supervision`` response body for :func:`supervision_request` from an app
    serving :class:`DetRunner` (V = 32), as a client receives it."""
    from starlette.testclient import TestClient

    from eagle3_target.server.app import ServerSettings, create_app
    from eagle3_target.server.worker import EngineWorker
    from eagle3_target.server.metrics import ServerMetrics
    from eagle3_target.wire.v1 import encode_safetensors

    worker = EngineWorker(lambda: target(torch.float32, vocab=32), max_batch_tokens=4096)
    app = create_app(ServerSettings(max_batch_tokens=4096), worker, ServerMetrics())
    ids, mask, loss = supervision_request()
    body = encode_safetensors({"input_ids": ids.to(torch.int32), "attention_mask": mask.bool(),
                               "loss_mask": loss.bool()})
    with TestClient(app) as client:
        for _ in range(200):  # the worker loads the target on its own thread
            if client.get("/health").status_code == 200:
                break
            import time

            time.sleep(0.01)
        r = client.post("/v1/supervision", params={"mode": mode}, content=body,
                        headers={"Content-Type": "application/octet-stream"})
    if r.status_code != 200:
        raise RuntimeError(f"/v1/supervision answered {r.status_code}: {r.text}")
    return r.content


def write_all() -> None:
    import shutil

    from eagle3_target.wire import nmet

    if DUMP_DIR.exists():
        shutil.rmtree(DUMP_DIR)
    write_dump(DUMP_DIR)
    for p in DUMP_DIR.iterdir():
        if p.name.startswith("."):
            p.unlink()  # the writer's lock file is not part of the format
    NMET_FILE.write_bytes(nmet.encode(nmet_tensors()))
    for mode, path in V1_BODIES.items():
        path.write_bytes(supervision_body(mode))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/golden.py --write   (rewrites tests/assets/golden: a format change)")
    write_all()
    print(f"wrote {ASSETS}")
