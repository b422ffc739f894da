"""Helpers shared by the server tests (a uniquely named module, so it never collides
with another directory's conftest)."""

from __future__ import annotations

import torch

MAX_REQUEST_BYTES = 1 << 20
MAX_BATCH_TOKENS = 4096


def server_args(tiny_path: str, *extra: str) -> list[str]:
    return ["--model", tiny_path, "--device", "cpu", "--dtype", "float32", *extra]


def make_inputs(seed: int, rows: int, seq: int, vocab: int = 2048
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct right-padded ``[B,S] int64`` inputs: ragged lengths, loss on a suffix."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (rows,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(torch.int64)
    loss = mask.clone()
    loss[:, : max(1, seq // 4)] = 0
    return ids * mask, mask, loss


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
