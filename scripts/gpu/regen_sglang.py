#!/usr/bin/env python3
"""``regenerate --engine sglang`` on a GPU: greedy text against the transformers engine,
and throughput against SGLang's own offline benchmark on the same prompts.

  regen_sglang.py check --model DIR [--rows 32 --max-new-tokens 64] --out check.json
      The peaked tiny model (make_target.py tiny-peaked DIR): every row's greedy answer
      from SGLang's offline Engine against the transformers engine's, same dtype, same
      GPU. The bar: all rows equal; a mismatch is reported with its first differing token.
  regen_sglang.py bench --model DIR [--prompts 512 --max-new-tokens 256] --out bench.json
      The 8B shape (random weights, the tiny tokenizer): the whole regenerate job (render,
      generate, write) and its engine call alone, against
      ``python -m sglang.bench_offline_throughput`` on the same prompts (a ShareGPT file
      of the same single-turn chats, the same chat template, EOS ignored by both so every
      answer is --max-new-tokens long). The goal: >= 0.9x its output tokens/s.

``--dry-run`` runs either on the CPU with the transformers engine in SGLang's place: for
``check``, transformers in ``--dtype`` against transformers fp32 (is the model peaked
enough that bf16 decodes it as fp32 does?); for ``bench``, the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from eagle3_target.data.rows import sample_data_path
from eagle3_target.data.tokenizer import load_tokenizer
from eagle3_target.regen import RegenConfig, read_shard, run_regenerate
from eagle3_target.regen.hf import HFGenerator
from eagle3_target.regen.prompts import PromptRenderer, Request


def single_turn_chats(path: Path, n: int) -> Path:
    """``n`` ShareGPT rows (one human turn, one answer) cycled from the sample chats, as
    JSON Lines at ``path`` (what this job reads) and as one JSON list beside it with the
    suffix ``.json`` (what SGLang's benchmark reads: it ``json.load``s the whole file)."""
    rows = []
    src = [json.loads(x) for x in sample_data_path().read_text().splitlines()]
    i = 0
    while len(rows) < n:
        msgs = src[i % len(src)]["messages"]
        user = next(m["content"] for m in msgs if m["role"] == "user")
        answer = next(m["content"] for m in msgs if m["role"] == "assistant")
        # A copy number keeps repeated prompts distinct (no prefix-cache shortcut for either side).
        rows.append({"conversations": [{"from": "human", "value": f"[{i}] {user}"}, {"from": "gpt", "value": answer}]})
        i += 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.with_suffix(".json").write_text(json.dumps(rows))
    return path


def generator(engine: str, model: str, tok, sampling: dict, dry: bool, extra: dict | None = None,
              dtype: str = "bfloat16"):
    renderer = PromptRenderer(tok)
    if engine == "hf" or dry:
        # --dry-run: the transformers engine in --dtype stands in for SGLang, against
        # transformers fp32, on the CPU: whether the model is peaked enough for bf16.
        return HFGenerator(model, tok, renderer, sampling=sampling, batch_size=64,
                           device="cpu" if dry else "cuda", dtype=("float32" if engine == "hf" else dtype) if dry else dtype)
    from eagle3_target.regen.sglang import SGLangGenerator

    return SGLangGenerator(model, tok, renderer, sampling=sampling, dtype=dtype, extra_sampling=extra,
                           **({"attention_backend": "triton"} if not dry else {}))


def _capture_ids(gen) -> dict[tuple[int, ...], list[int]]:
    """Records every answer's generated ids by its prompt ids (the text alone cannot be
    turned back into the ids a random model produced)."""
    seen: dict[tuple[int, ...], list[int]] = {}
    answer = gen.renderer.answer

    def record(prompt, ids, finish_reason):
        seen[tuple(int(t) for t in prompt)] = [int(t) for t in ids]
        return answer(prompt, ids, finish_reason)

    gen.renderer.answer = record
    return seen


def tie_analysis(model: str, diverged: list[tuple[list[int], list[int], list[int]]], stop_id: int,
                 device: str) -> list[dict]:
    """For each ``(prompt, sglang ids, hf ids)`` that differ: at their first differing
    position, the fp32 reference's logit gap between the two engines' tokens against
    transformers bf16's own largest error there. A divergence is a tie when the gap is
    within that error: bf16 cannot tell the two tokens apart, so either engine may pick
    either."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
    half = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to(device).eval()
    out = []
    for prompt, a, b in diverged:
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        ta = a[k] if k < len(a) else stop_id  # a shorter answer stopped there
        tb = b[k] if k < len(b) else stop_id
        ids = torch.tensor([prompt + b[:k]], device=device)
        with torch.no_grad():
            l32 = ref(ids).logits[0, -1].float()
            l16 = half(ids).logits[0, -1].float()
        gap = float((l32[tb] - l32[ta]).abs())
        noise = float((l16 - l32).abs().max())
        out.append({"first_diff_token": k, "sglang_token": ta, "hf_token": tb,
                    "fp32_top1": int(l32.argmax()), "fp32_gap": gap, "hf_bf16_max_error": noise,
                    "tie": gap <= noise})
    return out


def check(args: argparse.Namespace) -> dict:
    tok = load_tokenizer(args.model)
    data = single_turn_chats(Path(args.work) / "check.jsonl", args.rows)
    rows, ids, generated = {}, {}, {}
    for engine in ("sglang", "hf"):
        out = Path(args.work) / f"check-{engine}"
        cfg = RegenConfig(out=str(out), data=[str(data)], model=args.model, engine="hf", dtype=args.dtype,
                          max_new_tokens=args.max_new_tokens, keep_length=True, progress=False)
        gen = generator(engine, args.model, tok, cfg.sampling(), args.dry_run, dtype=args.dtype)
        ids[engine] = _capture_ids(gen)
        try:
            s = run_regenerate(cfg, generator=gen, tokenizer=tok, log=print)
        finally:
            gen.close()
        print("\n".join(s.lines()))
        generated[engine] = s.generated_tokens
        rows[engine] = [r for p in sorted(out.glob("regen-*")) for r in read_shard(p)]
    if args.fake_divergence:  # --dry-run only: exercise the analysis below on the CPU
        p0 = next(iter(ids["sglang"]))
        ids["sglang"][p0] = ids["sglang"][p0][:2] + [(ids["sglang"][p0][2] + 1) % len(tok)]
    same_text = sum(a["messages"][-1]["content"] == b["messages"][-1]["content"]
                    for a, b in zip(rows["sglang"], rows["hf"]))
    # The finish reasons and token counts too: equal ids can still be recorded apart
    # (an answer that ends on its last allowed token is "length" to SGLang).
    same_finish = sum(a["finish_reason"] == b["finish_reason"] for a, b in zip(rows["sglang"], rows["hf"]))
    diverged = [(list(p), ids["sglang"][p], ids["hf"][p]) for p in ids["hf"] if ids["sglang"].get(p) != ids["hf"][p]]
    stop_id = tok.eos_token_id if tok.eos_token_id is not None else 0
    ties = tie_analysis(args.model, diverged, stop_id, "cpu" if args.dry_run else "cuda") if diverged else []
    n = len(rows["hf"])
    return {"stage": "check", "dtype": args.dtype, "rows": n, "equal_text": same_text,
            "equal_ids": len(ids["hf"]) - len(diverged), "diverged": len(diverged),
            "diverged_at_ties": sum(t["tie"] for t in ties), "equal_finish_reason": same_finish,
            "generated_tokens": generated,
            "pass": n == args.rows and all(t["tie"] for t in ties)
            and (bool(diverged) or (same_finish == n and generated["sglang"] == generated["hf"])),
            "divergences": ties}


def sglang_bench(model: str, data: Path, n: int, out_len: int, work: Path) -> dict:
    """``sglang.bench_offline_throughput`` on ``data``: its output tokens/s (flags picked
    from its own --help, which differs by release)."""
    help_text = subprocess.run([sys.executable, "-m", "sglang.bench_offline_throughput", "--help"],
                               capture_output=True, text=True).stdout
    result = work / "bench_offline.jsonl"
    cmd = [sys.executable, "-m", "sglang.bench_offline_throughput", "--model-path", model, "--dataset-name",
           "sharegpt", "--dataset-path", str(data.with_suffix(".json")), "--num-prompts", str(n), "--sharegpt-output-len", str(out_len),
           "--dtype", "bfloat16", "--attention-backend", "triton", "--result-filename", str(result)]
    if "--apply-chat-template" in help_text:
        cmd.append("--apply-chat-template")
    # Its own warm-up stays on (16 short prompts): without it the timed round compiles
    # triton kernels, as our first round does (ours is timed after a warm-up round too).
    if "--grammar-backend" in help_text:  # no structured output here; xgrammar is not installed
        cmd += ["--grammar-backend", "none"]
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout[-4000:], r.stderr[-4000:], sep="\n")
    if r.returncode != 0:
        return {"error": f"bench_offline_throughput exited {r.returncode}"}
    got: dict = {"command": " ".join(cmd[1:])}
    if result.is_file() and result.read_text().strip():
        got.update(json.loads(result.read_text().strip().splitlines()[-1]))
    m = re.search(r"Output token throughput \(tok/s\):\s*([\d.]+)", r.stdout)
    if m:
        got.setdefault("output_throughput", float(m.group(1)))
    return got


def bench(args: argparse.Namespace) -> dict:
    tok = load_tokenizer(args.model)
    work = Path(args.work)
    data = single_turn_chats(work / "bench.sharegpt.jsonl", args.prompts)
    out = work / "bench-out"
    cfg = RegenConfig(out=str(out), data=[str(data)], model=args.model, max_new_tokens=args.max_new_tokens,
                      keep_length=True, shard_rows=args.prompts, progress=False)
    # EOS ignored, as SGLang's benchmark does by default: every answer is max_new_tokens long.
    gen = generator("sglang", args.model, tok, cfg.sampling(), args.dry_run, extra={"ignore_eos": True})
    try:
        renderer = PromptRenderer(tok)
        reqs = [Request(m, None, 0, renderer.render(m, None))
                for m in ([{"role": "user", "content": r["conversations"][0]["value"]}]
                          for r in map(json.loads, data.read_text().splitlines()))]
        # Warm-up on the whole set: the first round of a shape compiles triton kernels.
        engine_runs = []
        for _ in range(1 + args.engine_runs):
            t0 = time.perf_counter()
            answers = gen.generate(reqs)
            engine_runs.append(time.perf_counter() - t0)
        engine_s = sorted(engine_runs[1:])[len(engine_runs[1:]) // 2]
        s = run_regenerate(cfg, generator=gen, tokenizer=tok, log=print)
    finally:
        gen.close()
    tokens = sum(a.completion_tokens for a in answers)
    ours = {"engine_seconds": engine_s, "engine_runs_seconds": engine_runs, "engine_output_tok_s": tokens / engine_s,
            "job_seconds": s.run_seconds, "job_rows_s": s.run_rows / s.run_seconds,
            "job_output_tok_s": s.run_generated_tokens / s.run_seconds, "output_tokens": tokens}
    theirs = {} if args.dry_run else sglang_bench(args.model, data, args.prompts, args.max_new_tokens, work)
    ratio = {k: ours[k] / theirs["output_throughput"] for k in ("engine_output_tok_s", "job_output_tok_s")
             if theirs.get("output_throughput")}
    return {"stage": "bench", "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "ours": ours,
            "sglang_bench_offline_throughput": theirs, "ratio": ratio,
            "pass": bool(ratio) and ratio.get("engine_output_tok_s", 0) >= 0.9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["check", "bench"])
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--work", default="/tmp/regen-sglang")
    p.add_argument("--dtype", default="bfloat16", help="check: both engines' dtype (SGLang's rmsnorm has no fp32)")
    p.add_argument("--fake-divergence", action="store_true", help="with --dry-run: alter one answer to test the analysis")
    p.add_argument("--engine-runs", type=int, default=3, help="bench: timed engine rounds after one warm-up round")
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU, the transformers engine in SGLang's place")
    args = p.parse_args()
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.stage == "check" else 256
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for d in Path(args.work).glob("*-out"):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    for d in Path(args.work).glob("check-*"):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    res = check(args) if args.stage == "check" else bench(args)
    res["dry_run"] = args.dry_run
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0 if res["pass"] or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
