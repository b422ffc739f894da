"""Runs ``eagle3-target dump`` exactly as the CLI does (stage ``cli-dump`` of
sglang_device.sh: the CLI's own parser and handler), then prints torch's pinned-pool
figures for the process and, with ``CLI_BREAKDOWN=1``, where the dump's main thread
spent its time (the dump's ``StageClock``) and a timeline of the engine calls: what a
plain CLI run cannot show. With ``CLI_STACKS=PATH`` as well, every thread's stack goes to
``PATH.<pid>`` each 2 s over the first 20 forwards (how a kernel build inside the first
forward shows up). With ``CLI_PREWARM=SIZE:COUNT,...`` (sizes like ``512M``, ``1G``), a
thread pins COUNT blocks of each SIZE while the engine loads and frees them into torch's
pinned cache, so the dump's first batches find their blocks cached (an experiment: does
growing the pool beside the first forwards cost the engine time?). With ``CLI_WARMUP=1``
one hidden-mode forward of 8 x 2048 zeros runs right after the engine loads (timed
apart; ``CLI_WARMUP=BxS`` for B rows of S tokens): is the first call's extra time a
fresh process's one-time cost, and does a small forward pay it for less? With
``CLI_ENGINE_ONLY=1`` no dump runs: the same arguments load the target exactly as the dump
does, the same batches are rendered (untimed), and only the dump's engine calls run over
them, timed from the first call to a device sync after the last: the engine alone in a
fresh process, to set beside the dump's rate after loading (a warm process's engine-alone
figure does not pay the process's first call)."""
import faulthandler
import os
import sys
import time

import torch

from eagle3_target.cli import build_parser
from eagle3_target.cli import dump as cli_dump
from eagle3_target.dump.summary import StageClock

calls: list[tuple[float, float]] = []  # (start, seconds) of each engine call
clock = None
stacks = os.environ.get("CLI_STACKS")
stack_file = open(f"{stacks}.{os.getpid()}", "w") if stacks else None


copy_waits: list[tuple[int, float]] = []  # (engine calls so far, seconds) of each host-copy wait


def on_stage(name: str, start: float, seconds: float) -> None:
    if name == "wait for host copy":
        copy_waits.append((len(calls), seconds))
    if name != "engine":
        return
    calls.append((start, seconds))
    if stack_file is not None and len(calls) == 20:
        faulthandler.cancel_dump_traceback_later()


if os.environ.get("CLI_BREAKDOWN") == "1":
    # No sync of its own: the SGLang engine's call ends in one, and a device sync on the
    # main thread would wait for the engine thread's next forward.
    clock = StageClock(listener=on_stage)



def prewarm(spec: str) -> None:
    from eagle3_target.dump.host import threaded_pinning

    t0 = time.perf_counter()
    threaded_pinning(8)
    blocks, total = [], 0
    for part in spec.split(","):
        size, count = part.split(":")
        n = int(float(size[:-1]) * {"M": 2**20, "G": 2**30}[size[-1]])
        for _ in range(int(count)):
            blocks.append(torch.empty(n, dtype=torch.uint8, pin_memory=True))
            total += n
    del blocks
    print(f"prewarm: pinned and cached {total / 2**30:.1f} GiB in {time.perf_counter() - t0:.2f} s", flush=True)


warm_thread = None
if os.environ.get("CLI_PREWARM") and torch.cuda.is_available():
    import threading

    warm_thread = threading.Thread(target=prewarm, args=(os.environ["CLI_PREWARM"],), daemon=True)
    warm_thread.start()
warmup_s = 0.0
if os.environ.get("CLI_WARMUP", "0") != "0":
    from eagle3_target.dump import job as dump_job
    from eagle3_target.dump.modes import MODES

    _load = dump_job._load_source
    spec = os.environ["CLI_WARMUP"]  # "1": 8 x 2048; "BxS": B rows of S tokens
    rows, seq = (8, 2048) if spec == "1" else (int(x) for x in spec.split("x"))

    def load_and_warm(cfg):
        global warmup_s
        source = _load(cfg)
        ids = torch.zeros((rows, seq), dtype=torch.int64)
        t0 = time.perf_counter()
        MODES["hidden"].compute(source, ids, torch.ones_like(ids), torch.ones_like(ids), [seq] * rows, None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        print(f"warm-up forward of {rows} x {seq} after the load: {warmup_s:.2f} s", flush=True)
        return source

    dump_job._load_source = load_and_warm


def engine_alone(args) -> int:
    """The dump's engine calls alone over its batches, in this fresh process."""
    from eagle3_target.cli.dump import config_from_args
    from eagle3_target.data.chat import ChatEncoder
    from eagle3_target.data.samples import Sample, iter_samples
    from eagle3_target.data.tokenizer import load_tokenizer
    from eagle3_target.dump import greedy_batches, pack_batch
    from eagle3_target.dump import job as dump_job
    from eagle3_target.dump.modes import MODES
    from eagle3_target.tiny import resolve_model

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer or resolve_model(cfg.model))
    source = dump_job._load_source(cfg)
    loaded = time.perf_counter() - t0
    enc = ChatEncoder(tok, max_length=cfg.max_length, vocab_size=source.vocab_size)
    samples = [s for s in iter_samples(list(cfg.data), enc) if isinstance(s, Sample)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [(*pack_batch(b, pad), [len(s) for s in b]) for b in greedy_batches(samples, cfg.batch_tokens)]
    spec = MODES[cfg.mode]
    times = []
    t1 = time.perf_counter()
    for ids, attn, lmask, lengths in batches:
        c0 = time.perf_counter()
        fields = (source, ids, attn, lmask, lengths, None)
        if spec.compute_packed is None or spec.compute_packed(*fields) is None:
            spec.compute(*fields)
        times.append(time.perf_counter() - c0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    tokens = sum(len(s) for s in samples)
    print(f"engine alone, a fresh process: {len(batches)} calls, {tokens:,} tokens in {dt:.2f} s from the "
          f"first call to the sync after the last: {tokens / dt:,.0f} tokens/s (load {loaded:.1f} s; first "
          f"call {times[0]:.2f} s, the others' median {sorted(times[1:])[len(times[1:]) // 2]:.3f} s)",
          flush=True)
    source.close()
    return 0


args = build_parser().parse_args(sys.argv[1:])  # "dump --model ..." as on the command line
if os.environ.get("CLI_ENGINE_ONLY") == "1":
    sys.exit(engine_alone(args))
if stack_file is not None:
    faulthandler.dump_traceback_later(2, repeat=True, file=stack_file)
t_start = time.perf_counter()
rc = cli_dump.run(args, clock=clock)
t_end = time.perf_counter()
if torch.cuda.is_available():
    st = torch.cuda.host_memory_stats()
    print(f"pinned pool (whole process): {st.get('allocated_bytes.peak', 0) / 2**30:.1f} GiB at peak, "
          f"grown by {st.get('num_host_alloc', 0)} allocations in {st.get('host_alloc_time.total', 0) / 1e6:.2f} s",
          flush=True)
if clock is not None and calls:
    first = calls[0][0]
    print(f"first engine call {first - t_start:.2f} s after the start; from there to the end: {t_end - first:.2f} s; "
          + clock.report(t_end - first))
    if warmup_s:
        print(f"warm-up and dump together: {warmup_s + t_end - first:.2f} s")
    n = len(calls)
    step = max(1, n // 10)
    waits = sorted(copy_waits, key=lambda w: -w[1])[:8]
    print(f"host-copy waits: {sum(w for _, w in copy_waits):.2f} s in {len(copy_waits)}; the longest "
          "(after engine call N: s): " + " ".join(f"{n}:{w:.3f}" for n, w in waits))
    print("first 20 calls (s): " + " ".join(f"{c[1]:.2f}" for c in calls[:20]))
    print(f"engine calls ({n}): [from s, to s] engine s, wall s")
    for i in range(0, n, step):
        part = calls[i:i + step]
        wall_end = calls[i + step][0] if i + step < n else t_end
        eng = sum(c[1] for c in part)
        print(f"  calls {i:4d}-{i + len(part) - 1:4d}: [{part[0][0] - first:7.2f}, {wall_end - first:7.2f}] "
              f"engine {eng:6.2f} s, wall {wall_end - part[0][0]:6.2f} s")
sys.exit(rc)
