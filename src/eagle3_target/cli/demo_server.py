"""The server step of ``eagle3-target demo``: start ``eagle3-target serve`` on the tiny
model with a fresh random token, fetch supervision through :class:`RemoteTarget` in
every mode, compare each with the in-process result, print one table, stop the server.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import torch

__all__ = ["step_server", "TIMED_RUNS"]

TIMED_RUNS = 5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def step_server(ctx: Any) -> None:
    from eagle3_target import VocabMapping, build_vocab_mapping, compute_target_distribution
    from eagle3_target.client import RemoteTarget
    from eagle3_target.server.process import ServerProcess

    inputs = (ctx.input_ids, ctx.attention_mask, ctx.loss_mask)
    ref = ctx.results.get("batch") or ctx.target.generate_batch(*inputs)
    vocab_file = ctx.workdir / "vocab.safetensors"
    mapping = (VocabMapping.load(vocab_file) if vocab_file.exists()
               else build_vocab_mapping(torch.arange(ctx.target.vocab_size), 256))
    ref_probs, ref_pmask = compute_target_distribution(
        ref.logits, mapping.selected_token_ids, mapping.selected_token_mask, ref.loss_mask)
    tokens = int(ctx.attention_mask.sum())

    t0 = time.perf_counter()
    for _ in range(TIMED_RUNS):
        ctx.target.generate_batch(*inputs)
    inproc_tps = tokens * TIMED_RUNS / (time.perf_counter() - t0)

    token = secrets.token_urlsafe(24)
    srv = ServerProcess(["--model", ctx.model_dir, "--device", "cpu", "--dtype", "float32"],
                        token=token)
    srv.start()
    print(f"server: {srv.url} (pid {srv.pid}), auth on with a fresh random token")
    rows: list[tuple[str, str, float, float, float]] = []
    try:
        for mode, dtype in (("logits", "auto"), ("logits", "bfloat16"), ("draft", "auto"),
                            ("hidden", "auto"), ("hidden", "bfloat16"), ("topk", "auto")):
            with RemoteTarget(srv.url, token=token, mode=mode, dtype=dtype, topk=8) as rt:
                if mode == "draft":
                    rt.set_vocab_mapping(mapping)
                call = rt.generate_topk if mode == "topk" else rt.generate_batch
                if mode == "hidden":
                    rt.lm_head()  # fetched once per client, not per batch
                call(*inputs)  # warm-up
                received = rt.stats["bytes_received"]
                t0 = time.perf_counter()
                for _ in range(TIMED_RUNS):
                    out = call(*inputs)
                dt = time.perf_counter() - t0
                per_tok = (rt.stats["bytes_received"] - received) / TIMED_RUNS / tokens
            if mode == "topk":
                values = ref.logits[:, :-1].topk(8, dim=-1).values
                diff = _max_diff(out.topk_values[:, :-1], values)
            elif mode == "draft":
                diff = _max_diff(out.target_probs, ref_probs)
                assert torch.equal(out.position_mask, ref_pmask)
            else:
                diff = _max_diff(out.logits, ref.logits)
            diff = max(diff, _max_diff(out.aux_hidden_states, ref.aux_hidden_states))
            wire = "model (fp32)" if dtype == "auto" else dtype
            label = mode + (" (k=8)" if mode == "topk" else "")
            rows.append((label, wire, per_tok, tokens * TIMED_RUNS / dt, diff))
    finally:
        code = srv.stop()
    print(f"{'mode':<12} {'wire dtype':<13} {'bytes/token':>12} {'tokens/s':>10} "
          f"{'max |diff| vs in-process':>25}")
    print(f"{'in-process':<12} {'-':<13} {'-':>12} {inproc_tps:>10,.0f} {'-':>25}")
    for label, wire, per_tok, tps, diff in rows:
        print(f"{label:<12} {wire:<13} {per_tok:>12,.0f} {tps:>10,.0f} {diff:>25.2e}")
    logits_b = next(r[2] for r in rows if r[0] == "logits" and r[1] == "bfloat16")
    hidden_b = next(r[2] for r in rows if r[0] == "hidden" and r[1] == "bfloat16")
    print(f"  bytes/token counts response bytes per real token (padding included); hidden/logits "
          f"in bf16 = 1/{logits_b / hidden_b:.1f} here (vocab {ctx.target.vocab_size}, "
          f"hidden {ctx.target.hidden_size}; 1/{(2 * 128256 + 6 * 4096) / (8 * 4096):.1f} "
          f"at the Llama-3-8B shape)")
    print(f"  hidden rows rebuild logits on the client from /v1/lm_head; draft and logits rows "
          f"are computed on the server")
    print(f"server stopped (SIGTERM, exit code {code})")
    if code != 0:
        raise RuntimeError(f"the server exited with code {code}:\n{srv.output()[-2000:]}")
