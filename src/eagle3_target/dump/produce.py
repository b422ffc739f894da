"""Shards from rows: one worker's dump as a stream of :class:`~.format.ShardJob`, and
the manifest those shards are recorded in.

:class:`ShardProducer` reads batches ahead (:mod:`.batching`), runs the target on each
(the mode table's compute, :mod:`.modes`), copies the real tokens to the host
(:mod:`.host`) while the next batch runs, and cuts a shard at the first batch boundary
past ``shard_size_mb``. Each shard's manifest entry records its row range, counts and
the rows skipped inside it, so a rerun can continue after any shard and a damaged one
can be regenerated from its rows alone.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator

import torch

from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import DataReport, Sample, Skipped
from eagle3_target.dump.batching import Batch, Rows, greedy_batches, pack_batch, read_ahead
from eagle3_target.dump.config import DumpConfig
from eagle3_target.dump.faults import kill_point
from eagle3_target.dump.format import ShardJob, config_sha256, dtype_name, json_bytes, write_atomic
from eagle3_target.dump.host import HostCopier, done
from eagle3_target.dump.modes import MODES, TargetSource, compute_prenorm, stored_fields
from eagle3_target.dump.render import RenderProcess, iter_samples_handover
from eagle3_target.dump.summary import Progress, StageClock
from eagle3_target.engines.packing import gather_rows

__all__ = ["ShardProducer"]


class ShardProducer:
    """One worker's dump: holds the manifest and produces shards from a start row."""

    def __init__(self, cfg: DumpConfig, source: TargetSource, encoder: ChatEncoder, mapping: Any,
                 config: dict[str, Any], pad_id: int, clock: StageClock | None = None):
        self.cfg, self.source, self.encoder, self.mapping = cfg, source, encoder, mapping
        self.clock = clock or StageClock()
        self.config, self.pad_id = config, pad_id
        self.spec = MODES[cfg.mode]
        self.out = Path(cfg.out)
        self.fields = [f.name for f in stored_fields(self.spec, config)]
        self.with_prenorm = bool(config.get("with_prenorm"))
        self.config_sha = config_sha256(config)
        self.limit = int(cfg.shard_size_mb * (1 << 20))
        self.manifest: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.run_samples = self.run_tokens = self.run_bytes = 0
        self.copier = HostCopier(cfg.pin_threads)

    # -- manifest -------------------------------------------------------------------
    def save_manifest(self) -> None:
        write_atomic(self.cfg.manifest_path(), json_bytes(self.manifest), self.cfg.worker_tag)

    def record(self, job: ShardJob, entry: dict[str, Any]) -> None:
        with self.lock:
            shards = self.manifest["shards"]
            # In shard order: a repair replaces its entry or fills a gap.
            at = next((p for p, e in enumerate(shards) if e["index"] >= job.index), len(shards))
            if at < len(shards) and shards[at]["index"] == job.index:
                shards[at] = entry
            else:
                shards.insert(at, entry)
            self.save_manifest()

    # -- production -------------------------------------------------------------------
    def _batches(self, start_row: int, child: RenderProcess | None) -> Iterator[Batch]:
        """Rendered, tokenised and packed batches from ``start_row`` on, then one last
        item (``samples=None``) with the rows read after the last batch. ``child``
        takes the rendering over once it is ready."""
        skipped: list[Skipped] = []
        read = [0]

        cfg = self.cfg
        items = iter_samples_handover(cfg.data, self.encoder, start=start_row, num_shards=cfg.num_shards,
                                      shard_index=cfg.shard_index, child=child)

        def samples() -> Iterator[Sample]:
            for item in items:
                read[0] += 1
                if isinstance(item, Skipped):
                    skipped.append(item)
                else:
                    yield item

        def seen() -> tuple[list[Skipped], int]:
            out = (list(skipped), read[0])
            skipped.clear()
            read[0] = 0
            return out

        for batch in greedy_batches(samples(), self.cfg.batch_tokens):
            yield Batch(batch, *pack_batch(batch, self.pad_id), *seen())
        yield Batch(None, None, None, None, *seen())

    def _launch(self, b: Batch) -> Rows | Future:
        """Runs the target on one batch and starts copying its real tokens to the host;
        the future gives one dict per sample (views into the batch's host tensors until
        their shard is written), or None for the end of the data."""
        if b.samples is None:
            return done(None)
        lengths = [len(s) for s in b.samples]
        args = (self.source, b.ids, b.attn, b.lmask, lengths, self.mapping)
        flat = None
        with self.clock.stage("engine"):
            # Packed where the mode and the target can: nothing padded to build and gather
            # back, and the call returns before the GPU is done (the next one's host work
            # overlaps these kernels). --with-prenorm keeps the padded pair of forwards.
            if self.spec.compute_packed is not None and not self.with_prenorm:
                flat = self.spec.compute_packed(*args)
            if flat is None:
                out = self.spec.compute(*args)
                if self.with_prenorm:  # a second forward: no engine gives both in one today
                    out["final_prenorm"] = compute_prenorm(self.source, b.ids, b.attn, b.lmask)
        aux = out["aux_hidden_states"] if flat is None else flat["aux_hidden_states"]
        if dtype_name(aux.dtype) != self.config["dtype"] or aux.shape[-1] != 3 * self.config["hidden_size"]:
            raise RuntimeError(f"the target returned aux_hidden_states {tuple(aux.shape)} {aux.dtype}, "
                               f"expected [..., {3 * self.config['hidden_size']}] {self.config['dtype']}")
        if flat is None:
            with self.clock.stage("gather on device"):
                flat = gather_rows(out, b.attn)
        elif any(v.shape[0] != sum(lengths) for v in flat.values()):
            raise RuntimeError(f"the target returned packed outputs of {[v.shape[0] for v in flat.values()]} "
                               f"tokens for a batch of {sum(lengths)} real tokens")
        return Rows(b, lengths, self.copier.submit(flat))

    def _rows(self, launched: Any) -> list[dict[str, torch.Tensor]] | None:
        with self.clock.stage("wait for host copy"):
            return launched.result()

    def _run_batch(self, b: Batch) -> list[dict[str, torch.Tensor]]:
        return self._rows(self._launch(b))

    def _computed(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, list[dict] | None]]:
        """``(batch, rows)`` in batch order; the last item's rows are None.

        ``prefetch`` 0: this thread launches batch N+1, then waits for batch N's host
        copy and hands it on. 1: one engine thread runs the forwards back to back while
        this thread waits for host copies and cuts shards. 2+ (a remote target): that
        many requests in flight on worker threads."""
        depth = self.cfg.prefetch
        if not depth:
            last: tuple[Batch, Any] | None = None
            for b in batches:
                launched = self._launch(b)
                if last is not None:
                    yield last[0], self._rows(last[1])
                last = (b, launched)
            if last is not None:
                yield last[0], self._rows(last[1])
            return
        if depth == 1:
            ahead = read_ahead(self._launch_all(batches), depth=1, name="eagle3-engine")
            try:
                for b, launched in ahead:
                    yield b, self._rows(launched)
            finally:
                ahead.close()  # the engine thread ends here, even while an error is alive
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="eagle3-target") as pool:
            pending: deque = deque()
            for b in batches:
                pending.append((b, pool.submit(self._run_batch, b) if b.samples is not None else done(None)))
                if len(pending) > depth:
                    b0, fut = pending.popleft()
                    yield b0, fut.result()
            while pending:
                b0, fut = pending.popleft()
                yield b0, fut.result()

    def _launch_all(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, Any]]:
        """``(batch, launched)`` for every batch, run on the engine thread.

        Why a thread: a GPU engine call ends in a device sync, so on the H200 the 8B
        shape's GPU sat idle while the same thread waited for the previous host copy
        and cut shards (0.9 s of 24.9 s over 121 batches). Launching from a thread of
        its own, the next forward starts as soon as the last one has been gathered."""
        # The current CUDA device is per thread: the engine thread takes this one's.
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

        def launch() -> Iterator[tuple[Batch, Any]]:
            if device is not None:
                torch.cuda.set_device(device)
            for b in batches:
                yield b, self._launch(b)

        return launch()

    def produce(self, start_row: int, first_sample: int, first_index: int,
                progress: Progress | None = None, child: RenderProcess | None = None) -> Iterator[ShardJob]:
        """Shards from ``start_row`` on; afterwards ``self.tail`` holds the skipped rows
        after the last sample. ``child`` (used by one call only) renders once it is ready."""
        pending: list[Skipped] = []
        counter = [0]
        samples: list[dict[str, torch.Tensor]] = []
        sample_rows: list[int] = []
        meta = {"tokens": 0, "supervised": 0, "bytes": 0, "truncated": 0, "lost": 0}
        row_start, index, ordinal = start_row, first_index, first_sample

        def finish() -> ShardJob:
            nonlocal row_start, index, ordinal, samples, sample_rows, pending
            row_end = sample_rows[-1] + 1
            report = DataReport()
            for s in [p for p in pending if p.row < row_end]:
                report.add(s)
            pending = [p for p in pending if p.row >= row_end]
            entry = {"index": index, "first_sample": ordinal, "num_samples": len(samples),
                     "rows": [row_start, row_end], "tokens": meta["tokens"],
                     "supervised_tokens": meta["supervised"], "skipped": report.counts_json(),
                     "examples": report.examples_json()}
            if meta["truncated"]:  # absent when --max-length cut nothing (the format's older entries)
                entry["truncated"] = {"rows": meta["truncated"], "supervised_tokens_lost": meta["lost"]}
            job = ShardJob(index, self.cfg.shard_name(index), entry, samples, sample_rows)
            row_start, index, ordinal = row_end, index + 1, ordinal + len(samples)
            samples, sample_rows = [], []
            meta.update(tokens=0, supervised=0, bytes=0, truncated=0, lost=0)
            return job

        # Rendering, tokenising and packing run a batch or two ahead on a thread of their
        # own, so the target never waits for the chat template.
        batches = read_ahead(self._batches(start_row, child), depth=2)
        computed = self._computed(batches)
        try:
            for b, rows in computed:
                pending += b.skipped
                counter[0] += b.rows_read
                if b.samples is None:
                    break
                batch = b.samples
                for s, row in zip(batch, rows):
                    samples.append(row)
                    sample_rows.append(s.row)
                    meta["tokens"] += len(s)
                    meta["supervised"] += s.supervised
                    if s.lost_supervised is not None:
                        meta["truncated"] += 1
                        meta["lost"] += s.lost_supervised
                    meta["bytes"] += sum(t.numel() * t.element_size() for t in row.values())
                self.run_samples += len(batch)
                self.run_tokens += sum(len(s) for s in batch)
                self.run_bytes += sum(t.numel() * t.element_size() for row in rows for t in row.values())
                if progress is not None:
                    progress.update(counter[0], self.run_tokens, self.run_bytes)
                    counter[0] = 0
                kill_point("batch_done")
                if meta["bytes"] >= self.limit:
                    yield finish()
            if samples:
                yield finish()
        finally:
            computed.close()  # first: the engine thread reads the batches
            batches.close()
        if progress is not None:
            progress.update(counter[0], self.run_tokens, self.run_bytes)
        report = DataReport()
        for s in pending:
            report.add(s)
        self.tail = {"rows": [row_start, None], "skipped": report.counts_json(),
                     "examples": report.examples_json()}
