"""The transformers engine: a :class:`~eagle3_target.contract.TargetRunner` over
``AutoModelForCausalLM``, on the CPU or a GPU.

Aux states are captured with forward hooks on exactly three decoder layers, installed
for one forward and removed after it (``output_hidden_states=True`` would keep N+1 full
``[B,S,H]`` tensors alive). Rows are right-padded and masked with ``attention_mask``;
causal attention means the pads never reach a real position.
"""

from __future__ import annotations

import gc
from typing import Any, Sequence

import torch
from torch import nn

from eagle3_target.contract import LMHead, validate_aux_layer_ids
from eagle3_target.engines.common import parse_dtype, resolve_device, text_config

__all__ = ["HFTargetRunner", "build", "find_decoder_layers", "default_attn_implementation",
           "EAGER_ATTENTION"]

# Where causal LMs keep their decoder layers, most common first.
_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Mistral, Gemma, Phi-3
    "model.language_model.layers",  # multimodal wrappers (Gemma-3, Llama-4)
    "language_model.model.layers",
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon
    "gpt_neox.layers",
    "layers",
)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers in order; ValueError naming what was tried otherwise."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
        if isinstance(layers, nn.ModuleDict) and len(layers) > 0:
            return [layers[str(i)] for i in range(len(layers))]
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)}"
    )


class HFTargetRunner:
    """Runs a transformers causal LM and captures three aux layers.

    Build with :func:`build` (or ``Eagle3TargetModel.from_pretrained(path, engine="hf")``),
    or wrap an already loaded model: ``HFTargetRunner(model)``.
    """

    def __init__(self, model: nn.Module):
        self.model: Any = model.eval()
        self._layers = find_decoder_layers(model)
        self._aux_ids: list[int] | None = None
        self._closed = False

    # -- TargetRunner ---------------------------------------------------------------
    def set_aux_layers(self, ids: Sequence[int]) -> None:
        self._aux_ids = validate_aux_layer_ids(ids, len(self._layers))

    def forward_eagle3(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids [B,S] int64, attention_mask [B,S]`` ->
        ``(logits [B,S,V], aux [B,S,3H])`` in the model dtype, unshifted."""
        out, aux = self._run(self.model, input_ids, attention_mask)
        return out.logits, aux

    def forward_eagle3_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Skips the LM head: ``(final_hidden [B,S,H], aux [B,S,3H])``, unshifted."""
        out, aux = self._run(self._decoder(), input_ids, attention_mask)
        return out.last_hidden_state, aux

    def forward_eagle3_prenorm(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(final_prenorm [B,S,H], aux [B,S,3H])``: the last decoder layer's output,
        before the final norm (what transformers' ``hidden_states[N]`` is not: that one
        is normed), unshifted."""
        _, aux, pre = self._run(self._decoder(), input_ids, attention_mask, prenorm=True)
        return pre, aux

    def input_embedding_weight(self) -> torch.Tensor:
        self._check_open()
        return self.model.get_input_embeddings().weight.detach()

    def lm_head(self) -> LMHead:
        self._check_open()
        head = self.model.get_output_embeddings()
        cfg = text_config(self.model.config)
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere multiplies
        granite = getattr(cfg, "logits_scaling", None)  # Granite divides
        if granite:
            scale = scale / float(granite)
        softcap = getattr(cfg, "final_logit_softcapping", None)
        bias = getattr(head, "bias", None)
        return LMHead(
            weight=head.weight.detach(),
            bias=None if bias is None else bias.detach(),
            scale=scale,
            softcap=float(softcap) if softcap else None,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        on_cuda = any(p.is_cuda for p in self.model.parameters())
        self.model = None
        self._layers = []
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    # -- internals ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this HF target runner is closed")

    @property
    def device(self) -> torch.device:
        self._check_open()
        return next(self.model.parameters()).device

    def _decoder(self) -> nn.Module:
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        return base if base is not None else getattr(self.model, self.model.base_model_prefix)

    def _run(
        self, module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        prenorm: bool = False,
    ) -> Any:
        """One forward of ``module`` with hooks on the aux layers (and on the last layer
        when ``prenorm``): ``(output, aux [B,S,3H])``, or ``(output, aux, prenorm [B,S,H])``."""
        self._check_open()
        if self._aux_ids is None:
            raise RuntimeError("set_aux_layers() must be called before forward")
        captured: dict[int, torch.Tensor] = {}

        def hook(layer_id: int):
            def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
                captured[layer_id] = out[0] if isinstance(out, tuple) else out

            return fn

        last = len(self._layers) - 1
        wanted = sorted(set(self._aux_ids) | ({last} if prenorm else set()))
        handles = [self._layers[i].register_forward_hook(hook(i)) for i in wanted]
        dev = self.device
        try:
            with torch.inference_mode():
                out = module(
                    input_ids=input_ids.to(dev, torch.int64),
                    attention_mask=attention_mask.to(dev, torch.int64),
                    use_cache=False,
                )
        finally:
            for h in handles:
                h.remove()
        if sorted(captured) != wanted:
            raise RuntimeError(f"captured {sorted(captured)} but expected layers {wanted}")
        aux = torch.cat([captured[i] for i in self._aux_ids], dim=-1)
        return (out, aux, captured[last]) if prenorm else (out, aux)


# model_type -> attention implementation when the caller names none: these
# architectures either reject sdpa at load or compute something else with it
# (Gemma-2's soft-capped attention scores and gpt-oss's attention sinks exist only in
# the eager kernel here); everything else takes sdpa.
EAGER_ATTENTION = ("gemma2", "gpt_oss")


def default_attn_implementation(model_path: str, trust_remote_code: bool = False) -> str:
    """``"eager"`` for the :data:`EAGER_ATTENTION` families, else ``"sdpa"``."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    types = {getattr(cfg, "model_type", None), getattr(text_config(cfg), "model_type", None)}
    return "eager" if types & set(EAGER_ATTENTION) else "sdpa"


def build(
    model_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    tp_size: int = 1,
) -> HFTargetRunner:
    """Loads ``model_path`` (local directory; nothing is downloaded). One device:
    ``tp_size`` above 1 is refused (the SGLang engine shards a model over GPUs).

    ``device`` defaults to CUDA when present; ``dtype`` to bf16 on CUDA, fp32 on CPU;
    ``attn_implementation`` to one the architecture supports
    (:func:`default_attn_implementation`; ``--engine-arg attn_implementation=...``
    overrides it).
    """
    from transformers import AutoModelForCausalLM

    if tp_size != 1:
        raise ValueError(f"tp_size={tp_size}: the transformers engine runs a model on one device; "
                         f"tensor parallelism is the SGLang engine's (--engine sglang --tp-size N)")
    if attn_implementation is None:
        attn_implementation = default_attn_implementation(model_path, trust_remote_code)

    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=torch_dtype,
            local_files_only=True,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except ImportError as e:  # flash_attention_2 and friends need a package of their own
        raise ValueError(f"attn_implementation={attn_implementation!r} cannot load here: {e} "
                         f"(install that package, or use --engine-arg attn_implementation=sdpa or "
                         f"eager)") from None
    model.to(device)
    model.requires_grad_(False)
    return HFTargetRunner(model)
