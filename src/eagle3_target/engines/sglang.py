"""The SGLang engine: every touch point with SGLang's private API lives in this module.

A standalone SGLang ``ModelRunner`` (a world of one: SGLang's own single-process
distributed init on a free loopback port) runs the target. Each ``LogitsProcessor`` of
the model is wrapped so that one extend forward yields, for every real token,

- ``logits`` mode: all-position full-vocab logits ``[T,V]`` (stock SGLang keeps only the
  last position) with the logit scale, soft-cap and tensor-parallel gather of the stock
  processor, plus the three aux states ``[T,3H]``;
- ``hidden`` mode: the final-norm hidden state ``[T,H]`` (no LM head) plus aux;
- ``prenorm`` mode: the last decoder layer's output *before* the final norm ``[T,H]``
  plus aux (read off the final norm's own inputs);
- ``aux`` mode: the aux states alone.

Where SGLang has the official capture switch (``enable_return_aux_hidden_states``), the
aux and hidden modes use it (packed aux and the post-norm states straight from the stock
processor) and the wrapper is armed only for what it alone gives: all-position logits.

A batch ``[B,S]`` goes in as one ragged extend of only its real tokens (as many extends
as the KV pool needs when it does not fit), and comes back scattered into ``[B,S,*]``
with zeros at the pads. The KV pools are cleared after every call.

Aux ids follow :mod:`eagle3_target.contract`: id ``k`` is the output of decoder layer
``k``. SGLang's ``set_eagle3_layers_to_capture`` takes capture indices ``c`` = the
residual stream *entering* layer ``c`` (so ``k + 1``), with per-family quirks listed in
:data:`CAPTURE_TABLE`; this module corrects the quirks it can, verifies the indices the
model set, refuses what it cannot capture correctly, and restores the caller's order.

Version coupling is adapted by feature detection (signatures and attributes), never by
version string; the version is read once, only to refuse releases outside
:data:`SUPPORTED_SGLANG` before any model is loaded. What each release changed is in
docs/sglang.md ("Capture table" and "Versions"). sglang is imported on first build,
never by ``import eagle3_target``.

``regenerate`` generates through SGLang's public offline ``sglang.Engine`` instead
(:func:`offline_engine`, :func:`offline_generate`, at the end of this module), never
through the private runner above.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import socket
from array import array
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import nn

from eagle3_target.contract import LMHead, validate_aux_layer_ids
from eagle3_target.engines.common import parse_dtype, text_config
from eagle3_target.engines.packing import plan_extends, row_spans, scatter_rows
from eagle3_target.engines.tp import TPGroup, TPWorkerError, WorkerSpec

__all__ = ["SGLangTargetRunner", "SGLangUnavailableError", "build", "sglang_dtype_str", "MODES",
           "Eagle3LogitsProcessor", "full_logits", "wrap_logits_processors",
           "CAPTURE_TABLE", "Capture", "capture_rule", "SUPPORTED_SGLANG", "check_sglang_version",
           "ANY_VERSION_ENV", "unpack_aux", "build_rank", "WORKER_BUILDER", "TPWorkerError",
           "offline_engine", "offline_generate", "offline_seed_field"]

log = logging.getLogger(__name__)

MODES = ("logits", "hidden", "prenorm", "aux", "stock")
"""What one extend returns: see the module docstring; ``stock`` is SGLang unwrapped
(last-position logits, no aux capture), kept for benchmarks."""

SUPPORTED_SGLANG = ("0.5.9", "0.5.23")
"""The releases this module was written against (inclusive): pyproject's ``sglang``
extra says the same. Validated on a GPU: 0.5.16; the others against their fakes."""

ANY_VERSION_ENV = "EAGLE3_TARGET_SGLANG_ANY_VERSION"
"""Set to 1 to try an sglang outside :data:`SUPPORTED_SGLANG` anyway (at your own risk)."""

# ServerArgs fields this engine owns: the wrapper needs them this way.
_FIXED_SERVER_ARGS = {
    "model_path", "dtype", "tp_size", "pp_size", "trust_remote_code", "skip_tokenizer_init",
    "enable_return_hidden_states", "disable_cuda_graph", "disable_radix_cache",
    "enable_return_aux_hidden_states", "return_aux_hidden_state_layer_ids", "speculative_algorithm",
}


class SGLangUnavailableError(RuntimeError):
    """The SGLang engine cannot run here: no CUDA device, or no usable sglang."""


_DTYPE_STRINGS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def sglang_dtype_str(dtype: torch.dtype | None) -> str:
    """``None`` -> ``"auto"``; float32/float16/bfloat16 -> their names; else ValueError.

    ``ServerArgs.dtype`` is compared against strings: a raw ``torch.dtype`` would
    silently match no branch.
    """
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_STRINGS:
        return _DTYPE_STRINGS[dtype]
    raise ValueError(f"unsupported SGLang dtype {dtype!r}: use None, torch.float32, "
                     f"torch.float16 or torch.bfloat16")


# --------------------------------------------------------------------------- capture table


@dataclass(frozen=True)
class Capture:
    """How one SGLang model family captures EAGLE-3 aux states (read from the wheels).

    ``index``: what ``set_eagle3_layers_to_capture(ids)`` makes of our id ``k`` (capture
    index ``c`` = the stream entering layer ``c``): ``"k+1"``, or ``"k+1 if ids[0]==1"``
    (DeepSeek's setter, which the engine overrides by writing ``layers_to_capture``).
    ``packed``: aux may come back as one ``[T,3H]`` tensor (from the release that moved
    the family to SGLang's packer) instead of a list of three ``[T,H]``.
    ``last_layer``: capture index ``N`` (the last layer's output) is honoured.
    ``resets``: a second ``set_eagle3_layers_to_capture`` replaces the first; flag-based
    families never clear their per-layer flags (the engine clears them).
    ``refuse``: why the engine will not run the family, or None.
    """

    family: str
    index: str = "k+1"
    packed: bool = False
    last_layer: bool = False
    resets: bool = True
    refuse: str | None = None


_NO_SETTER = ("SGLang has no EAGLE-3 capture for {arch} (the model defines no "
              "set_eagle3_layers_to_capture) in any release up to 0.5.23; use engine='hf'")

CAPTURE_TABLE: dict[str, Capture] = {
    # list-based, k+1, last layer not capturable (the capture is the next layer's input)
    **{a: Capture("Llama") for a in (
        "LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "Llama4ForCausalLM",
        "Llama4ForConditionalGeneration", "ApertusForCausalLM", "ExaoneMoEForCausalLM")},
    **{a: Capture("Qwen2/3") for a in (
        "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration")},
    **{a: Capture("GLM-4-MoE") for a in ("Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM")},
    "MiniMaxM2ForCausalLM": Capture("MiniMax-M2"),
    # flag-based: per-layer _is_layer_to_capture flags that are set and never cleared
    **{a: Capture("Qwen2/3-MoE", resets=False) for a in (
        "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")},
    "Qwen3NextForCausalLM": Capture("Qwen3-Next", resets=False),
    **{a: Capture("Qwen3.5", resets=False) for a in (
        "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration")},
    "BailingMoeForCausalLM": Capture("Bailing-MoE", resets=False),
    **{a: Capture("MiniMax-M3", last_layer=True, resets=False) for a in (
        "MiniMaxM3SparseForCausalLM", "MiniMaxM3SparseForConditionalGeneration")},
    # last layer capturable (the model captures index N after its loop)
    "GptOssForCausalLM": Capture("gpt-oss", last_layer=True),
    **{a: Capture("Gemma-3", last_layer=True) for a in (
        "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")},
    **{a: Capture("Gemma-4", last_layer=True) for a in (
        "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")},
    # DeepSeek's setter adds the +1 only when the first id is 1; packed from 0.5.17
    **{a: Capture("DeepSeek-V2/V3", index="k+1 if ids[0]==1", packed=True) for a in (
        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "KimiK25ForConditionalGeneration",
        "MistralLarge3ForCausalLM", "LongcatFlashForCausalLM")},
    # no capture at all
    **{a: Capture(f, refuse=_NO_SETTER.format(arch=a)) for a, f in (
        ("MixtralForCausalLM", "Mixtral"), ("Gemma2ForCausalLM", "Gemma-2"))},
}
"""SGLang architecture name -> its capture rule. docs/sglang.md renders the same table."""

_GEMMA3_FUSED = ("SGLang's Gemma-3 decoder layers return (hidden, residual) with a fused "
                 "add-norm in this release (0.5.17 and later): the tensor its EAGLE-3 capture "
                 "appends is the post-FFN branch, not the residual stream output by the layer, "
                 "and the next fused add-norm overwrites it in place on CUDA; the supervision "
                 "would be silently wrong. Use sglang 0.5.9-0.5.16 or engine='hf'")


def capture_rule(architecture: str) -> Capture | None:
    """The :class:`Capture` of an SGLang architecture name, or None when unknown."""
    return CAPTURE_TABLE.get(architecture)


def _architectures(model_path: str) -> list[str]:
    """``architectures`` of ``model_path/config.json`` ([] when absent)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return list(json.load(f).get("architectures") or [])
    except (OSError, ValueError):
        return []


# --------------------------------------------------------------------------- SGLang API


def _version_tuple(v: str) -> tuple[int, ...]:
    """``"0.5.16.post1"`` -> ``(0, 5, 16)``: the numeric release, nothing after it."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", v)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def check_sglang_version(installed: str) -> None:
    """Raises :class:`SGLangUnavailableError` when ``installed`` is outside
    :data:`SUPPORTED_SGLANG`, naming both (``$EAGLE3_TARGET_SGLANG_ANY_VERSION=1`` skips)."""
    lo, hi = SUPPORTED_SGLANG
    got = _version_tuple(installed)
    if got and _version_tuple(lo) <= got[:3] <= _version_tuple(hi):
        return
    if os.environ.get(ANY_VERSION_ENV) == "1":
        log.warning("sglang %s is outside the supported %s-%s; trying it anyway (%s=1)",
                    installed, lo, hi, ANY_VERSION_ENV)
        return
    raise SGLangUnavailableError(
        f"sglang {installed} is installed, but the SGLang engine supports sglang {lo} to {hi} "
        f"(pip install 'eagle3-target[sglang]' picks one); set {ANY_VERSION_ENV}=1 to try it "
        f"anyway, or use engine='hf'")


def _installed_version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # a source tree or a test double
        return str(getattr(importlib.import_module(package), "__version__", "?"))


def _tolerate_duplicate_config_registration() -> None:
    """transformers >= 5.13 ships configs (e.g. ``qwen3_asr``) that sglang 0.5.16 registers
    again at import, which raises ``ValueError: ... already used``. Registration with
    ``exist_ok=True`` keeps transformers' own class; nothing else changes."""
    from transformers import AutoConfig

    orig = AutoConfig.register
    if getattr(orig, "_eagle3_tolerant", False):
        return
    if "exist_ok" not in inspect.signature(orig).parameters:
        return

    def register(model_type: Any, config: Any, exist_ok: bool = False) -> Any:
        return orig(model_type, config, exist_ok=True)

    register._eagle3_tolerant = True  # type: ignore[attr-defined]
    AutoConfig.register = staticmethod(register)  # type: ignore[method-assign]


def _load_api(package: str = "sglang") -> SimpleNamespace:
    """Imports ``package`` (sglang; tests pass a fake laid out the same way) and the
    internals this module uses, after checking its version. Absent optional symbols are
    None: what a release lacks is a feature this module detects."""
    hint = "install sglang on the GPU host (validated: sglang 0.5.16), or use engine='hf'"
    if importlib.util.find_spec(package) is None:
        raise SGLangUnavailableError(f"the SGLang engine needs the sglang package, which is not "
                                     f"installed; {hint}")
    if package == "sglang":
        _tolerate_duplicate_config_registration()
    try:
        root = importlib.import_module(package)
    except ImportError as e:
        raise SGLangUnavailableError(f"the SGLang engine needs the sglang package, which failed "
                                     f"to import ({e}); {hint}") from e
    version = _installed_version(package)
    check_sglang_version(version)

    def s(spec: str, required: bool = True) -> Any:
        mod_name, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(f"{package}.{mod_name}"), name)
        except (ImportError, AttributeError) as e:
            if required:
                raise SGLangUnavailableError(
                    f"sglang {version} lacks {spec} ({e}); this engine supports sglang "
                    f"{SUPPORTED_SGLANG[0]}-{SUPPORTED_SGLANG[1]} (validated on a GPU with 0.5.16)"
                ) from e
            return None

    return SimpleNamespace(
        version=version,
        root=root,
        ServerArgs=s("srt.server_args:ServerArgs"),
        ModelConfig=s("srt.configs.model_config:ModelConfig"),
        ModelRunner=s("srt.model_executor.model_runner:ModelRunner"),
        ParallelState=s("srt.distributed.parallel_state_wrapper:ParallelState", False),  # 0.5.16-0.5.20
        publish=s("srt.runtime_context:publish", False),  # 0.5.17+
        SpawnRanks=s("srt.runtime_context:SpawnRanks", False),  # 0.5.21+
        init_parallel_runtime=s("srt.distributed.bootstrap:init_parallel_runtime", False),  # 0.5.21+
        init_layer_runtime=s("srt.distributed.bootstrap:init_layer_runtime", False),
        resolving_view=s("srt.arg_groups.overrides:resolving_view", False),  # 0.5.19+
        config_initializers=[f for f in (
            s("srt.layers.moe:initialize_moe_config", False),
            s("srt.layers.quantization.fp8_utils:initialize_fp8_gemm_config", False),
            s("srt.layers.quantization.fp4_utils:initialize_fp4_gemm_config", False),
            s("srt.layers.quantization.unquant:initialize_bf16_gemm_config", False),
        ) if f is not None],
        Req=s("srt.managers.schedule_batch:Req"),
        ScheduleBatch=s("srt.managers.schedule_batch:ScheduleBatch"),
        ForwardBatch=s("srt.model_executor.forward_batch_info:ForwardBatch"),
        CaptureHiddenMode=s("srt.model_executor.forward_batch_info:CaptureHiddenMode", False),
        SamplingParams=s("srt.sampling.sampling_params:SamplingParams"),
        SpeculativeAlgorithm=s("srt.speculative.spec_info:SpeculativeAlgorithm"),
        ChunkCache=s("srt.mem_cache.chunk_cache:ChunkCache", False),  # gone in 0.5.22
        CacheInitParams=s("srt.mem_cache.cache_init_params:CacheInitParams", False),
        LogitsProcessor=s("srt.layers.logits_processor:LogitsProcessor"),
        LogitsMetadata=s("srt.layers.logits_processor:LogitsMetadata"),
        LogitsProcessorOutput=s("srt.layers.logits_processor:LogitsProcessorOutput"),
        tp_all_gather=s("srt.distributed:tensor_model_parallel_all_gather", False),
        teardown=[f for f in (
            s("srt.distributed.parallel_state:destroy_model_parallel", False),
            s("srt.distributed.parallel_state:destroy_distributed_environment", False),
            # Process-wide slots a runner publishes once (an MoE model's expert locations,
            # the server args): a second runner in this process asserts they are empty.
            s("srt.runtime_context:reset_context", False),
        ) if f is not None],
    )


def _server_arg_fields(server_args_cls: Any) -> set[str]:
    """The field names of ``ServerArgs``: a dataclass (<= 0.5.19) or a msgspec struct."""
    fields = getattr(server_args_cls, "__struct_fields__", None)  # msgspec (0.5.20+)
    if fields is not None:
        return set(fields)
    dc = getattr(server_args_cls, "__dataclass_fields__", None)
    if dc is not None:
        return set(dc)
    return set(inspect.signature(server_args_cls).parameters)


# --------------------------------------------------------------------------- wrapper


@dataclass
class _Captured:
    """What one wrapped extend produced, packed over its T real tokens."""

    aux: torch.Tensor  # [T,3H] model dtype, in the caller's aux-id order
    logits: torch.Tensor | None = None  # [T,V]
    hidden: torch.Tensor | None = None  # [T,H], after the final norm
    prenorm: torch.Tensor | None = None  # [T,H], before the final norm


def full_logits(lp: Any, hidden: torch.Tensor, lm_head: Any, metadata: Any, api: Any) -> torch.Tensor:
    """``hidden [T,H]`` -> ``[T,V]`` logits in the LM head's dtype, the way stock
    ``LogitsProcessor._get_logits`` makes them (scale, TP gather, vocab-padding cut,
    soft-cap) minus its fp32 copy into the sampling buffer."""
    hidden, local = lp._gather_dp_attn_hidden_states(hidden, metadata)
    logits = lp._compute_lm_head(hidden, lm_head, None)
    if lp.logit_scale is not None:
        logits.mul_(lp.logit_scale)
    if lp.do_tensor_parallel_all_gather:
        if getattr(lp, "use_attn_tp_group", False):
            logits = lp._gather_attn_tp_logits(logits)
        elif hasattr(lp, "_logits_gatherer"):  # 0.5.16+
            logits = lp._logits_gatherer(logits)
        else:  # 0.5.9
            logits = api.tp_all_gather(logits)
    logits = lp._scatter_dp_attn_logits(logits, local, metadata)
    if logits.shape[-1] > lp.vocab_size:  # the LM head's rows are padded for TP
        logits = logits[:, : lp.vocab_size]
    cap = lp.final_logit_softcapping
    if cap:
        logits = (torch.tanh(logits.float() / cap) * cap).to(logits.dtype)
    return logits


def unpack_aux(aux: Any, hidden_size: int, tokens: int, order: Sequence[int]) -> torch.Tensor:
    """SGLang's aux states -> ``[T,3H]`` in ``order`` (indices into layer order).

    ``aux`` is a list of three ``[T,H]`` (most families) or one packed ``[T,3H]`` tensor
    (SGLang's packer: DeepSeek-V2/V3, Kimi, MiMo, and the official capture switch);
    both come in layer order. Anything else raises, naming what came back.
    """
    if isinstance(aux, torch.Tensor):
        if aux.dim() != 2 or aux.shape[0] != tokens or aux.shape[1] != 3 * hidden_size:
            raise RuntimeError(f"SGLang returned packed aux states of shape {tuple(aux.shape)}, "
                               f"expected [{tokens}, {3 * hidden_size}] (three layers of "
                               f"{hidden_size}): the model did not capture the layers set by "
                               f"set_aux_layers")
        parts = list(aux.split(hidden_size, dim=-1))
    else:
        n = 0 if aux is None else len(aux)
        if n != 3:
            raise RuntimeError(f"SGLang returned {n} aux hidden states, expected 3: the model "
                               f"did not capture the layers set by set_aux_layers")
        parts = list(aux)
    if list(order) == [0, 1, 2] and isinstance(aux, torch.Tensor):
        return aux
    return torch.cat([parts[i] for i in order], dim=-1)


class Eagle3LogitsProcessor(nn.Module):
    """Stands in for one SGLang ``LogitsProcessor``. Disarmed (``mode=None``) it is the
    stock processor; armed, it stores a :class:`_Captured` in ``self.result``."""

    def __init__(self, inner: nn.Module, api: Any):
        super().__init__()
        self.inner = inner
        self._api = api
        self.mode: str | None = None
        self.aux_order: list[int] = [0, 1, 2]
        self.result: _Captured | None = None
        self.prenorm: list[torch.Tensor] = []  # filled by the final norm's hook

    def forward(self, input_ids: Any, hidden_states: torch.Tensor, lm_head: Any,
                logits_metadata: Any, aux_hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self.mode is None:
            return self.inner(input_ids, hidden_states, lm_head, logits_metadata,
                              aux_hidden_states, *args, **kwargs)
        aux = unpack_aux(aux_hidden_states, hidden_states.shape[-1], hidden_states.shape[0],
                         self.aux_order)
        out = _Captured(aux=aux)
        if self.mode == "logits":
            api = self._api
            if isinstance(logits_metadata, api.ForwardBatch):
                logits_metadata = api.LogitsMetadata.from_forward_batch(logits_metadata)
            out.logits = full_logits(self.inner, hidden_states, lm_head, logits_metadata, api)
        elif self.mode == "hidden":
            out.hidden = hidden_states
        elif self.mode == "prenorm":
            if len(self.prenorm) != 1:
                raise RuntimeError(f"the final norm ran {len(self.prenorm)} times in one extend, "
                                   f"expected once: cannot read the pre-norm state")
            out.prenorm = self.prenorm[0]
        self.result = out
        return self._api.LogitsProcessorOutput(next_token_logits=None)


def wrap_logits_processors(model: nn.Module, api: Any) -> list[Eagle3LogitsProcessor]:
    """Replaces every ``LogitsProcessor`` in ``model`` by a wrapper; returns the wrappers."""
    wrappers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, api.LogitsProcessor):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            w = Eagle3LogitsProcessor(module, api)
            setattr(parent, attr, w)
            wrappers.append(w)
    if not wrappers:
        raise RuntimeError(f"{type(model).__name__} has no SGLang LogitsProcessor to wrap")
    return wrappers


class _TreeCacheStandIn(SimpleNamespace):
    """What ``ScheduleBatch`` asks of its tree cache when there is no ``ChunkCache``
    (0.5.22+): no prefix reuse, nothing to evict; the union of the methods the
    releases' own one-batch benchmark gives its stand-in."""

    def supports_swa(self) -> bool:
        return False

    def supports_mamba(self) -> bool:
        return False

    def supports_prefix_sharing(self) -> bool:
        return True

    def is_chunk_cache(self) -> bool:
        return False

    def is_tree_cache(self) -> bool:
        return True

    def evict(self, params: Any) -> None:
        pass

    def maybe_hand_to_session(self, req: Any) -> None:
        pass


# --------------------------------------------------------------------------- runner


def _decoder(model: nn.Module) -> Any:
    """The decoder module holding ``layers`` (``model.model``, or the language model's)."""
    for path in ("model", "language_model.model", "model.language_model"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and getattr(obj, "layers", None) is not None:
            return obj
    return getattr(model, "model", None)


class SGLangTargetRunner:
    """A :class:`~eagle3_target.contract.PackedHiddenRunner` over a standalone SGLang
    ModelRunner.

    Build with :func:`build` (``Eagle3TargetModel.from_pretrained(path, engine="sglang")``).
    """

    def __init__(self, model_runner: Any, api: Any, *, max_batch_tokens: int, max_batch_rows: int,
                 official_capture: bool = False, tp_size: int = 1):
        self._mr = model_runner
        self._api = api
        self.model: Any = model_runner.model
        self._arch = type(self.model).__name__
        self._rule = capture_rule(self._arch) or Capture(self._arch)
        if self._rule.refuse:
            raise SGLangUnavailableError(self._rule.refuse)
        if not hasattr(self.model, "set_eagle3_layers_to_capture"):
            raise SGLangUnavailableError(_NO_SETTER.format(arch=self._arch))
        self._inner = _decoder(self.model)
        self._layers = list(getattr(self._inner, "layers", None) or [])
        if self._rule.family == "Gemma-3" and self._layers and \
                "residual" in inspect.signature(type(self._layers[0]).forward).parameters:
            raise SGLangUnavailableError(_GEMMA3_FUSED)
        self._wrappers = wrap_logits_processors(self.model, api)
        self._official = official_capture
        cfg = self.model.config
        self._config = text_config(cfg)
        self.vocab_size = int(self._config.vocab_size)
        self._num_layers = int(self._config.num_hidden_layers)
        # the page SGLang chose: from 0.5.20 server_args.page_size stays the raw input (None)
        self._page = int(getattr(model_runner, "page_size", None)
                         or getattr(model_runner.server_args, "page_size", None) or 1)
        if self._page > 1 and not getattr(model_runner.server_args, "page_size", None):
            log.warning("SGLang chose page size %d itself; the KV pool was sized for page 1, so "
                        "rows are page-rounded within it (pass page_size=%d to size it for that)",
                        self._page, self._page)
        pool_tokens = int(model_runner.max_total_num_tokens) - self._page  # one page of slack
        pool_rows = int(getattr(model_runner.req_to_token_pool, "size", max_batch_rows))
        self.max_batch_tokens = min(max_batch_tokens, pool_tokens)
        self.max_batch_rows = max(1, min(max_batch_rows, pool_rows))
        self._context_len = int(getattr(model_runner.model_config, "context_len", 1 << 62))
        self._aux_ids: list[int] | None = None
        self._sampling = None
        self.extends = 0  # extend forwards run so far (tests and benchmarks read it)
        self._group: TPGroup | None = None  # ranks 1..N-1 when this is rank 0 of a TP world
        self._tp_size = tp_size
        self._broken: str | None = None

    @property
    def tp_size(self) -> int:
        """Ranks of this runner's tensor-parallel world (1: no tensor parallelism)."""
        return self._tp_size

    @property
    def tp_worker_pids(self) -> list[int]:
        """The worker processes running ranks 1.. (empty for a world of one)."""
        return [] if self._group is None else self._group.pids

    def attach_group(self, group: TPGroup) -> None:
        """Makes this runner rank 0 of a tensor-parallel world whose other ranks ``group``
        runs: every forward, capture setting and weight gather is mirrored to them."""
        if group.world != self._tp_size:
            raise ValueError(f"a group of {group.world} ranks for a runner built for {self._tp_size}")
        self._group = group

    # -- TargetRunner ---------------------------------------------------------------
    def set_aux_layers(self, ids: Sequence[int]) -> None:
        """Aux id ``k`` = output of decoder layer ``k``. The last layer (``N-1``) only for
        families that capture it (:data:`CAPTURE_TABLE`)."""
        self._check_open()
        ids = validate_aux_layer_ids(ids, self._num_layers)
        n, rule = self._num_layers, self._rule
        if max(ids) == n - 1 and not rule.last_layer:
            raise ValueError(f"aux id {n - 1} (the last decoder layer) cannot be captured by "
                             f"SGLang's {rule.family} ({self._arch}), which captures the input of "
                             f"layer k+1; use ids 0..{n - 2}, or engine='hf'")
        ordered = sorted(ids)
        want = [k + 1 for k in ordered]
        self._clear_capture_flags()  # flag-based families never clear them themselves
        self.model.set_eagle3_layers_to_capture(ordered)
        got = self._capture_indices()
        if got is not None and got != want and rule.index != "k+1" and \
                isinstance(getattr(self._inner, "layers_to_capture", None), list):
            # DeepSeek's setter adds the +1 only when ids[0] == 1; its decoder's indices
            # mean what Llama's do, so set them directly
            self._inner.layers_to_capture = list(want)
            got = self._capture_indices()
        if got is not None and got != want:
            raise RuntimeError(f"{self._arch}.set_eagle3_layers_to_capture({ordered}) set capture "
                               f"indices {got}, expected {want} (input of layer k+1); this model "
                               f"breaks the aux-id convention: use engine='hf'")
        order = [ordered.index(k) for k in ids]  # SGLang returns captures in layer order
        for w in self._wrappers:
            w.aux_order = order
        self._aux_ids = ids
        if self._group is not None:
            self._on_all_ranks(lambda g: g.set_aux_layers(ids), lambda: None, lambda g: None)

    def forward_eagle3(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids [B,S] int, attention_mask [B,S] 0/1`` -> ``(logits [B,S,V],
        aux [B,S,3H])`` in the model dtype on the GPU, unshifted, zeros at pads."""
        out = self.forward_packed(input_ids, attention_mask, "logits")
        return out["logits"], out["aux"]

    def forward_eagle3_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Skips the LM head: ``(final_hidden [B,S,H], aux [B,S,3H])``, unshifted."""
        out = self.forward_packed(input_ids, attention_mask, "hidden")
        return out["hidden"], out["aux"]

    def forward_eagle3_hidden_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(final_hidden [T,H], aux [T,3H])`` of the real tokens, row after row, unshifted:
        the extend's own ragged outputs, with no padded copy and no device sync."""
        out = self.forward_packed(input_ids, attention_mask, "hidden", packed=True)
        return out["hidden"], out["aux"]

    def forward_eagle3_prenorm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(final_prenorm [B,S,H], aux [B,S,3H])``: the last decoder layer's output
        before the final norm (transformers' ``hidden_states[N]`` before its norm)."""
        out = self.forward_packed(input_ids, attention_mask, "prenorm")
        return out["prenorm"], out["aux"]

    def input_embedding_weight(self) -> torch.Tensor:
        """``[V,H]``, without the rows SGLang pads the vocabulary with (gathered over the
        ranks' vocabulary shards under tensor parallelism)."""
        self._check_open()
        return self._full_rows("embeddings")

    def _local_rows(self, what: str) -> torch.Tensor | None:
        if what == "embeddings":
            return self.model.get_input_embeddings().weight.detach()
        head = getattr(self.model, "lm_head", None)
        if what == "lm_head":
            return getattr(head, "weight", None)
        bias = getattr(head, "bias", None)  # "lm_head_bias"
        return None if bias is None else bias.detach()

    def gather_weight(self, what: str) -> torch.Tensor | None:
        """This rank's shard of ``what`` (``embeddings``, ``lm_head``, ``lm_head_bias``)
        gathered over the tensor-parallel ranks (a collective every rank joins; the
        workers run it when rank 0 asks), vocabulary padding cut off."""
        local = self._local_rows(what)
        if local is None:
            return None
        local = local.detach()
        if self._tp_size > 1:
            if self._api.tp_all_gather is None:
                raise SGLangUnavailableError(f"sglang {self._api.version} has no "
                                             f"tensor_model_parallel_all_gather to gather {what} with")
            local = self._api.tp_all_gather(local.contiguous(), 0)
        return local[: self.vocab_size]

    def _full_rows(self, what: str) -> torch.Tensor | None:
        if self._group is None:
            return self.gather_weight(what)
        return self._on_all_ranks(lambda g: g.start_call(b"G", {"what": what}),
                                  lambda: self.gather_weight(what), lambda g: g.finish_call())

    def lm_head(self) -> LMHead:
        self._check_open()
        weight = self._local_rows("lm_head")
        if weight is None or not weight.dtype.is_floating_point:
            raise NotImplementedError(f"{type(self.model).__name__}'s LM head is not a plain "
                                      f"floating-point weight (quantized?): use logits mode")
        lp = self._wrappers[0].inner
        bias = self._full_rows("lm_head_bias")
        cap = getattr(lp, "final_logit_softcapping", None)
        return LMHead(
            weight=self._full_rows("lm_head"),
            bias=bias,
            scale=float(lp.logit_scale) if lp.logit_scale is not None else 1.0,
            softcap=float(cap) if cap else None,
        )

    def close(self) -> None:
        """Frees the model, its pools and SGLang's process group, and stops the other
        tensor-parallel ranks. Idempotent."""
        if self._group is not None:
            self._group.close()
            self._group = None
        mr, self._mr = self._mr, None
        if mr is None:
            return
        self.model = None
        self._wrappers = []
        self._layers = []
        try:
            self._clear_pools(mr)
        except Exception as e:  # a broken CUDA context must not keep the runner alive
            log.warning("clearing SGLang pools on close failed: %s", e)
        del mr
        for fn in self._api.teardown:  # lets a later build in this process start clean
            try:
                fn()
            except Exception as e:  # teardown is best effort; the memory is freed below
                log.warning("SGLang teardown %s failed: %s", getattr(fn, "__name__", fn), e)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- internals ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        self._check_open()
        return next(self.model.parameters()).device

    def _check_open(self) -> None:
        if self._mr is None:
            raise RuntimeError("this SGLang target runner is closed")
        if self._broken is not None:
            raise TPWorkerError(f"this tensor-parallel runner stopped: {self._broken}; close it "
                                f"and build a new one")

    @staticmethod
    def _clear_pools(mr: Any) -> None:
        mr.req_to_token_pool.clear()
        mr.token_to_kv_pool_allocator.clear()

    def _flagged(self) -> list[int]:
        return [i for i, layer in enumerate(self._layers) if getattr(layer, "_is_layer_to_capture", False)]

    def _clear_capture_flags(self) -> None:
        for layer in self._layers:
            if getattr(layer, "_is_layer_to_capture", False):
                layer._is_layer_to_capture = False

    def _capture_indices(self) -> list[int] | None:
        """The capture indices the model will use (sorted), or None when unreadable.
        Flag-based families capture what their layer flags say (index N, the last
        layer's output, lives in the list only)."""
        listed = getattr(self._inner, "layers_to_capture", None)
        flagged = self._flagged()
        if flagged:
            extra = [c for c in (listed or []) if c >= len(self._layers)]
            return sorted(set(flagged) | set(extra))
        return None if listed is None else sorted(listed)

    @torch.no_grad()
    def forward_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       mode: str, packed: bool = False) -> dict[str, torch.Tensor]:
        """One forward in ``mode`` (see :data:`MODES`): packs the real tokens, runs as few
        extends as the pool allows, scatters every output back to ``[B,S,*]``; with
        ``packed``, returns the outputs ``[T,*]`` as the extends made them.

        Why ``packed``: the scatter's boolean index waits for the GPU, so each padded call
        ends with the GPU idle until the next is prepared; packed, the next call's host
        work runs while this one's kernels do."""
        self._check_open()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self._aux_ids is None and mode != "stock":
            raise RuntimeError("set_aux_layers() must be called before forward")
        starts, lengths = row_spans(input_ids, attention_mask)
        ids = input_ids.detach().to("cpu", torch.int64)
        real = ids[attention_mask.detach().to("cpu", torch.bool)]
        lo, hi = int(real.min()), int(real.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"input_ids out of range [0, {self.vocab_size}): min {lo}, max {hi}")
        if max(lengths) > self._context_len:
            raise ValueError(f"a row has {max(lengths)} real tokens, more than the model's "
                             f"context length {self._context_len}")
        rows = [ids[b, s:s + n].tolist() for b, (s, n) in enumerate(zip(starts, lengths))]
        groups = plan_extends(lengths, self.max_batch_tokens, self.max_batch_rows, self._page)
        parts = [self._extend([rows[i] for i in g], mode) for g in groups]
        if mode == "stock":
            return {}
        mask = None if packed else attention_mask.to(self.device, torch.bool)
        out = {}
        for key in ("logits", "hidden", "prenorm", "aux"):
            got = [getattr(p, key) for p in parts]
            if got[0] is not None:
                flat = got[0] if len(got) == 1 else torch.cat(got, dim=0)
                out[key] = flat if mask is None else scatter_rows(flat, mask)
        return out

    def _prenorm_hook(self) -> Any:
        """A forward hook on the final norm that keeps the stream it normalises: the
        updated residual of a fused ``norm(hidden, residual)`` call, else its input."""
        norm = getattr(self._inner, "norm", None)
        if not isinstance(norm, nn.Module):
            raise NotImplementedError(f"{self._arch} has no final norm module at model.norm: "
                                      f"prenorm mode is unavailable; use engine='hf'")
        sink = self._wrappers[0].prenorm

        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
            if residual is not None and isinstance(out, tuple):
                sink.append(out[1].clone())  # x + residual, the kernel's own rounding
            else:
                x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
                sink.append(x.clone() if residual is None else (x + residual))

        return norm.register_forward_hook(hook, with_kwargs=True)

    def _extend(self, rows: list[list[int]], mode: str) -> _Captured | None:
        """One ragged extend over ``rows`` (token-id lists), on every tensor-parallel rank;
        packed outputs (rank 0's)."""
        if self._group is None:
            return self._extend_local(rows, mode)
        return self._on_all_ranks(lambda g: g.start_forward(mode, rows),
                                  lambda: self._extend_local(rows, mode),
                                  lambda g: g.finish_forward(rows))

    def _on_all_ranks(self, start: Any, local: Any, finish: Any) -> Any:
        """``start(group)``, rank 0's ``local()`` while the workers run theirs, then
        ``finish(group)``. A failure on any rank stops the world (the collectives' state is
        unknown after it): the workers are stopped and every later call says why."""
        g = self._group
        assert g is not None
        try:
            start(g)
            out = local()
            finish(g)
            return out
        except BaseException as e:
            why = g.failure or f"rank 0 raised {type(e).__name__}: {e}"
            self._broken = why
            g.close(timeout=10)
            self._group = None
            if isinstance(e, KeyboardInterrupt):
                raise
            raise TPWorkerError(why) from e

    def forward_rows(self, rows: list[list[int]], mode: str) -> None:
        """A worker rank's part of a forward rank 0 runs (the outputs stay with rank 0)."""
        self._check_open()
        self._extend(rows, mode)

    def _extend_local(self, rows: list[list[int]], mode: str) -> _Captured | None:
        api, mr = self._api, self._mr
        if self._sampling is None:
            self._sampling = api.SamplingParams(temperature=0, max_new_tokens=1)
        # stock = no capture at all: the flag, the decoder's layer list and the layer flags
        # (with a list set, SGLang's decoder returns (hidden, aux) whatever the flag says)
        inner = self._inner
        capture = getattr(self.model, "capture_aux_hidden_states", None)
        layers = getattr(inner, "layers_to_capture", None)
        flagged = self._flagged()
        # the official switch gives aux and the post-norm states itself
        official = self._official and mode in ("aux", "hidden")
        armed = None if mode == "stock" or official else mode
        for w in self._wrappers:
            w.mode = armed
            w.result = None
            w.prenorm.clear()
        if mode == "stock":
            if capture is not None:
                self.model.capture_aux_hidden_states = False
            if layers is not None:
                inner.layers_to_capture = []
            self._clear_capture_flags()
        hook = self._prenorm_hook() if mode == "prenorm" else None
        self._clear_pools(mr)
        try:
            fb = self._forward_batch(rows, full_capture=official)
            ret = mr.forward(fb)
            self.extends += 1
            stock_out = getattr(ret, "logits_output", None)
            if stock_out is None and isinstance(ret, tuple):  # 0.5.9: (output, can_run_graph)
                stock_out = ret[0]
        finally:
            if hook is not None:
                hook.remove()
            self._clear_pools(mr)
            if capture is not None:
                self.model.capture_aux_hidden_states = capture
            if layers is not None:
                inner.layers_to_capture = layers
            for i in flagged:
                self._layers[i]._is_layer_to_capture = True
            results = [w.result for w in self._wrappers if w.result is not None]
            for w in self._wrappers:
                w.mode, w.result = None, None
                w.prenorm.clear()
        if mode == "stock":
            return None
        if official:
            return self._from_official(stock_out, sum(len(r) for r in rows), mode)
        if len(results) != 1:
            raise RuntimeError(f"{len(results)} logits processors ran in one extend, expected 1")
        return results[0]

    def _from_official(self, out: Any, tokens: int, mode: str) -> _Captured:
        """The official switch's output: ``hidden_states`` = packed aux ``[T,3H]`` in layer
        order, ``last_hidden_states`` = the post-norm states ``[T,H]``."""
        h = int(self._config.hidden_size)
        aux = unpack_aux(getattr(out, "hidden_states", None), h, tokens, self._wrappers[0].aux_order)
        got = _Captured(aux=aux)
        if mode == "hidden":
            last = getattr(out, "last_hidden_states", None)
            if last is None or tuple(last.shape) != (tokens, h):
                raise RuntimeError(f"SGLang's official aux capture returned last_hidden_states "
                                   f"{None if last is None else tuple(last.shape)}, expected "
                                   f"[{tokens}, {h}]")
            got.hidden = last
        return got

    def _make_req(self, i: int, toks: list[int]) -> Any:
        """One ``Req`` for a fresh prefill of ``toks``, the way the installed release's
        one-batch benchmark makes it."""
        api = self._api
        if hasattr(api.Req, "set_extend_range"):  # 0.5.16-0.5.21
            req = api.Req(rid=str(i), origin_input_text="", origin_input_ids=array("q", toks),
                          sampling_params=self._sampling)
            req.full_untruncated_fill_ids = req.origin_input_ids
            req.logprob_start_len = -1
            req.set_extend_range(len(req.prefix_indices), len(toks))
            return req
        if hasattr(api.Req, "get_fill_ids"):  # 0.5.22+: extend_end / prefix_len
            req = api.Req(rid=str(i), origin_input_text="", origin_input_ids=array("q", toks),
                          sampling_params=self._sampling)
            req.full_untruncated_fill_ids = req.origin_input_ids
            req.logprob_start_len = -1
            req.prefix_len = 0
            req.extend_end = len(toks)
            return req
        req = api.Req(rid=str(i), origin_input_text="", origin_input_ids=list(toks),
                      sampling_params=self._sampling)  # 0.5.9-0.5.12: fill_ids
        req.fill_ids = req.origin_input_ids
        req.logprob_start_len = -1
        n = len(req.fill_ids) - len(req.prefix_indices)
        if hasattr(req, "set_extend_input_len"):
            req.set_extend_input_len(n)
        else:
            req.extend_input_len = n
        return req

    def _forward_batch(self, rows: list[list[int]], full_capture: bool = False) -> Any:
        """SGLang's scheduler path for one prefill batch, without the scheduler."""
        api, mr = self._api, self._mr
        reqs = [self._make_req(i, toks) for i, toks in enumerate(rows)]
        pools = dict(req_to_token_pool=mr.req_to_token_pool,
                     token_to_kv_pool_allocator=mr.token_to_kv_pool_allocator)
        if api.ChunkCache is not None and api.CacheInitParams is not None:
            cache = api.ChunkCache(api.CacheInitParams(disable=True, page_size=self._page, **pools))
        elif api.ChunkCache is not None:
            cache = api.ChunkCache(page_size=self._page, **pools)
        else:  # 0.5.22+: no ChunkCache
            cache = _TreeCacheStandIn(page_size=self._page, device=mr.device, **pools)
        batch = api.ScheduleBatch.init_new(
            reqs=reqs, tree_cache=cache, model_config=mr.model_config, enable_overlap=False,
            spec_algorithm=api.SpeculativeAlgorithm.NONE, **pools)
        batch.prepare_for_extend()
        if getattr(batch, "input_ids", None) is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            # 0.5.16+ leaves the ids on pinned CPU memory for its overlap scheduler to move
            batch.input_ids = batch.prefill_input_ids_cpu.to(mr.device, non_blocking=True)
            batch.prefill_input_ids_cpu = None
        params = inspect.signature(api.ForwardBatch.init_new).parameters
        if "return_hidden_states_before_norm" not in params:  # 0.5.9-0.5.12
            return api.ForwardBatch.init_new(batch.get_model_worker_batch(), mr)
        kw: dict[str, Any] = dict(return_hidden_states_before_norm=False)
        if full_capture and api.CaptureHiddenMode is not None and "capture_hidden_mode" in params:
            kw["capture_hidden_mode"] = api.CaptureHiddenMode.FULL
        return api.ForwardBatch.init_new(batch, mr, **kw)


# --------------------------------------------------------------------------- build


def _cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _set_device(gpu_id: int) -> None:
    torch.cuda.set_device(gpu_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_index(device: str | torch.device | None, gpu_id: int) -> int:
    if device is None:
        return int(gpu_id)
    d = torch.device(device)
    if d.type != "cuda":
        raise ValueError(f"the SGLang engine runs on CUDA only, got device={str(device)!r}; "
                         f"use engine='hf' on the CPU")
    return int(gpu_id) if d.index is None else d.index


def _parallel_state(api: Any, view: Any, gpu_id: int, rank: int = 0, world: int = 1) -> Any:
    """Rank ``rank`` of a tensor-parallel world of ``world`` (no data, pipeline or expert
    parallelism; attention is tensor-parallel as the scheduler sets it without DP
    attention): ``ParallelState.trivial`` where it exists (0.5.16+), else the sizes the
    scheduler would derive (the fields differ by release)."""
    tp = dict(tp_rank=rank, tp_size=world, attn_tp_rank=rank, attn_tp_size=world)
    trivial = getattr(api.ParallelState, "trivial", None)
    if trivial is not None:
        return trivial(gpu_id=gpu_id, **tp)
    values = dict(
        **tp, pp_rank=0, pp_size=1, dp_rank=None, dp_size=getattr(view, "dp_size", 1),
        attn_cp_rank=0, attn_cp_size=getattr(view, "attn_cp_size", 1),
        attn_dcp_rank=0, attn_dcp_size=1, attn_dp_rank=0, attn_dp_size=1, moe_ep_rank=0,
        moe_ep_size=getattr(view, "ep_size", 1), moe_dp_rank=None, moe_dp_size=getattr(view, "moe_dp_size", 1),
        dcp_size=getattr(view, "dcp_size", 1), gpu_id=gpu_id,
    )
    fields = inspect.signature(api.ParallelState).parameters
    return api.ParallelState(**{k: v for k, v in values.items() if k in fields})


def _publish(api: Any, server_args: Any, gpu_id: int, rank: int = 0) -> None:
    """Resolve and publish the config where the release has a process-wide context
    (0.5.17+; its ``ModelRunner`` checks it from 0.5.19)."""
    if hasattr(server_args, "resolve_once"):  # 0.5.19+: resolution left to the process entry
        server_args.resolve_once()
    if api.publish is None:
        return
    kw: dict[str, Any] = {"role": "scheduler"}
    if api.SpawnRanks is not None and "ranks" in inspect.signature(api.publish).parameters:
        kw["ranks"] = api.SpawnRanks(world_rank=rank, gpu_id=gpu_id)  # 0.5.21+
    api.publish(server_args, **kw)


def _initialise_configs(api: Any, server_args: Any) -> None:
    """SGLang's process-global MoE/fp8/fp4/bf16 GEMM configs: from ``server_args`` up to
    0.5.18-0.5.19, from the published config after."""
    for init in api.config_initializers:
        if inspect.signature(init).parameters:
            init(server_args)
        else:
            init()


def _make_model_runner(api: Any, server_args: Any, view: Any, model_config: Any, gpu_id: int,
                       port: int, rank: int = 0, world: int = 1) -> Any:
    if api.init_parallel_runtime is not None:  # 0.5.21+: groups come up before the runner
        api.init_parallel_runtime(server_args=server_args, device="cuda", dist_port=port)
        api.init_layer_runtime(model_config=model_config)
    params = inspect.signature(api.ModelRunner.__init__).parameters
    kw: dict[str, Any] = dict(model_config=model_config, mem_fraction_static=view.mem_fraction_static,
                              gpu_id=gpu_id, nccl_port=port, server_args=server_args)
    if "ps" in params:  # 0.5.16-0.5.20: one ParallelState instead of rank arguments
        kw["ps"] = _parallel_state(api, view, gpu_id, rank, world)
    elif "tp_rank" in params:  # 0.5.9-0.5.12
        kw.update(tp_rank=rank, tp_size=world, pp_rank=0, pp_size=1, moe_ep_rank=0, moe_ep_size=1)
    mr = api.ModelRunner(**{k: v for k, v in kw.items() if k in params})
    # 0.5.16+ builds pools, attention backends and the (eager) graph runner in separate steps
    if getattr(mr, "req_to_token_pool", None) is None and hasattr(mr, "alloc_memory_pool"):
        mr.alloc_memory_pool()
    if getattr(mr, "attn_backend", None) is None and hasattr(mr, "init_attention_backends"):
        mr.init_attention_backends()
    if getattr(mr, "eager_runner", None) is None and hasattr(mr, "init_cuda_graphs"):
        mr.init_cuda_graphs()
    return mr


def build(
    model_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tp_size: int = 1,
    trust_remote_code: bool = False,
    gpu_id: int = 0,
    max_batch_tokens: int = 16384,
    max_batch_rows: int = 64,
    **sglang_kwargs: Any,
) -> SGLangTargetRunner:
    """Loads ``model_path`` (a local directory) into a standalone SGLang ModelRunner.

    ``max_batch_tokens``/``max_batch_rows`` size the KV pool (``max_total_tokens``,
    ``max_running_requests``) for the largest extend; a bigger batch runs as several
    extends. ``sglang_kwargs`` go to ``ServerArgs`` (``attention_backend``, ``page_size``,
    ``mem_fraction_static``, ``max_total_tokens``, ...). ``tp_size`` > 1 shards the model
    over GPUs ``gpu_id .. gpu_id + tp_size - 1``: this process is rank 0 and returns the
    tensors; ranks 1.. run in worker processes (:mod:`eagle3_target.engines.tp`) that SGLang's
    own distributed init joins on a loopback port.
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
    gpu_id = _gpu_index(device, gpu_id)
    dtype_str = sglang_dtype_str(parse_dtype(dtype))
    for name, v in (("max_batch_tokens", max_batch_tokens), ("max_batch_rows", max_batch_rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    fixed = sorted(set(sglang_kwargs) & _FIXED_SERVER_ARGS)
    if fixed:
        raise ValueError(f"ServerArgs {fixed} are set by the SGLang engine and cannot be passed")
    if not os.path.isdir(model_path):
        raise ValueError(f"model_path {model_path!r} is not a local directory (nothing is downloaded)")
    for arch in _architectures(model_path):  # refuse what cannot be captured before loading
        rule = capture_rule(arch)
        if rule is not None and rule.refuse:
            raise SGLangUnavailableError(rule.refuse)
    n_gpus = _cuda_device_count()
    if n_gpus == 0:
        raise SGLangUnavailableError("the SGLang engine needs a CUDA GPU and torch.cuda.is_available() "
                                     "is False; use engine='hf' here")
    if gpu_id + tp_size > n_gpus:
        raise ValueError(f"gpu_id {gpu_id} with tp_size {tp_size} needs GPUs {gpu_id}..{gpu_id + tp_size - 1} "
                         f"but only {n_gpus} CUDA device(s) are visible")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process; the SGLang "
                           "engine brings up its own world: build it in a separate process")
    rank_kwargs: dict[str, Any] = dict(
        model_path=model_path, dtype=dtype_str, gpu_id=gpu_id, dist_port=_free_port(),
        trust_remote_code=trust_remote_code, max_batch_tokens=max_batch_tokens,
        max_batch_rows=max_batch_rows, sglang_kwargs=sglang_kwargs)
    if tp_size == 1:
        return build_rank(rank=0, world=1, **rank_kwargs)
    # The distributed init is a rendezvous of every rank: start the workers first, then
    # build rank 0 here while they build theirs.
    group = TPGroup(tp_size, WorkerSpec(WORKER_BUILDER, rank_kwargs), on_failure=_abort_collectives)
    try:
        runner = build_rank(rank=0, world=tp_size, **rank_kwargs)
        group.wait_ready()
        runner.attach_group(group)
        return runner
    except BaseException as e:
        failure = group.failure
        group.close(timeout=10)
        if failure is not None and not isinstance(e, TPWorkerError):
            raise TPWorkerError(failure) from e
        raise


def build_rank(*, rank: int, world: int, model_path: str, dtype: str, gpu_id: int, dist_port: int,
               trust_remote_code: bool, max_batch_tokens: int, max_batch_rows: int,
               sglang_kwargs: dict[str, Any]) -> SGLangTargetRunner:
    """One rank of the runner :func:`build` makes (``world`` == 1: the whole runner), on
    GPU ``gpu_id + rank``; the tensor-parallel workers call it with their rank."""
    gpu = gpu_id + rank
    api = _load_api()
    known = _server_arg_fields(api.ServerArgs)
    unknown = sorted(set(sglang_kwargs) - known)
    if unknown:
        raise ValueError(f"unknown SGLang ServerArgs field(s) {unknown} for sglang {api.version}")
    page = int(sglang_kwargs.get("page_size") or 1)
    args = dict(
        max_total_tokens=max_batch_tokens + max_batch_rows * page + page,  # page rounding per row
        max_running_requests=max_batch_rows,
    )
    args.update(sglang_kwargs)
    args.update(model_path=model_path, dtype=dtype, tp_size=world, trust_remote_code=trust_remote_code,
                skip_tokenizer_init=True, enable_return_hidden_states=True,
                disable_cuda_graph=True, disable_radix_cache=True)
    official = "enable_return_aux_hidden_states" in known  # 0.5.23: SGLang's own capture switch
    if official:
        args.update(enable_return_aux_hidden_states=True, speculative_algorithm="EAGLE3")
    _set_device(gpu)
    server_args = api.ServerArgs(**args)
    _publish(api, server_args, gpu, rank)
    _initialise_configs(api, server_args)
    view = api.resolving_view(server_args) if api.resolving_view is not None else server_args
    model_config = api.ModelConfig.from_server_args(server_args)
    try:
        mr = _make_model_runner(api, server_args, view, model_config, gpu, dist_port, rank, world)
        return SGLangTargetRunner(mr, api, max_batch_tokens=max_batch_tokens, max_batch_rows=max_batch_rows,
                                  official_capture=official, tp_size=world)
    except BaseException:
        for fn in api.teardown:
            try:
                fn()
            except Exception as e:  # the first error is the one to report
                log.warning("SGLang teardown after a failed build: %s", e)
        raise


WORKER_BUILDER = "eagle3_target.engines.sglang:build_rank"
"""What each tensor-parallel worker builds its rank with (``module:function``); the CPU
tests point it at a builder of the fake SGLang."""


def _abort_collectives(why: str) -> None:
    """Called when a tensor-parallel worker dies: aborts this process's communicators,
    so a collective rank 0 waits in returns with an error instead of hanging."""
    abort = getattr(torch.distributed.distributed_c10d, "_abort_process_group", None)
    if abort is not None and torch.distributed.is_initialized():
        log.error("%s: aborting the collectives", why)
        abort()


# --------------------------------------------------------------------------- offline Engine


def offline_engine(model_path: str, *, dtype: str | None = None, tp_size: int = 1, **server_args: Any) -> Any:
    """SGLang's public offline ``sglang.Engine`` on ``model_path`` (token ids in, token
    ids out: ``skip_tokenizer_init``, since ``regenerate`` renders and decodes with its
    own tokenizer), for generation only; the capture engine above never touches it.
    ``server_args`` go to the Engine (``mem_fraction_static``, ``attention_backend``...).
    Raises :class:`SGLangUnavailableError` without a GPU or a supported sglang."""
    if _cuda_device_count() == 0:
        raise SGLangUnavailableError("the SGLang engine needs a CUDA GPU; use --engine hf on the CPU")
    if importlib.util.find_spec("sglang") is None:
        raise SGLangUnavailableError("--engine sglang needs the sglang package (pip install "
                                     "'eagle3-target[sglang]'), or use --engine hf")
    check_sglang_version(_installed_version("sglang"))
    _tolerate_duplicate_config_registration()
    import sglang

    return _start_engine(sglang.Engine, model_path=model_path, dtype=dtype or "auto", tp_size=tp_size,
                         skip_tokenizer_init=True, **server_args)


def _start_engine(engine_cls: Any, **kwargs: Any) -> Any:
    """``engine_cls(**kwargs)``; a scheduler that dies while starting becomes an error
    that names the likeliest cause. The Engine starts its scheduler in a fresh interpreter,
    where the in-process tolerance of duplicate config names above does not reach: there a
    transformers newer than the one sglang pins stops the import."""
    try:
        return engine_cls(**kwargs)
    except RuntimeError as e:
        if "scheduler died" not in str(e):
            raise
        pin = _required_version("sglang", "transformers")
        have = _installed_version("transformers")
        hint = (f"; sglang {_installed_version('sglang')} asks for transformers {pin} and this "
                f"environment has {have}: if its log above says a name 'is already used by a "
                f"Transformers config', install transformers{pin}") if pin else ""
        raise SGLangUnavailableError(f"SGLang's Engine could not start its scheduler ({e}){hint}") from None


def _required_version(package: str, dependency: str) -> str | None:
    """The version specifier ``package``'s metadata gives ``dependency`` (``==4.57.1``), or None."""
    from importlib import metadata

    try:
        reqs = metadata.requires(package) or []
    except metadata.PackageNotFoundError:
        return None
    for r in reqs:
        m = re.match(rf"{re.escape(dependency)}\s*([=<>!~][^;]*)", r.split(";")[0].strip())
        if m:
            return m.group(1).strip().replace(" ", "")
    return None


def offline_seed_field() -> str | None:
    """The per-request seed field of SGLang's sampling parameters (``sampling_seed``
    where the installed release has it), or None."""
    try:
        from sglang.srt.sampling.sampling_params import SamplingParams
    except ImportError:
        return None
    return "sampling_seed" if "sampling_seed" in inspect.signature(SamplingParams).parameters else None


def offline_generate(engine: Any, input_ids: Sequence[Sequence[int]],
                     sampling_params: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``engine.generate`` on a batch of token-id prompts, one sampling dict each: one
    result per prompt, in order (``output_ids``, ``meta_info.finish_reason``)."""
    out = engine.generate(input_ids=[list(p) for p in input_ids], sampling_params=list(sampling_params))
    return out if isinstance(out, list) else [out]
