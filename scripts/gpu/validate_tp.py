#!/usr/bin/env python3
"""Tensor parallelism on GPUs: the SGLang engine at TP=N against TP=1 and an fp32
reference, and the speed of both.

  validate_tp.py --model DIR --tp 2 --out tp.json [--attention-backend triton]
                 [--lengths 37,64,129,5,300] [--bench-batch 8 --bench-seq 2048]
  validate_tp.py --model DIR --tp 2 --only-tp --bench-batch 8 --bench-seq 2048   # a model TP=1 cannot hold

Equality: one ragged batch through TP=1 (this process, then closed) and TP=N, every mode
(all-position logits, aux, final post-norm and pre-norm states), the input embedding
and the LM head: relative L2 error and argmax agreement of TP=N against TP=1, side by
side with TP=1's own error against fp32 transformers (the same bf16 weights upcast;
skipped with --no-reference or --only-tp). The pass bar: TP=N's difference from TP=1
is below a quarter of TP=1's own bf16 error (kernel noise, not a wrong gather).

Speed: tokens/s of B x S random rows, aux + all-position logits and hidden mode,
median of 5 after 2 warm-ups, each with TFLOP/s = 2 * params * tokens / time and the
share of the GPUs' bf16 GEMM peak (--peak-tflops per GPU, default 790).

Run with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
in the environment (the workers inherit it). Exit status 1 when a check fails.
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


def rel(x: torch.Tensor, r: torch.Tensor) -> float:
    x, r = x.float(), r.float()
    return float((x - r).pow(2).sum().sqrt() / r.pow(2).sum().sqrt().clamp_min(1e-30))


def ragged(lengths: list[int], vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), s), generator=g)
    mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
    return ids * mask, mask


def outputs(runner, ids, mask, aux_ids) -> dict[str, torch.Tensor]:
    runner.set_aux_layers(aux_ids)
    m = mask.bool()
    logits, aux = runner.forward_eagle3(ids, mask)
    final, _ = runner.forward_eagle3_hidden(ids, mask)
    pre, _ = runner.forward_eagle3_prenorm(ids, mask)
    out = {k: v[m.to(v.device)].float().cpu() for k, v in
           dict(logits=logits, aux=aux, final=final, prenorm=pre).items()}
    out["embeddings"] = runner.input_embedding_weight().float().cpu()
    out["lm_head"] = runner.lm_head().weight.float().cpu()
    return out


def reference(model: str, ids, mask, aux_ids) -> dict[str, torch.Tensor]:
    """fp32 transformers on the bf16 weights, each row alone."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).cuda().eval()
    out: dict[str, list] = dict(logits=[], aux=[], final=[], prenorm=[])
    with torch.no_grad():
        for b in range(ids.shape[0]):
            row = ids[b][mask[b].bool()][None].cuda()
            o = hf(input_ids=row, output_hidden_states=True)
            hs = o.hidden_states
            out["logits"].append(o.logits[0].float().cpu())
            out["aux"].append(torch.cat([hs[k + 1][0] for k in aux_ids], -1).float().cpu())
            out["final"].append(hs[-1][0].float().cpu())
    del hf
    torch.cuda.empty_cache()
    return {k: torch.cat(v) for k, v in out.items() if v}


def model_params(cfg) -> int:
    """Parameters of the model ``cfg`` describes (TFLOP/s counts the whole model), from a
    meta-device instance: no memory, no weights needed."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_dummy_70b(path: str) -> str:
    """A config-only Llama-3-70B-shape folder: SGLang's ``load_format=dummy`` fills random
    weights on the GPUs (140 GB in bf16: one GPU cannot hold it, nor this disk)."""
    from transformers import LlamaConfig

    LlamaConfig(**LLAMA_70B, torch_dtype="bfloat16").save_pretrained(path)
    return path


def bench(runner, vocab: int, b: int, s: int, aux_ids, params: int, gpus: int, peak: float) -> dict:
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    runner.set_aux_layers(aux_ids)
    res = {}
    for name, fn in (("aux+logits", runner.forward_eagle3), ("hidden", runner.forward_eagle3_hidden)):
        times = []
        for i in range(7):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(ids, mask)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
            del out
        med = statistics.median(times)
        tflops = 2 * params * b * s / med / 1e12
        res[name] = dict(tokens_per_s=b * s / med, median_s=med, tflops=tflops,
                         share_of_peak=tflops / (peak * gpus), peak_gb=torch.cuda.max_memory_allocated() / 1e9)
        log(f"{name:<11} tp={gpus}: {b * s / med:,.0f} tok/s, {tflops:.0f} TFLOP/s "
            f"({tflops / (peak * gpus):.0%} of {gpus} x {peak:.0f})")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--out", default="tp.json")
    p.add_argument("--attention-backend", default="triton")
    p.add_argument("--lengths", default="37,64,129,5,300")
    p.add_argument("--aux-ids", default=None)
    p.add_argument("--bench-batch", type=int, default=0, help="0: no speed measurement")
    p.add_argument("--bench-seq", type=int, default=2048)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--only-tp", action="store_true", help="no TP=1 run (a model one GPU cannot hold)")
    p.add_argument("--dummy-70b", action="store_true",
                   help="--model is a folder to write a config-only Llama-3-70B shape into; SGLang "
                        "fills random weights (load_format=dummy); implies --only-tp")
    args = p.parse_args()
    if args.dummy_70b:
        write_dummy_70b(args.model)
        args.only_tp = True

    from eagle3_target.contract import default_aux_layer_ids
    from eagle3_target.engines import sglang as sg
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model)
    n_layers = cfg.num_hidden_layers
    aux_ids = [int(x) for x in args.aux_ids.split(",")] if args.aux_ids else default_aux_layer_ids(n_layers)
    lengths = [int(x) for x in args.lengths.split(",")]
    ids, mask = ragged(lengths, cfg.vocab_size)
    res: dict = dict(model=args.model, tp=args.tp, gpus=[torch.cuda.get_device_name(i) for i in range(args.tp)],
                     torch=torch.__version__, lengths=lengths, aux_ids=aux_ids, checks={})
    kw = dict(dtype="bfloat16", attention_backend=args.attention_backend,
              max_batch_tokens=max(8192, args.bench_batch * args.bench_seq), max_batch_rows=64,
              **({"load_format": "dummy"} if args.dummy_70b else {}))
    runs: dict[str, dict] = {}
    params = model_params(cfg)
    for tp in ([args.tp] if args.only_tp else [1, args.tp]):
        t = time.time()
        r = sg.build(args.model, tp_size=tp, **kw)
        log(f"tp={tp}: built in {time.time() - t:.1f}s (workers {r.tp_worker_pids})")
        try:
            runs[f"tp{tp}"] = outputs(r, ids, mask, aux_ids)
            if args.bench_batch:
                res[f"bench_tp{tp}"] = bench(r, cfg.vocab_size, args.bench_batch, args.bench_seq, aux_ids,
                                             params, tp, args.peak_tflops)
        finally:
            r.close()
        torch.cuda.empty_cache()
    ok = True
    if not args.only_tp:
        ref = None if args.no_reference else reference(args.model, ids, mask, aux_ids)
        one, many = runs["tp1"], runs[f"tp{args.tp}"]
        res["tp_vs_tp1"] = {k: rel(many[k], one[k]) for k in one}
        res["argmax_agree_tp_vs_tp1"] = float((many["logits"].argmax(-1) == one["logits"].argmax(-1)).float().mean())
        if ref is not None:
            res["tp1_vs_fp32"] = {k: rel(one[k], ref[k]) for k in ref}
            res["tp_vs_fp32"] = {k: rel(many[k], ref[k]) for k in ref}
            res["argmax_agree_vs_fp32"] = {
                "tp1": float((one["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean()),
                f"tp{args.tp}": float((many["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean())}
            for k in ref:
                res["checks"][f"{k}_tp_diff_below_quarter_bf16_error"] = res["tp_vs_tp1"][k] < 0.25 * res["tp1_vs_fp32"][k]
        res["checks"]["weights_gathered_exactly"] = res["tp_vs_tp1"]["embeddings"] == 0.0 and res["tp_vs_tp1"]["lm_head"] == 0.0
        ok = all(res["checks"].values())
        log("TP vs TP=1:", json.dumps(res["tp_vs_tp1"]), "checks", json.dumps(res["checks"]))
    res["pass"] = ok
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    log("PASS" if ok else "FAIL", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
