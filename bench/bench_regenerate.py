"""``regenerate``'s transformers engine against transformers' plain ``generate`` loop on
the same prompts, one run, side by side, as a Markdown table.

    python bench/bench_regenerate.py [--model DIR] [--prompts 64] [--max-new-tokens 64]
                                     [--batch-size 16] [--device cpu] [--dtype float32]

Without --model it uses the built-in tiny model. Prompts are the first --prompts sample
chats without their last answer (``--turns last``), greedy. End-of-turn tokens are
suppressed in every row so that each answer is exactly --max-new-tokens long and the
rows generate the same tokens. Rows:

- ``generate``, one prompt at a time: ``model.generate`` per prompt (what a plain script does);
- ``generate``, batched: ``model.generate`` on left-padded batches of --batch-size;
- regenerate engine: our loop alone (``HFGenerator.generate``, batches of --batch-size);
- regenerate job: the whole job (rows read, chat template, generation, shards written).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from eagle3_target.data.rows import sample_data_path
from eagle3_target.data.tokenizer import load_tokenizer
from eagle3_target.regen import RegenConfig, run_regenerate
from eagle3_target.regen.hf import HFGenerator
from eagle3_target.regen.prompts import PromptRenderer, Request
from eagle3_target.tiny import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inprocess import cpu_name  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    renderer = PromptRenderer(tok)
    rows = sample_data_path().read_text().splitlines()[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/chats.jsonl"
        with open(data, "w") as f:
            f.write("\n".join(rows) + "\n")
        sampling = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens, "greedy": True}
        gen = HFGenerator(model_dir, tok, renderer, sampling=sampling, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype)
        gen.stop_ids = [-1]  # no id matches: every answer runs to max_new_tokens (see the docstring)
        model = gen.model
        convs = [json.loads(r)["messages"] for r in rows]
        convs = [m[:-1] if m[-1]["role"] == "assistant" else m for m in convs]
        prompts = [renderer.render(m, None) for m in convs]
        dev = next(model.parameters()).device
        out_tokens = args.prompts * args.max_new_tokens
        results = []

        def row(name: str, seconds: float) -> None:
            results.append((name, seconds))

        gen.generate([Request(convs[0], None, 0, prompts[0])])  # warm-up
        plain = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
                     pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for ids in prompts:
                model.generate(torch.tensor([ids], device=dev), attention_mask=torch.ones(1, len(ids), device=dev,
                               dtype=torch.int64), **plain)
            row("transformers generate, one prompt at a time", time.perf_counter() - t0)
            tok.padding_side = "left"
            t0 = time.perf_counter()
            for a in range(0, len(prompts), args.batch_size):
                batch = tok.pad({"input_ids": prompts[a:a + args.batch_size]}, return_tensors="pt")
                model.generate(batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), **plain)
            row(f"transformers generate, left-padded batches of {args.batch_size}", time.perf_counter() - t0)
        t0 = time.perf_counter()
        answers = gen.generate([Request(m, None, 0, ids) for m, ids in zip(convs, prompts)])
        row(f"regenerate engine (HFGenerator), batches of {args.batch_size}", time.perf_counter() - t0)
        assert sum(a.completion_tokens for a in answers) == out_tokens
        cfg = RegenConfig(out=f"{tmp}/out", data=[data], max_new_tokens=args.max_new_tokens, keep_length=True,
                          batch_size=args.batch_size, progress=False)
        s = run_regenerate(cfg, generator=gen, tokenizer=tok, log=lambda _: None)
        row("regenerate job (read, render, generate, write)", s.run_seconds)
        gen.close()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; model {model_dir}; "
          f"{args.prompts} prompts x {args.max_new_tokens} new tokens, greedy, {args.dtype}\n")
    print("| path | seconds | rows/s | generated tok/s | vs one at a time |")
    print("|---|---:|---:|---:|---:|")
    base = results[0][1]
    for name, sec in results:
        print(f"| {name} | {sec:.2f} | {args.prompts / sec:.2f} | {out_tokens / sec:.0f} | {base / sec:.2f}x |")


if __name__ == "__main__":
    main()
