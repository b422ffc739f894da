"""Batching for the dump: samples cut greedily into batches by padded tokens, packed
right-padded, read ahead on a thread, and split back into per-sample rows.

Batches are memoryless at their boundaries, which is what makes a resumed run cut the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from eagle3_target.data.samples import Sample, Skipped
from eagle3_target.engines.packing import lengths_mask, right_pad

__all__ = ["Batch", "Rows", "pack_batch", "greedy_batches", "read_ahead"]


def pack_batch(samples: Sequence[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` of ``samples``, each
    ``[B,S] int64``: what the dump hands the target."""
    ids = right_pad([s.input_ids for s in samples], pad_id)
    lmask = right_pad([s.loss_mask for s in samples], 0)
    return ids, lengths_mask([len(s) for s in samples], ids.shape[1]), lmask


@dataclass
class Batch:
    """One packed batch (``samples=None``: the end of the data) and what reading it met."""

    samples: list[Sample] | None
    ids: torch.Tensor | None  # [B,S] int64, right-padded
    attn: torch.Tensor | None  # [B,S] int64
    lmask: torch.Tensor | None  # [B,S] int64
    skipped: list[Skipped]
    rows_read: int


class Rows:
    """A launched batch: ``result()`` waits for its host copy and splits it per sample."""

    def __init__(self, b: Batch, lengths: list[int], copied: Any):
        self.b, self.lengths, self.copied = b, lengths, copied

    def result(self) -> list[dict[str, torch.Tensor]]:
        flat = self.copied.result()
        rows = []
        start = 0
        for r, n in enumerate(self.lengths):
            row = {k: v[start:start + n] for k, v in flat.items()}
            row["input_ids"] = self.b.ids[r, :n]
            row["loss_mask"] = self.b.lmask[r, :n].to(torch.uint8)
            rows.append(row)
            start += n
        return rows


def read_ahead(items: Iterator[Any], depth: int, name: str = "eagle3-read-ahead") -> Iterator[Any]:
    """Yields ``items`` in order while a background thread (``name``) computes up to
    ``depth`` more.

    The producer's exception is re-raised here; a consumer that stops early (closing
    this generator) stops the producer too, and the producer closes ``items`` on its
    own thread (so a chain of these winds down in order): no thread is left behind."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # handed to the consumer
            q.put((done, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=produce, name=name, daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def greedy_batches(samples: Iterable[Sample], batch_tokens: int) -> Iterator[list[Sample]]:
    """Consecutive samples while rows x longest row stays within ``batch_tokens`` (a
    longer sample runs alone). Memoryless at batch boundaries, which is what makes a
    resumed run cut the same batches as an uninterrupted one."""
    batch: list[Sample] = []
    longest = 0
    for item in samples:
        n = len(item)
        if batch and (len(batch) + 1) * max(longest, n) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, n)
    if batch:
        yield batch
