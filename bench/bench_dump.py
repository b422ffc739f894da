"""Offline dump throughput, and what writing costs, as Markdown tables.

    python bench/bench_dump.py [--model DIR] [--device cpu] [--dtype float32]
                               [--data F.jsonl] [--repeat 3] [--synthetic-mb 1024]

Table 1 (the real target): for each mode, the dump's samples/s, tokens/s and MB/s
written, measured end to end around ``run_dump`` (render chats, run the target, pack,
hash, write, fsync, rename, manifest), against the engine alone on the very same
batches (no copy, no write): ``dump/engine`` is the share of engine throughput the dump
keeps (the goal on the GPU: >= 0.9 in hidden mode): the median over the runs after the
first. ``first run`` is the first run's ratio on its own: on a GPU it grows the pinned
host pool from an empty cache (each variant starts from one), a one-off cost per process.

Table 2 (the write path alone, synthetic tensors of a given shape, default the 8B shape
H=4096, V=128256, Vd=32000, bf16): bytes per token of each mode as written (headers
included), against ``logits`` mode, and the MB/s and tokens/s the shard writer sustains
on this machine's disk. A dump cannot outrun this ceiling, whatever the engine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eagle3_target.cli.common import add_model_args, load_target, parse_aux_layers
from eagle3_target.tiny import resolve_model
from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import Sample, iter_samples, iter_supervised_ids
from eagle3_target.data.rows import sample_data_path
from eagle3_target.data.tokenizer import load_tokenizer, tokenizer_class_name, tokenizer_fingerprint
from eagle3_target.dump import MODES, DumpConfig, greedy_batches, pack_batch, run_dump
from eagle3_target.dump.config import default
from eagle3_target.dump.format import ShardJob, ShardWriter
from eagle3_target.dump.host import set_allocator_settings
from eagle3_target.dump.render import RenderProcess
from eagle3_target.dump.summary import StageClock
from eagle3_target.vocab import build_vocab_mapping

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inprocess import cpu_name  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_only(target, batches: list[list[Sample]], mode: str, mapping, pad_id: int, device: str) -> float:
    """Seconds for the mode's target computation over ``batches`` (no copies, no writes):
    the call the dump makes, packed where the mode and the target allow it."""
    spec = MODES[mode]
    t0 = time.perf_counter()
    for batch in batches:
        args = (target, *pack_batch(batch, pad_id), [len(s) for s in batch], mapping)
        if spec.compute_packed is None or spec.compute_packed(*args) is None:
            spec.compute(*args)
    sync(device)
    return time.perf_counter() - t0


def host_pool_report() -> str:
    """The pinned pool's size and growth since the last report (GPU only)."""
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "host_memory_stats")):
        return ""
    st = torch.cuda.host_memory_stats()
    torch.cuda.reset_accumulated_host_memory_stats()
    return (f"; pinned pool {st.get('allocated_bytes.current', 0) / 2**30:.1f} GiB, grown by "
            f"{st.get('num_host_alloc', 0)} allocations in this run "
            f"({st.get('host_alloc_time.total', 0) / 1e6:.2f} s)")


def empty_host_cache() -> None:
    """Returns torch's cached pinned blocks, so the next dump grows its pool from
    nothing, as the first dump in a process does."""
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    for f in (getattr(torch.accelerator, "empty_host_cache", None), getattr(torch._C, "_host_emptyCache", None)):
        if f is not None:
            f()
            break
    torch.cuda.reset_accumulated_host_memory_stats()


VARIANTS = ("base, switch-<ms>ms, pin-<n>, prefetch-<n>, render-thread, render-process, child-ready, "
            "or several joined with +")


@dataclass
class Variant:
    """A pipeline setting the bench compares (``--variants``); ``base`` is the shipped
    default. Each is a public setting: the GIL's switch interval, ``DumpConfig.pin_threads``,
    ``DumpConfig.prefetch`` and ``DumpConfig.render``, or ``child_ready`` (a render process started and ready
    before the clock starts, as the CLI's is by the time its engine has loaded, passed
    to ``run_dump(render=...)``)."""

    name: str
    switch_s: float = 0.005
    pin_threads: int | None = None
    prefetch: int | None = None
    render: str = "auto"
    child_ready: bool = False

    @classmethod
    def parse(cls, name: str) -> "Variant":
        v = cls(name)
        for part in name.split("+"):
            if part.startswith("switch-") and part.endswith("ms"):
                v.switch_s = float(part[len("switch-"):-2]) / 1000
            elif part == "child-ready":
                v.child_ready = True
            elif part.startswith("render-"):
                v.render = part[len("render-"):]
            elif part.startswith("pin-"):
                v.pin_threads = int(part[len("pin-"):])
            elif part.startswith("prefetch-"):
                v.prefetch = int(part[len("prefetch-"):])
            elif part != "base":
                raise SystemExit(f"unknown variant {part!r}: use {VARIANTS}")
        return v

    def apply(self) -> None:
        sys.setswitchinterval(self.switch_s)
        if torch.cuda.is_available():  # torch's default; a dump with pin_threads > 0 changes it
            set_allocator_settings("pinned_use_cuda_host_register:False,pinned_num_register_threads:1")


def check_dump(out: Path, target, batches: list[list[Sample]], mode: str, mapping, pad_id: int) -> str:
    """The dump's first and last batch against the target run on those batches directly:
    every stored field of every sample, compared exactly (same batch, same kernels)."""
    from eagle3_target.dump.reader import Eagle3Dataset

    ds = Eagle3Dataset(out)
    spec = MODES[mode]
    worst, n = 0.0, 0
    starts = [0]
    for b in batches:
        starts.append(starts[-1] + len(b))
    for j in sorted({0, len(batches) - 1}):
        batch = batches[j]
        res = spec.compute(target, *pack_batch(batch, pad_id), [len(s) for s in batch], mapping)
        ref = {k: v.cpu() for k, v in res.items()}
        for r, s in enumerate(batch):
            got = ds.raw(starts[j] + r)
            if got["input_ids"].tolist() != s.input_ids:
                raise RuntimeError(f"sample {starts[j] + r}: stored input_ids differ from the data")
            for k, v in ref.items():
                want = v[r, : len(s)].reshape(got[k].shape)
                worst = max(worst, (got[k].float() - want.float()).abs().max().item())
            n += 1
    return f"{n} samples of batches 0 and {len(batches) - 1} checked: max |stored - direct| = {worst:g}"


def synthetic_write(out: Path, mode: str, h: int, v: int, vd: int, dtype: torch.dtype, total_mb: int,
                    shard_mb: int = 256, seq: int = 512, threads: int = 2) -> tuple[float, int, int]:
    """Writes ~total_mb of mode-shaped shards through the real ShardWriter:
    ``(seconds, bytes, tokens)``."""
    g = torch.Generator().manual_seed(0)
    fields = {"aux_hidden_states": (3 * h, dtype)}
    if mode == "hidden":
        fields["hidden_states"] = (h, dtype)
    elif mode == "logits":
        fields["logits"] = (v, dtype)
    else:
        fields["target_probs"] = (vd, torch.float32)
    sample = {"input_ids": torch.randint(0, v, (seq,), generator=g), "loss_mask": torch.ones(seq, dtype=torch.uint8)}
    for name, (width, dt) in fields.items():
        sample[name] = torch.randn(seq, width, generator=g).to(dt)
    if mode == "draft":
        sample["position_mask"] = torch.ones(seq, dtype=torch.bool)
    per_sample = sum(t.numel() * t.element_size() for t in sample.values())
    per_shard = max(1, shard_mb * (1 << 20) // per_sample)
    n_shards = max(2, total_mb // shard_mb)
    names = ["input_ids", "loss_mask", *fields, *(["position_mask"] if mode == "draft" else [])]
    written: list[int] = []
    writer = ShardWriter(out, lambda job, entry: written.append(entry["bytes"]), "0" * 64, names, "", threads=threads)
    t0 = time.perf_counter()
    for j in range(n_shards):
        samples = [sample] * per_shard  # the writer only reads them
        writer.put(ShardJob(j, f"shard-{j:05d}.safetensors", {"index": j}, samples, list(range(per_shard))))
    writer.close()
    return time.perf_counter() - t0, sum(written), n_shards * per_shard * seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", nargs="+", default=[str(sample_data_path())])
    p.add_argument("--modes", default="hidden,draft,logits")
    p.add_argument("--batch-tokens", type=int, default=default("batch_tokens"))
    p.add_argument("--shard-size-mb", type=float, default=64)
    p.add_argument("--draft-vocab-size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--writer-threads", type=int, default=None, help="default: the dump's (half the cores, 2-8)")
    p.add_argument("--prefetch", type=int, default=None, help="as the CLI's --prefetch (default: its default)")
    p.add_argument("--pin-threads", type=int, default=default("pin_threads"), help="DumpConfig.pin_threads")
    p.add_argument("--variants", default="base", help=f"comma-separated pipeline settings: {VARIANTS}")
    p.add_argument("--check", action="store_true",
                   help="compare the first run's first and last batch with the target run directly")
    p.add_argument("--breakdown", action="store_true", help="print where the dump's main thread spent its time")
    p.add_argument("--workdir", default=None, help="where shards are written (default: a temp folder)")
    p.add_argument("--synthetic-mb", type=int, default=1024, help="MB per mode for table 2 (0: skip)")
    p.add_argument("--synthetic-shape", default="4096,128256,32000,bfloat16", help="H,V,Vd,dtype")
    args = p.parse_args()
    modes = args.modes.split(",")
    clock = StageClock() if args.breakdown else None
    work = Path(tempfile.mkdtemp(prefix="bench-dump-", dir=args.workdir))
    try:
        target = load_target(args)
        dev = str(target.runner.device) if hasattr(target.runner, "device") else "cpu"
        name = torch.cuda.get_device_name() if dev.startswith("cuda") else cpu_name()
        model_dir = resolve_model(args.model)
        tok = load_tokenizer(model_dir)
        enc = ChatEncoder(tok, max_length=default("max_length"), vocab_size=target.vocab_size)
        samples = [s for s in iter_samples(args.data, enc) if isinstance(s, Sample)]
        tokens = sum(len(s) for s in samples)
        batches = list(greedy_batches(samples, args.batch_tokens))
        padded = sum(len(b) * max(len(s) for s in b) for b in batches)
        supervised = list(iter_supervised_ids(samples))
        vd = min(args.draft_vocab_size, target.vocab_size)
        mapping = build_vocab_mapping(supervised, vd, tok.all_special_ids, target_vocab_size=target.vocab_size)
        vocab_path = work / "vocab.safetensors"
        mapping.save(vocab_path)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        print(f"model {args.model or 'built-in tiny'}: {target.num_hidden_layers} layers, hidden "
              f"{target.hidden_size}, vocab {target.vocab_size}; engine {args.engine} on {dev} ({name}), "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        print(f"data: {len(samples)} samples, {tokens:,} tokens in {len(batches)} batches of <= "
              f"{args.batch_tokens} padded tokens ({tokens / padded:.0%} real); shards of "
              f"{args.shard_size_mb:g} MiB; draft vocab {vd}; median of {args.repeat}; load average "
              f"{os.getloadavg()[0]:.2f} at start\n")
        print("| mode | samples/s | tokens/s | MB/s written | engine tokens/s | dump/engine | first run | "
              "bytes/token | vs logits |")
        print("|---|---|---|---|---|---|---|---|---|")
        engine_only(target, batches[:1], "logits", mapping, pad, dev)  # warm-up
        logits_bpt = None
        rows = []
        runs = [(m, v) for m in modes for v in args.variants.split(",")]
        for mode, variant_name in runs:
            variant = Variant.parse(variant_name)
            variant.apply()
            empty_host_cache()  # each variant's first run grows the pinned pool, as a fresh process does
            label = mode if variant.name == "base" else f"{mode} ({variant.name})"
            e_times, d_times = [], []
            summary = None
            for r in range(args.repeat):
                e_times.append(engine_only(target, batches, mode, mapping, pad, dev))
                out = work / f"{mode}-{r}"
                cfg = DumpConfig(out=str(out), data=args.data, mode=mode, model=model_dir,
                                 aux_layer_ids=parse_aux_layers(args.aux_layers),
                                 vocab=str(vocab_path) if mode == "draft" else None,
                                 batch_tokens=args.batch_tokens, shard_size_mb=args.shard_size_mb,
                                 writer_threads=args.writer_threads, progress=False,
                                 prefetch=variant.prefetch if variant.prefetch is not None else args.prefetch,
                                 pin_threads=(variant.pin_threads if variant.pin_threads
                                              is not None else args.pin_threads),
                                 render=variant.render)
                if clock is not None:
                    clock.totals.clear()
                child = None
                if variant.child_ready:
                    child = RenderProcess(model_dir, tokenizer_fingerprint(tok), tokenizer_class_name(tok))
                    if not child.wait_ready(120):
                        raise SystemExit(f"the render process did not start: {child.failure}")
                t0 = time.perf_counter()
                summary = run_dump(cfg, source=target, tokenizer=tok, log=lambda s: None, render=child,
                                   clock=clock)
                sync(dev)
                d_times.append(time.perf_counter() - t0)
                if clock is not None:
                    print(f"  {label} run {r}: engine alone {e_times[-1]:.2f} s; "
                          + clock.report(d_times[-1]) + host_pool_report()
                          + f"; rows rendered by the child process {summary.run_child_rows}",
                          file=sys.stderr, flush=True)
                if r == 0 and args.check:
                    print(f"  {mode}: {check_dump(out, target, batches, mode, mapping, pad)}",
                          file=sys.stderr, flush=True)
                shutil.rmtree(out)
            # Engine and dump alternate within a repeat, so their ratio is taken per pair
            # (robust to load that changes between repeats). The first run pays for growing
            # the pinned pool (a one-off per process), so it is shown apart and the median is
            # over the later runs, the steady state of a long dump.
            ratios = [e_i / d_i for e_i, d_i in zip(e_times, d_times)]
            ratio = statistics.median(ratios[1:] or ratios)
            e, d = statistics.median(e_times[1:] or e_times), statistics.median(d_times[1:] or d_times)
            bpt = summary.bytes / summary.tokens
            logits_bpt = summary.logits_bytes_per_token
            rows.append((mode, bpt))
            print(f"| {label} | {summary.samples / d:,.1f} | {summary.tokens / d:,.0f} | "
                  f"{summary.bytes / d / 1e6:,.1f} | {tokens / e:,.0f} | {ratio:.2f} | {ratios[0]:.2f} | {bpt:,.0f} | "
                  f"{bpt / logits_bpt:.3f} |", flush=True)
        target.close()

        if args.synthetic_mb:
            h, v, vds, dts = args.synthetic_shape.split(",")
            h, v, vds = int(h), int(v), int(vds)
            dtype = getattr(torch, dts)
            writer_threads = DumpConfig(out=str(work)).writer_threads if args.writer_threads is None \
                else args.writer_threads
            print(f"\nwrite path alone, synthetic H={h}, V={v}, Vd={vds}, {dts} (aux and hidden/logits; "
                  f"target_probs fp32), 256 MiB shards, {writer_threads} writer threads, "
                  f"~{args.synthetic_mb} MB per mode, disk under {work}\n")
            print("| mode | bytes/token | vs logits | writer MB/s | writer tokens/s |")
            print("|---|---|---|---|---|")
            res = {}
            for mode in ("logits", "hidden", "draft"):
                out = work / f"synthetic-{mode}"
                out.mkdir()
                secs, nbytes, ntok = synthetic_write(out, mode, h, v, vds, dtype, args.synthetic_mb,
                                                     threads=writer_threads)
                shutil.rmtree(out)
                res[mode] = (secs, nbytes, ntok)
            for mode in ("hidden", "draft", "logits"):
                secs, nbytes, ntok = res[mode]
                base = res["logits"][1] / res["logits"][2]
                print(f"| {mode} | {nbytes / ntok:,.0f} | {nbytes / ntok / base:.3f} | {nbytes / secs / 1e6:,.0f} | "
                      f"{ntok / secs:,.0f} |", flush=True)
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
