"""Does a hidden-mode engine call wait for the GPU, and where? (stage ``diag-sync`` of
sglang_device.sh)

    python scripts/gpu/diag_sync.py --model /tmp/llama8b --engine sglang --device cuda \
        --dtype bfloat16 --data chats.jsonl --batch-tokens 16384 --rounds 2 \
        --engine-arg attention_backend=triton --engine-arg max_batch_rows=256 \
        --engine-arg max_batch_tokens=16384

For each way of asking the target (the rounds alternate them, each a pass over the same
batches with one device sync at the end):

- ``padded``: the dump's hidden-mode compute as it is (``[B,S,*]`` outputs, shifted).
- ``packed``: the engine's packed ``[T,*]`` outputs as they come out of the forward, when
  the engine offers ``packed=True``; otherwise the padded outputs gathered back to the
  real tokens (what the dump keeps).

It prints each pass's wall time, how many calls returned while the GPU was still busy
(no sync at their end: the next call's host work overlaps this one's kernels), and the
places a call synchronises, from ``torch.cuda.set_sync_debug_mode("warn")`` over one call
of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections import Counter

import torch

from eagle3_target.cli.common import add_model_args, load_target
from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import Sample, iter_samples
from eagle3_target.data.tokenizer import load_tokenizer
from eagle3_target.dump import MODES, greedy_batches, pack_batch
from eagle3_target.dump.config import default
from eagle3_target.engines.packing import gather_rows
from eagle3_target.tiny import resolve_model


def padded(target, ids, attn, lmask, lengths):
    return MODES["hidden"].compute(target, ids, attn, lmask, lengths, None)


def packed(target, ids, attn, lmask, lengths):
    gen = getattr(target, "generate_hidden_packed", None)
    if gen is not None:
        return gen(ids, attn, lmask)
    return gather_rows(padded(target, ids, attn, lmask, lengths), attn)


WAYS = {"padded": padded, "packed": packed}


def one_pass(way, target, batches) -> tuple[float, int]:
    """Seconds for all batches (sync at the end) and the calls that returned while the
    GPU still ran."""
    busy = 0
    stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    for ids, attn, lmask, lengths in batches:
        way(target, ids, attn, lmask, lengths)
        if stream is not None and not stream.query():
            busy += 1
    if stream is not None:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, busy


def sync_sites(way, target, batch) -> list[str]:
    """Where one call synchronises (torch's sync debug mode), most frequent first."""
    if not torch.cuda.is_available():
        return []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            way(target, *batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:90]}" for w in got)
    return [f"{n}x {s}" for s, n in sites.most_common()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-tokens", type=int, default=default("batch_tokens"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ways", default="padded,packed")
    args = p.parse_args()
    target = load_target(args)
    tok = load_tokenizer(resolve_model(args.model))
    enc = ChatEncoder(tok, max_length=default("max_length"), vocab_size=target.vocab_size)
    samples = [s for s in iter_samples([args.data], enc) if isinstance(s, Sample)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [(*pack_batch(b, pad), [len(s) for s in b]) for b in greedy_batches(samples, args.batch_tokens)]
    tokens = sum(len(s) for s in samples)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{name}: {len(samples)} samples, {tokens:,} tokens, {len(batches)} batches", flush=True)
    ways = args.ways.split(",")
    for w in ways:  # warm-up, and where each way synchronises
        one_pass(WAYS[w], target, batches[:2])
        sites = sync_sites(WAYS[w], target, batches[len(batches) // 2])
        print(f"{w}: {len(sites)} sync sites in one call" + "".join(f"\n    {s}" for s in sites), flush=True)
    times: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(args.rounds):
        for w in ways:
            dt, busy = one_pass(WAYS[w], target, batches)
            times[w].append(dt)
            print(f"round {r} {w:8s} {dt:7.2f} s  {tokens / dt:9,.0f} tok/s  calls returning with the "
                  f"GPU busy: {busy}/{len(batches)}", flush=True)
    base = statistics.median(times[ways[0]])
    for w in ways:
        m = statistics.median(times[w])
        print(f"{w}: median {m:.2f} s, {tokens / m:,.0f} tok/s, {base / m:.3f}x {ways[0]}")
    target.close()


if __name__ == "__main__":
    sys.exit(main())
