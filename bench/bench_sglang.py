#!/usr/bin/env python3
"""SGLang engine vs HF engine throughput, side by side in one process.

  bench_sglang.py --model DIR [--batch 8 --seq 2048 --attention-backend flashinfer]
                  [--runs 5 --warmup 2 --out bench.json]

Cases on one random ``[B,S]`` batch, each a whole engine call (packing, batch setup,
forward, scatter back to ``[B,S,*]``), median of ``runs`` after ``warmup``, synchronised:

1. ``sglang_stock``: SGLang extend with no capture (stock last-position logits)
2. ``sglang_aux``: the engine, aux states only
3. ``sglang_logits``: the engine, aux + all-position logits (``forward_eagle3``)
4. ``sglang_hidden``: the engine, aux + final hidden, no LM head (``forward_eagle3_hidden``)
5. ``hf_logits``: the HF engine (sdpa), aux + all-position logits

and a ragged batch (row lengths uniform in [S/16, S], seeded): ``sglang_ragged`` sends only
the real tokens; ``sglang_padded`` runs the same rows with every pad computed (mask of
ones), as an engine without packing would; ``hf_ragged`` is the HF engine on the masked
batch. Tokens/s counts real tokens only; TFLOP/s = 2 * params * real tokens / time
(weights only, no attention term; the same formula for every case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

T0 = time.time()


def log(*a: object) -> None:
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def timed(fn, runs: int, warmup: int) -> dict:
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        del out
    return {"median_s": statistics.median(times), "times_s": [round(x, 4) for x in times],
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


def batches(B: int, S: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    full = torch.ones_like(ids)
    lengths = torch.randint(S // 16, S + 1, (B,), generator=g)
    ragged = (torch.arange(S)[None, :] < lengths[:, None]).to(torch.int64)
    return ids, full, ragged


def param_count(path: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--attention-backend", default="flashinfer")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-fraction-static", type=float, default=0.6)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default="bench_sglang.json")
    a = p.parse_args()

    from eagle3_target.contract import default_aux_layer_ids
    from eagle3_target.engines import hf as hf_engine
    from eagle3_target.engines import sglang as sg

    B, S = a.batch, a.seq
    params = param_count(a.model)
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "B": B, "S": S,
           "params": params, "attention_backend": a.attention_backend, "runs": a.runs,
           "warmup": a.warmup, "cases": {}}
    cases = res["cases"]

    def record(name: str, r: dict, tokens: int) -> None:
        r["tokens"] = tokens
        r["tokens_per_s"] = tokens / r["median_s"]
        r["tflops"] = 2 * params * tokens / r["median_s"] / 1e12
        cases[name] = r
        log(f"{name:15s} {r['tokens_per_s']:9.0f} tok/s {r['tflops']:6.1f} TFLOP/s "
            f"median {r['median_s'] * 1e3:7.1f} ms peak {r['peak_gb']} GB")

    t = time.time()
    runner = sg.build(a.model, dtype="bfloat16", attention_backend=a.attention_backend,
                      max_batch_tokens=B * S, max_batch_rows=B,
                      mem_fraction_static=a.mem_fraction_static)
    res["sglang_version"] = runner._api.version
    res["sglang_build_s"] = round(time.time() - t, 1)
    aux_ids = default_aux_layer_ids(runner._num_layers)
    runner.set_aux_layers(aux_ids)
    res["aux_ids"] = aux_ids
    ids, full, ragged = batches(B, S, runner.vocab_size, a.seed)
    n_full, n_ragged = int(full.sum()), int(ragged.sum())
    res["ragged_lengths"] = ragged.sum(1).tolist()
    t = time.time()
    runner.forward_packed(ids, full, "stock")  # first forward: JIT, autotune
    torch.cuda.synchronize()
    res["sglang_first_forward_s"] = round(time.time() - t, 1)
    log(f"SGLang {res['sglang_version']} built in {res['sglang_build_s']}s, first forward "
        f"{res['sglang_first_forward_s']}s")
    for name, mode in (("sglang_stock", "stock"), ("sglang_aux", "aux"),
                       ("sglang_logits", "logits"), ("sglang_hidden", "hidden")):
        record(name, timed(lambda: runner.forward_packed(ids, full, mode), a.runs, a.warmup), n_full)
    record("sglang_ragged", timed(lambda: runner.forward_eagle3(ids, ragged), a.runs, a.warmup), n_ragged)
    record("sglang_padded", timed(lambda: runner.forward_eagle3(ids, full), a.runs, a.warmup), n_ragged)
    runner.close()
    torch.cuda.empty_cache()

    if not a.skip_hf:
        t = time.time()
        hf = hf_engine.build(a.model, device="cuda", dtype="bfloat16")
        hf.set_aux_layers(aux_ids)
        res["hf_build_s"] = round(time.time() - t, 1)
        record("hf_logits", timed(lambda: hf.forward_eagle3(ids, full), a.runs, a.warmup), n_full)
        record("hf_ragged", timed(lambda: hf.forward_eagle3(ids, ragged), a.runs, a.warmup), n_ragged)
        hf.close()

    c = {k: v["tokens_per_s"] for k, v in cases.items()}
    ratios = {
        "aux_over_stock": c["sglang_aux"] / c["sglang_stock"],
        "hidden_over_stock": c["sglang_hidden"] / c["sglang_stock"],
        "ragged_over_padded": c["sglang_ragged"] / c["sglang_padded"],
    }
    if "hf_logits" in c:
        ratios["logits_over_hf"] = c["sglang_logits"] / c["hf_logits"]
        ratios["ragged_over_hf_ragged"] = c["sglang_ragged"] / c["hf_ragged"]
    goals = {"aux_over_stock": 0.95, "hidden_over_stock": 0.95, "logits_over_hf": 1.15,
             "ragged_over_padded": 1.3}
    res["ratios"] = ratios
    res["goals"] = {k: {"goal": g, "value": ratios[k], "met": ratios[k] >= g}
                    for k, g in goals.items() if k in ratios}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    log("BENCH ratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    log("BENCH goals:", json.dumps({k: v["met"] for k, v in res["goals"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
