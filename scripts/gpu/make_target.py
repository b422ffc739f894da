#!/usr/bin/env python3
"""Writes a bf16 target model for the SGLang GPU validation and benchmark.

  make_target.py tiny-peaked DIR   8-layer Llama (H=256, head_dim 64) with a scaled LM head,
                                   so next-token distributions are peaked and argmax means
                                   something; the locally trained tokenizer comes with it.
  make_target.py llama3-8b DIR     Llama-3.1-8B shape (32 layers, H=4096, GQA 32/8,
                                   FFN 14336, V=128256), random weights built on the GPU,
                                   RMSNorm weights 1 + 0.1*N(0,1) so norm bugs show.

Both are saved in bf16: every engine (SGLang bf16, HF bf16, the fp32 HF reference
upcast from them) then runs the same weights.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def tiny_peaked(out: Path) -> None:
    from transformers import LlamaForCausalLM

    from eagle3_target.data.tiny import TinyModelConfig, make_tiny_model

    cfg = TinyModelConfig(layers=8, hidden=256, heads=4, kv_heads=2, intermediate=512,
                          vocab=2048, seed=0, head_scale=20.0)
    with tempfile.TemporaryDirectory() as tmp:
        src = make_tiny_model(Path(tmp) / "fp32", cfg)
        model = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(str(out))
        for f in src.iterdir():
            if "token" in f.name or f.name.endswith(".jinja") or f.name == "eagle3_tiny.json":
                shutil.copy(f, out / f.name)


def llama3_8b(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=128000, eos_token_id=128001,
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p, dtype=torch.float32))
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out), max_shard_size="5GB")


SHAPES = {"tiny-peaked": tiny_peaked, "llama3-8b": llama3_8b}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists; reusing it")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    SHAPES[a.shape](out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    print(f"wrote {a.shape} to {out}: {size:.2f} GB in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
