#!/usr/bin/env python3
"""Writes a bf16 target model for the SGLang GPU validation and benchmark.

  make_target.py tiny-peaked DIR   8-layer Llama (H=256, head_dim 64) with a scaled LM head,
                                   so next-token distributions are peaked and argmax means
                                   something; the locally trained tokenizer comes with it.
  make_target.py tiny-trained DIR  the same shape trained briefly (fp32, fixed seed) on the
                                   single-turn sample chats regen_sglang.py check answers, so
                                   greedy decoding follows a memorised path by wide margins
                                   (a random model's near-ties are within bf16's error, so
                                   two bf16 engines part ways there); saved in bf16.
  make_target.py llama3-8b DIR     Llama-3.1-8B shape (32 layers, H=4096, GQA 32/8,
                                   FFN 14336, V=128256), random weights built on the GPU,
                                   RMSNorm weights 1 + 0.1*N(0,1) so norm bugs show.

Both are built-in presets (``eagle3_target.tiny.PRESETS``: ``tiny-peaked-256`` and
``llama3-8b``), saved in bf16 with the locally trained tokenizer: every engine (SGLang
bf16, HF bf16, the fp32 HF reference upcast from them) then runs the same weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import json

from eagle3_target.tiny import PRESETS, TinyModelConfig, make_tiny_model

# GPU names -> (preset, where the weights are built)
SHAPES = {"tiny-peaked": ("tiny-peaked-256", None), "tiny-trained": (None, None), "llama3-8b": ("llama3-8b", "cuda")}
# tiny-trained: tiny-peaked-256's shape without the scaled head (training sets the scale).
TRAINED = TinyModelConfig(hidden=256, heads=4, kv_heads=2, intermediate=512)


def train_briefly(out: Path, rows: int, answer_tokens: int, steps: int, device: str) -> float:
    """Trains the fp32 model in ``out`` on the first ``rows`` single-turn chats of
    ``regen_sglang.single_turn_chats`` (prompt + answer + end of turn, cut after
    ``answer_tokens + 1`` answer tokens; loss on every next token), then saves it in
    bf16. Returns the last loss."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from eagle3_target.data.tokenizer import load_tokenizer
    from eagle3_target.regen.prompts import PromptRenderer
    from regen_sglang import single_turn_chats

    torch.manual_seed(0)
    tok = load_tokenizer(str(out))
    renderer = PromptRenderer(tok)
    with tempfile.TemporaryDirectory() as tmp:
        chats = single_turn_chats(Path(tmp) / "train.jsonl", rows)
        seqs = []
        for line in chats.read_text().splitlines():
            conv = json.loads(line)["conversations"]
            user = [{"role": "user", "content": conv[0]["value"]}]
            prompt = renderer.render(user, None)
            # The whole turn as the template writes it, end-of-turn token included: a model
            # that never saw the answer end would go on past it at random.
            whole = renderer.render(user + [{"role": "assistant", "content": conv[1]["value"]}], None)
            if whole[: len(prompt)] != prompt:
                raise RuntimeError("the chat template renders the prompt differently inside the whole turn")
            seqs.append(whole[: len(prompt) + answer_tokens + 1])
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = torch.tensor(q)
        labels[i, : len(q)] = torch.tensor(q)
    mask = (labels != -100).long()
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).train()
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # Linear decay to zero: the last steps settle on the memorised path instead of
    # bouncing around it at full rate.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.4f}", flush=True)
    model.to(torch.bfloat16).save_pretrained(str(out))
    return float(loss.detach())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=32, help="tiny-trained: chats to train on")
    p.add_argument("--answer-tokens", type=int, default=64, help="tiny-trained: answer tokens kept per chat")
    p.add_argument("--steps", type=int, default=300, help="tiny-trained: optimiser steps")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists; reusing it")
        return 0
    t = time.time()
    preset, device = SHAPES[a.shape]
    if a.shape == "tiny-trained":
        import torch

        make_tiny_model(out, TRAINED)
        train_briefly(out, a.rows, a.answer_tokens, a.steps, "cuda" if torch.cuda.is_available() else "cpu")
    else:
        make_tiny_model(out, PRESETS[preset], device=device)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    print(f"wrote {a.shape} to {out}: {size:.2f} GB in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
