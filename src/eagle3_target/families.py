"""Tiny random checkpoints of the architectures users train drafts for, built from configs.

``make_family_model(name, DIR)`` writes a transformers checkpoint (config + safetensors,
fixed seed, nothing downloaded) of one family in :data:`FAMILIES` at a tiny shape
(:class:`Shape`): for the CPU tests of the transformers engine and the GPU validation of
the SGLang engine (scripts/gpu/validate_sglang.py). ``head_scale`` multiplies the LM head
so next-token distributions are peaked and argmax agreement means something. Each
family keeps what makes it itself: tied embeddings (Qwen3), experts (Qwen3-MoE, Mixtral,
gpt-oss, DeepSeek-V3), soft-caps and sliding windows (Gemma-2/3), attention sinks
(gpt-oss), MLA (DeepSeek-V3), fused projections (Phi-3).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["Shape", "FAMILIES", "family_config", "make_family_model", "is_router"]


@dataclass(frozen=True)
class Shape:
    """The shape every family is built at; ``hidden // heads`` is the head dim (64 on a
    GPU: SGLang's kernels are built for 64/128)."""

    hidden: int = 64
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 512
    max_position: int = 2048


def _common(s: Shape) -> dict[str, Any]:
    return dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                max_position_embeddings=s.max_position, tie_word_embeddings=False)


def _llama(s: Shape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_common(s))


def _qwen3(s: Shape) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**{**_common(s), "tie_word_embeddings": True, "head_dim": s.hidden // s.heads})


def _qwen3_moe(s: Shape) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_common(s), head_dim=s.hidden // s.heads, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=s.intermediate // 2, decoder_sparse_step=1, norm_topk_prob=True)


def _mixtral(s: Shape) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**_common(s), num_local_experts=4, num_experts_per_tok=2)


def _gemma2(s: Shape) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(**{**_common(s), "tie_word_embeddings": True}, head_dim=s.hidden // s.heads,
                        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=8,
                        query_pre_attn_scalar=s.hidden // s.heads)


def _gemma3(s: Shape) -> Any:
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(**{**_common(s), "tie_word_embeddings": True}, head_dim=s.hidden // s.heads,
                           sliding_window=8, query_pre_attn_scalar=s.hidden // s.heads,
                           final_logit_softcapping=None)
    cfg.architectures = ["Gemma3ForCausalLM"]
    return cfg


def _gpt_oss(s: Shape) -> Any:
    from transformers import GptOssConfig

    # swiglu_limit: released checkpoints carry it (transformers hard-codes 7.0; SGLang reads it).
    return GptOssConfig(**_common(s), head_dim=s.hidden // s.heads, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=8, swiglu_limit=7.0,
                        rope_parameters=dict(rope_type="yarn", factor=1.0, beta_fast=32.0, beta_slow=1.0,
                                             rope_theta=150000.0, original_max_position_embeddings=s.max_position,
                                             truncate=False))


def _deepseek_v3(s: Shape) -> Any:
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**{**_common(s), "num_key_value_heads": s.heads}, moe_intermediate_size=s.intermediate // 2,
                            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
                            topk_group=1, first_k_dense_replace=1,
                            # DeepSeek-V3's own MLA dimensions: SGLang's MLA kernels take these
                            # (a 32/16/16 toy crashed them with an illegal memory access).
                            q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64,
                            qk_nope_head_dim=128, v_head_dim=128,
                            # What released checkpoints' config.json carry and SGLang reads.
                            moe_layer_freq=1, topk_method="noaux_tc", scoring_func="sigmoid",
                            num_nextn_predict_layers=0)


def _phi3(s: Shape) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**_common(s), pad_token_id=0, bos_token_id=None, eos_token_id=None)


FAMILIES: dict[str, Callable[[Shape], Any]] = {
    "llama": _llama, "qwen3": _qwen3, "qwen3-moe": _qwen3_moe, "mixtral": _mixtral, "gemma2": _gemma2,
    "gemma3": _gemma3, "gpt-oss": _gpt_oss, "deepseek-v3": _deepseek_v3, "phi3": _phi3,
}
"""Family name -> config builder. Every one runs on the transformers engine on a CPU."""


def family_config(name: str, shape: Shape = Shape()) -> Any:
    """The transformers config of family ``name`` at ``shape``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name](shape)


def is_router(param_name: str) -> bool:
    """Whether a parameter is an MoE router's weight (``...mlp.gate.weight`` in Qwen3-MoE and
    DeepSeek-V3, ``...block_sparse_moe.gate.weight`` in Mixtral, ``...mlp.router.weight``
    in gpt-oss; not a dense MLP's ``gate_proj``)."""
    return param_name.endswith((".gate.weight", ".router.weight"))


def make_family_model(name: str, out_dir: str | Path, *, shape: Shape = Shape(), seed: int = 0,
                      head_scale: float = 1.0, router_scale: float = 1.0, dtype: str = "float32") -> Path:
    """Writes family ``name`` with random weights (``seed``) to ``out_dir`` (created; must
    be empty or absent) in ``dtype`` (``float32`` or ``bfloat16``). ``head_scale``
    multiplies the LM head (for a tied head, the embedding it shares); ``router_scale``
    multiplies MoE routers (:func:`is_router`): random routers sit near ties, and bf16
    rounding then flips the experts of some tokens in any engine, which swamps the
    comparison of two engines' errors."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    cfg = family_config(name, shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        if head_scale != 1.0:
            model.get_output_embeddings().weight.mul_(head_scale)
        if router_scale != 1.0:
            for pname, p in model.named_parameters():
                if is_router(pname):
                    p.mul_(router_scale)
        for pname, p in model.named_parameters():  # norms off 1 so a skipped or doubled norm shows
            if "norm" in pname and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    meta = dict(family=name, shape=asdict(shape), seed=seed, head_scale=head_scale, dtype=dtype,
                **({"router_scale": router_scale} if router_scale != 1.0 else {}))
    (out / "eagle3_family.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out
