"""Where a hidden-mode dump loses engine throughput: the engine alone against the engine
with each part of the dump's pipeline added, on the same batches in one process.

    python scripts/gpu/diag_dump_stages.py --model /tmp/llama8b --engine sglang --device cuda \
        --dtype bfloat16 --data chats.jsonl --batch-tokens 16384 --rounds 2 \
        --engine-arg attention_backend=triton --engine-arg max_batch_rows=256 \
        --engine-arg max_batch_tokens=16384

Stages (each a whole pass over the batches; the rounds alternate them):

- ``engine``: the mode's computation only, as ``bench_dump.py``'s engine-alone figure.
- ``+copy``: also gather the real tokens on the device and copy them to pinned host
  memory on the copy thread (:class:`~eagle3_target.dump.host.HostCopier`), rows dropped.
- ``+write``: also cut shards and write them (:class:`~eagle3_target.dump.format.ShardWriter`);
  ``+write-1t`` with one writer thread, ``+write-plain`` without sha256 and fsync,
  ``+write-split`` with the last shard cut in 8 written side by side.
- ``engine+disk``: the engine alone while another thread writes synthetic shards of the
  same bytes through the same writer, at the dump's pace, from memory that is not
  cache-hot: the disk's and page cache's share, without host copies.
- ``dump``: ``run_dump`` itself (render child, read-ahead thread and all), its engine
  calls timed by its own :class:`~eagle3_target.dump.summary.StageClock` (no GPU column).

For each stage: the wall time, the engine calls' wall time, and the GPU's time from
the start to the end of each forward (CUDA events on the engine's stream, no sync): a
larger GPU time means slower kernels or gaps inside a forward; equal GPU time with a
larger wall time means the GPU waited between forwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from eagle3_target.cli.common import add_model_args, load_target
from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import Sample, iter_samples
from eagle3_target.data.tokenizer import load_tokenizer
from eagle3_target.dump import MODES, DumpConfig, greedy_batches, pack_batch, run_dump
from eagle3_target.dump.batching import Batch, Rows
from eagle3_target.dump.config import default
from eagle3_target.dump import format as fmt
from eagle3_target.dump.format import ShardJob, ShardWriter
from eagle3_target.dump.host import HostCopier
from eagle3_target.dump.summary import StageClock
from eagle3_target.engines.packing import gather_rows
from eagle3_target.wire.st_stream import byte_view
from eagle3_target.tiny import resolve_model

CUDA = torch.cuda.is_available()
FIELDS = ["input_ids", "loss_mask", "aux_hidden_states", "hidden_states"]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Forwards:
    """The engine calls' wall time and GPU span (events on the current stream)."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def run(self, target, ids, attn, lmask, lengths):
        compute = MODES["hidden"].compute
        t0 = time.perf_counter()
        if not CUDA:  # a CPU smoke run of the script: no events
            out = compute(target, ids, attn, lmask, lengths, None)
            self.wall += time.perf_counter() - t0
            return out
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        out = compute(target, ids, attn, lmask, lengths, None)
        e1.record()
        self.wall += time.perf_counter() - t0
        self.events.append((e0, e1))
        return out

    def gpu(self) -> float:
        if not CUDA:
            return self.wall
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000


@dataclasses.dataclass
class Setup:
    """One stage's pipeline: what runs beside the engine."""

    copy: bool = False
    write: bool = False
    threads: int | None = None  # writer threads (None: the dump's default)
    plain: bool = False  # writes without sha256 and fsync
    split_tail: int = 1  # the last shard cut into this many, written in parallel


STAGES = {
    "engine": Setup(),
    "+copy": Setup(copy=True),
    "+write": Setup(copy=True, write=True),
    "+write-1t": Setup(copy=True, write=True, threads=1),
    "+write-plain": Setup(copy=True, write=True, plain=True),
    "+write-split": Setup(copy=True, write=True, split_tail=8),
}


def plain_write(path: Path, header: bytes, pieces, parallel_from: int = 0) -> tuple[str, int]:
    """``stream_to_file`` without sha256 and fsync: what those two cost the engine."""
    views = [byte_view(p) for p in pieces]
    with open(path, "wb") as f:
        f.write(header)
        for v in views:
            f.write(v)
    return "0" * 64, len(header) + sum(v.nbytes for v in views)


def pipeline(target, packed, setup: Setup, out: Path, shard_mb: float) -> tuple[Forwards, float, dict]:
    """The dump's pipeline without rendering: the engine runs batch N+1 while batch N
    is copied; with ``write``, whole batches go into shards of ``shard_mb``. Also returns
    the main thread's waits: for host copies, for the writers' queue, for the drain."""
    fw, copier = Forwards(), HostCopier(8)
    threads = setup.threads or DumpConfig(out=str(out)).writer_threads
    waits = {"host copy": 0.0, "put": 0.0, "drain": 0.0}
    saved = fmt.stream_to_file
    if setup.plain:
        fmt.stream_to_file = plain_write
    writer = ShardWriter(out, lambda job, entry: None, "0" * 64, FIELDS, "", threads=threads) if setup.write else None
    limit, index = shard_mb * (1 << 20), 0
    samples: list[dict] = []
    nbytes, last = 0, None

    def put(part: list[dict]) -> None:
        nonlocal index
        t = time.perf_counter()
        writer.put(ShardJob(index, f"shard-{index:05d}.safetensors", {"index": index}, part, list(range(len(part)))))
        waits["put"] += time.perf_counter() - t
        index += 1

    def take(launched) -> None:
        nonlocal samples, nbytes
        t = time.perf_counter()
        rows = launched.result()
        waits["host copy"] += time.perf_counter() - t
        if writer is None:
            return
        samples += rows
        nbytes += sum(t.numel() * t.element_size() for r in rows for t in r.values())
        if nbytes >= limit:
            put(samples)
            samples, nbytes = [], 0

    t0 = time.perf_counter()
    try:
        for b, (ids, attn, lmask) in packed:
            lengths = [len(s) for s in b]
            out_ = fw.run(target, ids, attn, lmask, lengths)
            launched = None
            if setup.copy:
                launched = Rows(Batch(b, ids, attn, lmask, [], 0), lengths, copier.submit(gather_rows(out_, attn)))
            del out_
            if last is not None:
                take(last)
            last = launched
        if last is not None:
            take(last)
        if writer is not None:
            k = max(1, min(setup.split_tail, len(samples)))
            for j in range(k):
                part = samples[j * len(samples) // k:(j + 1) * len(samples) // k]
                if part:
                    put(part)
            t = time.perf_counter()
            writer.close()
            waits["drain"] = time.perf_counter() - t
        copier.close()
        sync()
    finally:
        fmt.stream_to_file = saved
    return fw, time.perf_counter() - t0, waits


def engine_with_disk(target, packed, out: Path, total_bytes: int, shard_mb: float,
                     seconds: float) -> tuple[Forwards, float, dict]:
    """The engine alone while a thread writes ``total_bytes`` of synthetic shards at the
    dump's pace (spread over ``seconds``), from 2 GiB of distinct memory (not cache-hot),
    hashed and fsynced by the dump's writer: the disk's and page cache's share alone."""
    g = torch.Generator().manual_seed(0)
    seq, h = 512, target.hidden_size
    pool = torch.randn(2 << 30 >> 1, generator=g).to(torch.bfloat16)  # 2 GiB of bf16
    per = seq * (4 * h * 2 + 9)
    per_shard = max(1, int(shard_mb * (1 << 20)) // per)
    n_shards = max(1, total_bytes // (per * per_shard))
    ids, lmask = torch.zeros(seq, dtype=torch.int64), torch.ones(seq, dtype=torch.uint8)
    step = seq * 4 * h

    def sample(k: int) -> dict:
        at = (k * step) % (pool.numel() - step)
        flat = pool[at:at + step]
        return {"input_ids": ids, "loss_mask": lmask, "aux_hidden_states": flat[:seq * 3 * h].view(seq, 3 * h),
                "hidden_states": flat[seq * 3 * h:].view(seq, h)}

    busy = {"writer s": 0.0}

    def write() -> None:
        w = ShardWriter(out, lambda job, entry: None, "0" * 64, FIELDS, "",
                        threads=DumpConfig(out=str(out)).writer_threads)
        t_start = time.perf_counter()
        for j in range(n_shards):
            wait = t_start + seconds * j / n_shards - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            w.put(ShardJob(j, f"shard-{j:05d}.safetensors", {"index": j},
                           [sample(j * per_shard + i) for i in range(per_shard)], list(range(per_shard))))
        w.close()
        busy["writer s"] = time.perf_counter() - t_start

    th = threading.Thread(target=write)
    fw = Forwards()
    t0 = time.perf_counter()
    th.start()
    for b, (ids_, attn, lm) in packed:
        fw.run(target, ids_, attn, lm, [len(s) for s in b])
    sync()
    wall = time.perf_counter() - t0
    th.join()
    return fw, wall, busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--shard-size-mb", type=float, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stages", default="engine,+copy,+write,engine+disk,dump",
                   help=f"comma-separated, of: {', '.join(STAGES)}, engine+disk, dump")
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--out", default=None, help="JSON of every stage's figures")
    args = p.parse_args()
    target = load_target(args)
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    enc = ChatEncoder(tok, max_length=default("max_length"), vocab_size=target.vocab_size)
    samples = [s for s in iter_samples([args.data], enc) if isinstance(s, Sample)]
    batches = list(greedy_batches(samples, args.batch_tokens))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    packed = [(b, pack_batch(b, pad)) for b in batches]
    tokens = sum(len(s) for s in samples)
    total_bytes = tokens * (4 * target.hidden_size * 2 + 9)
    print(f"{torch.cuda.get_device_name() if CUDA else 'cpu'}: {len(samples)} samples, {tokens:,} tokens, {len(batches)} batches; "
          f"~{total_bytes / 2**30:.1f} GiB of hidden-mode rows", flush=True)
    work = Path(tempfile.mkdtemp(prefix="diag-dump-", dir=args.workdir))
    (work / "warm").mkdir()
    pipeline(target, packed[:4], STAGES["+write"], work / "warm", args.shard_size_mb)  # kernels, pinned pool
    engine_s = 10.0
    results: dict[str, list[dict]] = {}
    try:
        for r in range(args.rounds):
            for stage in args.stages.split(","):
                out = work / f"{stage}-{r}"
                out.mkdir()
                waits: dict = {}
                if stage in STAGES:
                    fw, wall, waits = pipeline(target, packed, STAGES[stage], out, args.shard_size_mb)
                    if stage == "engine":
                        engine_s = wall
                elif stage == "engine+disk":
                    fw, wall, waits = engine_with_disk(target, packed, out, total_bytes, args.shard_size_mb,
                                                       engine_s)
                elif stage == "dump":
                    # run_dump's own seam: its StageClock times the engine calls (no
                    # CUDA events there, so this stage has no GPU column).
                    shutil.rmtree(out)
                    clock = StageClock()
                    cfg = DumpConfig(out=str(out), data=[args.data], mode="hidden", model=model_dir,
                                     batch_tokens=args.batch_tokens, shard_size_mb=args.shard_size_mb,
                                     progress=False)
                    t0 = time.perf_counter()
                    run_dump(cfg, source=target, tokenizer=tok, log=lambda s: None, clock=clock)
                    sync()
                    wall = time.perf_counter() - t0
                    fw = Forwards()
                    fw.wall = clock.totals.get("engine", 0.0)
                    waits = {k: v for k, v in clock.totals.items() if k != "engine"}
                else:
                    raise SystemExit(f"unknown stage {stage!r}")
                gpu = fw.gpu() if stage != "dump" else None
                row = {"round": r, "wall_s": wall, "engine_calls_s": fw.wall, "gpu_forward_s": gpu,
                       "tokens_per_s": tokens / wall, **{k: round(v, 3) for k, v in waits.items()}}
                results.setdefault(stage, []).append(row)
                print(f"round {r} {stage:12s} wall {wall:6.2f} s  engine calls {fw.wall:6.2f} s  "
                      f"GPU forwards {'-' if gpu is None else f'{gpu:6.2f}'} s  {tokens / wall:8,.0f} tok/s  "
                      + "  ".join(f"{k} {v:.2f} s" for k, v in waits.items()), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(x["wall_s"] for x in results["engine"]) if "engine" in results else None
    print("\n| stage | wall s (median) | engine calls s | GPU forwards s | vs engine |")
    print("|---|---:|---:|---:|---:|")
    for stage, rows in results.items():
        med = {k: statistics.median(x[k] for x in rows) for k in ("wall_s", "engine_calls_s")}
        gpus = [x["gpu_forward_s"] for x in rows if x["gpu_forward_s"] is not None]
        gpu = f"{statistics.median(gpus):.2f}" if gpus else "-"
        ratio = f"{base / med['wall_s']:.3f}" if base else ""
        print(f"| {stage} | {med['wall_s']:.2f} | {med['engine_calls_s']:.2f} | {gpu} | {ratio} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    target.close()


if __name__ == "__main__":
    sys.exit(main())
