#!/usr/bin/env python3
"""Writes a bf16 target model for the SGLang GPU validation and benchmark.

  make_target.py tiny-peaked DIR   8-layer Llama (H=256, head_dim 64) with a scaled LM head,
                                   so next-token distributions are peaked and argmax means
                                   something; the locally trained tokenizer comes with it.
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

from eagle3_target.tiny import PRESETS, make_tiny_model

# GPU names -> (preset, where the weights are built)
SHAPES = {"tiny-peaked": ("tiny-peaked-256", None), "llama3-8b": ("llama3-8b", "cuda")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists; reusing it")
        return 0
    t = time.time()
    preset, device = SHAPES[a.shape]
    make_tiny_model(out, PRESETS[preset], device=device)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e9
    print(f"wrote {a.shape} to {out}: {size:.2f} GB in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
