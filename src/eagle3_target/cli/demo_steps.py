"""The demo's steps: the main job end to end on the built-in tiny model.

What ``make demo`` runs (``eagle3-target demo``). Each step is a small function that
prints one section, so later capabilities add a step, not a new command; the server
step is :mod:`.demo_server`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["STEPS", "CONVERSATIONS", "DemoContext", "run_demo", "step_in_process", "step_draft_vocab",
           "step_server", "step_offline_dump"]

CONVERSATIONS = [
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "What does a draft model do in speculative decoding?"},
     {"role": "assistant", "content": "It guesses the next few tokens cheaply; the target "
                                      "checks them in one pass and keeps the ones it agrees with."}],
    [{"role": "user", "content": "Why capture three hidden layers?"},
     {"role": "assistant", "content": "Low, middle and high layers give the draft head both "
                                      "surface and semantic features of the target."}],
    [{"role": "user", "content": "Write a function that adds two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
     {"role": "user", "content": "And one that multiplies them?"},
     {"role": "assistant", "content": "def mul(a, b):\n    return a * b"}],
    [{"role": "user", "content": "Is the GPU faster than the CPU for this?"},
     {"role": "assistant", "content": "Yes, by orders of magnitude for large models."}],
]


class DemoContext:
    """What steps share: the loaded target, the tokenizer, the tokenized batch."""

    def __init__(self, model_dir: str, workdir: Path):
        from eagle3_target import Eagle3TargetModel
        from eagle3_target.data.tokenizer import load_tokenizer
        from eagle3_target.engines.packing import lengths_mask, right_pad

        self.model_dir = model_dir
        self.workdir = workdir
        self.tokenizer = load_tokenizer(model_dir)
        self.target = Eagle3TargetModel.from_pretrained(model_dir, engine="hf", device="cpu",
                                                        dtype=torch.float32)
        rows, masks = [], []
        for conv in CONVERSATIONS:
            r = self.tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
            rows.append(r["input_ids"])
            masks.append(r["assistant_masks"])
        self.input_ids = right_pad(rows, self.tokenizer.pad_token_id)
        self.attention_mask = lengths_mask([len(r) for r in rows])
        self.loss_mask = right_pad(masks, 0)
        self.results: dict[str, Any] = {}


def step_in_process(ctx: DemoContext) -> None:
    from eagle3_target.cli.demo_server import TIMED_RUNS

    t = ctx.target
    print(f"target: {ctx.model_dir}")
    print(f"  {t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}, "
          f"aux layers {t.aux_layer_ids}")
    n_tok = int(ctx.attention_mask.sum())
    t0 = time.perf_counter()
    t.generate_batch(ctx.input_ids, ctx.attention_mask, ctx.loss_mask)  # cold: kernels, allocator
    cold = time.perf_counter() - t0
    times = []
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        batch = t.generate_batch(ctx.input_ids, ctx.attention_mask, ctx.loss_mask)
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    ctx.results["batch"] = batch
    print(f"in-process supervision for {ctx.input_ids.shape[0]} chats, {n_tok} tokens, "
          f"{int(ctx.loss_mask.sum())} supervised (assistant) tokens:")
    for name in ("aux_hidden_states", "logits", "input_ids", "attention_mask", "loss_mask"):
        v = getattr(batch, name)
        print(f"  {name:<18} {str(list(v.shape)):<16} {str(v.dtype).replace('torch.', '')}")
    # The EAGLE-3 shift, checked on the spot: logits at i predict token i+1.
    assert torch.equal(batch.input_ids[:, :-1], ctx.input_ids[:, 1:])
    print(f"  {n_tok / dt:,.0f} tokens/s on {t.runner.device} (fp32; median of {TIMED_RUNS} forwards after "
          f"a cold first one, which took {cold * 1e3:.0f} ms: {n_tok / cold:,.0f} tokens/s)")


def step_draft_vocab(ctx: DemoContext) -> None:
    from eagle3_target import build_vocab_mapping, compute_target_distribution

    supervised = [ctx.input_ids[i][ctx.loss_mask[i].bool()] for i in range(ctx.input_ids.shape[0])]
    specials = [ctx.tokenizer.convert_tokens_to_ids(x) for x in ("<|im_end|>", "<|endoftext|>")]
    vd = min(256, ctx.target.vocab_size)
    mapping = build_vocab_mapping(supervised, vd, specials, target_vocab_size=ctx.target.vocab_size)
    batch = ctx.results["batch"]
    probs, pmask = compute_target_distribution(batch.logits, mapping.selected_token_ids,
                                               mapping.selected_token_mask, batch.loss_mask)
    path = ctx.workdir / "vocab.safetensors"
    mapping.save(path)
    print(f"draft vocabulary: {vd} of {ctx.target.vocab_size} tokens (mapping {mapping.mapping_id[:12]})")
    print(f"  target_probs {list(probs.shape)} fp32, position_mask {list(pmask.shape)}: "
          f"{int(pmask.sum())} supervised positions whose target argmax is in the draft vocab")


def step_server(ctx: DemoContext) -> None:
    from eagle3_target.cli.demo_server import step_server as run

    run(ctx)


def step_offline_dump(ctx: DemoContext) -> None:
    from eagle3_target.data.rows import sample_data_path
    from eagle3_target.dump import DumpConfig, Eagle3Dataset, run_dump, verify_dump

    data = ctx.workdir / "chats.jsonl"
    data.write_text("\n".join(sample_data_path().read_text().splitlines()[:64]) + "\n")
    out = ctx.workdir / "dump"
    cfg = DumpConfig(out=str(out), data=[str(data)], model=ctx.model_dir, mode="hidden",
                     shard_size_mb=2, progress=False)
    summary = run_dump(cfg, source=ctx.target, tokenizer=ctx.tokenizer, log=lambda s: None)
    print("\n".join(summary.lines()))
    report = verify_dump(out)
    print(report.lines[-1])
    ds = Eagle3Dataset(out, lm_head=True)
    x = ds[0]
    ids = ds.raw(0)["input_ids"][None]
    ref = ctx.target.generate_batch(ids, torch.ones_like(ids), ds.raw(0)["loss_mask"][None].long())
    diff = float((x["logits"] - ref.logits[0]).abs().max())
    print(f"  read back sample 0 ({ids.shape[1]} tokens): logits rebuilt from the stored hidden state "
          f"differ from generate_batch by at most {diff:.1e}")


STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("in-process supervision", step_in_process),
    ("draft vocabulary", step_draft_vocab),
    ("server and remote client", step_server),
    ("offline dump (resumable shards, verify, read back)", step_offline_dump),
]


def run_demo(args: argparse.Namespace) -> int:
    from eagle3_target.engines.common import quiet_transformers
    from eagle3_target.tiny import CACHE_ENV, cache_dir, resolve_model, tiny_model_built

    quiet_transformers()
    if args.model is None and not tiny_model_built():
        print(f"building the built-in tiny model into {cache_dir()} (first use only; "
              f"${CACHE_ENV} moves it)")
    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="eagle3-demo-") as tmp:
        ctx = DemoContext(model_dir, Path(tmp))
        try:
            for i, (title, fn) in enumerate(STEPS, 1):
                print(f"\n== {i}. {title}")
                fn(ctx)
        finally:
            ctx.target.close()
    print("\ndemo finished: all steps ran")
    return 0
