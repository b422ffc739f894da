"""In-process supervision throughput: the timing loop behind ``eagle3-target bench``
and the scripts in ``bench/``.

Times whole ``generate_batch`` (or ``generate_hidden``) calls on random ids: median of
``runs`` after ``warmup``, synchronising the GPU around each call. Tokens counted are
the real (unpadded) tokens, the ones a trainer is supervised on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads on first use: the command line builds its help from this module
    import torch

    from eagle3_target.contract import Eagle3TargetModel

__all__ = ["FORWARDS", "BenchConfig", "make_batch", "run_inprocess"]

FORWARDS = {"logits": "generate_batch", "hidden": "generate_hidden"}
"""What a bench times: aux + all-position logits, or aux + the final hidden state."""


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 4
    seq_len: int = 512
    runs: int = 5
    warmup: int = 2
    mode: str = "logits"
    """``logits`` (aux + all-position logits) or ``hidden`` (aux + final hidden)."""
    ragged: bool = False
    """Row lengths drawn uniformly from ``[seq_len // 16, seq_len]``, right-padded."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq_len < 2 or self.runs < 1 or self.warmup < 0:
            raise ValueError(f"batch, runs >= 1, seq_len >= 2 and warmup >= 0 required: {self}")
        if self.mode not in FORWARDS:
            raise ValueError(f"mode must be one of {', '.join(FORWARDS)}, got {self.mode!r}")


def make_batch(cfg: BenchConfig, vocab_size: int) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """Random right-padded ``(input_ids, attention_mask, loss_mask)``, each ``[B,S] int64``."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab_size, (cfg.batch, cfg.seq_len), generator=g, dtype=torch.int64)
    if cfg.ragged:
        lo = max(2, cfg.seq_len // 16)
        lengths = torch.randint(lo, cfg.seq_len + 1, (cfg.batch,), generator=g)
    else:
        lengths = torch.full((cfg.batch,), cfg.seq_len)
    mask = (torch.arange(cfg.seq_len)[None, :] < lengths[:, None]).to(torch.int64)
    return ids * mask, mask, mask.clone()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_inprocess(target: "Eagle3TargetModel", cfg: BenchConfig) -> dict[str, Any]:
    """Returns timings (seconds) and tokens/s of the median run."""
    ids, mask, loss = make_batch(cfg, target.vocab_size)
    step = getattr(target, FORWARDS[cfg.mode])
    times = []
    for i in range(cfg.warmup + cfg.runs):
        _sync()
        t0 = time.perf_counter()
        out = step(ids, mask, loss)
        _sync()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
        del out
    tokens = int(mask.sum())
    med = statistics.median(times)
    return {
        **asdict(cfg),
        "tokens": tokens,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "tokens_per_s": tokens / med,
    }
