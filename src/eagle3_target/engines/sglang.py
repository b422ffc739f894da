"""The SGLang engine: every touch point with SGLang's private API lives in this module.

A standalone SGLang ``ModelRunner`` (a world of one: SGLang's own single-process
distributed init on a free loopback port) runs the target. Each ``LogitsProcessor`` of
the model is wrapped so that one extend forward yields, for every real token,

- ``logits`` mode: all-position full-vocab logits ``[T,V]`` (stock SGLang keeps only the
  last position) with the logit scale, soft-cap and tensor-parallel gather of the stock
  processor, plus the three aux states ``[T,3H]``;
- ``hidden`` mode: the final-norm hidden state ``[T,H]`` (no LM head) plus aux;
- ``aux`` mode: the aux states alone.

A batch ``[B,S]`` goes in as one ragged extend of only its real tokens (as many extends
as the KV pool needs when it does not fit), and comes back scattered into ``[B,S,*]``
with zeros at the pads. The KV pools are cleared after every call.

Aux ids follow :mod:`eagle3_target.contract`: id ``k`` is the output of decoder layer
``k``. SGLang's ``set_eagle3_layers_to_capture(ids)`` captures the residual stream
*entering* layer ``k + 1`` (the same tensor) and returns the captures in layer order;
this module checks the mapping SGLang made and restores the caller's order.

Version coupling (adapted by feature detection, never by version string):
``ModelRunner`` takes a ``ParallelState`` (``ps=``, 0.5.12+) or rank arguments (0.5.9);
``Req`` has ``set_extend_range`` (0.5.16) or ``fill_ids`` fields (0.5.9);
``ForwardBatch.init_new`` takes the ``ScheduleBatch`` (0.5.16) or a model-worker batch
(0.5.9); the vocab all-gather is ``_logits_gatherer`` (0.5.16) or
``tensor_model_parallel_all_gather`` (0.5.9). Validated on a GPU: 0.5.16 only (see
docs/sglang.md). sglang is imported on first build, never by ``import eagle3_target``.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
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

__all__ = ["SGLangTargetRunner", "SGLangUnavailableError", "build", "sglang_dtype_str", "MODES",
           "Eagle3LogitsProcessor", "full_logits", "wrap_logits_processors"]

log = logging.getLogger(__name__)

MODES = ("logits", "hidden", "aux", "stock")
"""What one extend returns: see the module docstring; ``stock`` is SGLang unwrapped
(last-position logits, no aux capture), kept for benchmarks."""

# ServerArgs fields this engine owns: the wrapper needs them this way.
_FIXED_SERVER_ARGS = {
    "model_path", "dtype", "tp_size", "pp_size", "trust_remote_code", "skip_tokenizer_init",
    "enable_return_hidden_states", "disable_cuda_graph", "disable_radix_cache",
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


# --------------------------------------------------------------------------- SGLang API


def _symbol(spec: str, required: bool = True) -> Any:
    """``"pkg.mod:Name"`` -> the object; None for a missing optional one."""
    mod_name, _, name = spec.partition(":")
    try:
        mod = __import__(mod_name, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError) as e:
        if required:
            import sglang

            raise SGLangUnavailableError(
                f"sglang {getattr(sglang, '__version__', '?')} lacks {spec} ({e}); this engine "
                f"supports sglang 0.5.9-0.5.16 (validated on a GPU with 0.5.16)"
            ) from e
        return None


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


def _load_api() -> SimpleNamespace:
    """Imports sglang and the internals this module uses; tests replace this function."""
    import importlib.util

    hint = "install sglang on the GPU host (validated: sglang 0.5.16), or use engine='hf'"
    if importlib.util.find_spec("sglang") is None:
        raise SGLangUnavailableError(f"the SGLang engine needs the sglang package, which is not "
                                     f"installed; {hint}")
    _tolerate_duplicate_config_registration()
    try:
        import sglang
    except ImportError as e:
        raise SGLangUnavailableError(f"the SGLang engine needs the sglang package, which failed "
                                     f"to import ({e}); {hint}") from e
    s = _symbol
    return SimpleNamespace(
        version=getattr(sglang, "__version__", "?"),
        ServerArgs=s("sglang.srt.server_args:ServerArgs"),
        ModelConfig=s("sglang.srt.configs.model_config:ModelConfig"),
        ModelRunner=s("sglang.srt.model_executor.model_runner:ModelRunner"),
        ParallelState=s("sglang.srt.distributed.parallel_state_wrapper:ParallelState", False),
        config_initializers=[f for f in (
            s("sglang.srt.layers.moe:initialize_moe_config", False),
            s("sglang.srt.layers.quantization.fp8_utils:initialize_fp8_gemm_config", False),
            s("sglang.srt.layers.quantization.fp4_utils:initialize_fp4_gemm_config", False),
        ) if f is not None],
        Req=s("sglang.srt.managers.schedule_batch:Req"),
        ScheduleBatch=s("sglang.srt.managers.schedule_batch:ScheduleBatch"),
        ForwardBatch=s("sglang.srt.model_executor.forward_batch_info:ForwardBatch"),
        SamplingParams=s("sglang.srt.sampling.sampling_params:SamplingParams"),
        SpeculativeAlgorithm=s("sglang.srt.speculative.spec_info:SpeculativeAlgorithm"),
        ChunkCache=s("sglang.srt.mem_cache.chunk_cache:ChunkCache"),
        CacheInitParams=s("sglang.srt.mem_cache.cache_init_params:CacheInitParams", False),
        LogitsProcessor=s("sglang.srt.layers.logits_processor:LogitsProcessor"),
        LogitsMetadata=s("sglang.srt.layers.logits_processor:LogitsMetadata"),
        LogitsProcessorOutput=s("sglang.srt.layers.logits_processor:LogitsProcessorOutput"),
        tp_all_gather=s("sglang.srt.distributed:tensor_model_parallel_all_gather", False),
        teardown=[f for f in (
            s("sglang.srt.distributed.parallel_state:destroy_model_parallel", False),
            s("sglang.srt.distributed.parallel_state:destroy_distributed_environment", False),
        ) if f is not None],
    )


# --------------------------------------------------------------------------- wrapper


@dataclass
class _Captured:
    """What one wrapped extend produced, packed over its T real tokens."""

    aux: torch.Tensor  # [T,3H] model dtype, in the caller's aux-id order
    logits: torch.Tensor | None = None  # [T,V]
    hidden: torch.Tensor | None = None  # [T,H], after the final norm


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
        elif hasattr(lp, "_logits_gatherer"):  # 0.5.16
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

    def forward(self, input_ids: Any, hidden_states: torch.Tensor, lm_head: Any,
                logits_metadata: Any, aux_hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self.mode is None:
            return self.inner(input_ids, hidden_states, lm_head, logits_metadata,
                              aux_hidden_states, *args, **kwargs)
        n = 0 if aux_hidden_states is None else len(aux_hidden_states)
        if n != 3:
            raise RuntimeError(f"SGLang returned {n} aux hidden states, expected 3: the model "
                               f"did not capture the layers set by set_aux_layers")
        aux = torch.cat([aux_hidden_states[i] for i in self.aux_order], dim=-1)
        out = _Captured(aux=aux)
        if self.mode == "logits":
            api = self._api
            if isinstance(logits_metadata, api.ForwardBatch):
                logits_metadata = api.LogitsMetadata.from_forward_batch(logits_metadata)
            out.logits = full_logits(self.inner, hidden_states, lm_head, logits_metadata, api)
        elif self.mode == "hidden":
            out.hidden = hidden_states
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


# --------------------------------------------------------------------------- runner


class SGLangTargetRunner:
    """A :class:`~eagle3_target.contract.HiddenRunner` over a standalone SGLang ModelRunner.

    Build with :func:`build` (``Eagle3TargetModel.from_pretrained(path, engine="sglang")``).
    """

    def __init__(self, model_runner: Any, api: Any, *, max_batch_tokens: int, max_batch_rows: int):
        self._mr = model_runner
        self._api = api
        self.model: Any = model_runner.model
        self._wrappers = wrap_logits_processors(self.model, api)
        cfg = self.model.config
        self._config = text_config(cfg)
        self.vocab_size = int(self._config.vocab_size)
        self._num_layers = int(self._config.num_hidden_layers)
        self._page = int(getattr(model_runner.server_args, "page_size", 1) or 1)
        pool_tokens = int(model_runner.max_total_num_tokens) - self._page  # one page of slack
        pool_rows = int(getattr(model_runner.req_to_token_pool, "size", max_batch_rows))
        self.max_batch_tokens = min(max_batch_tokens, pool_tokens)
        self.max_batch_rows = max(1, min(max_batch_rows, pool_rows))
        self._context_len = int(getattr(model_runner.model_config, "context_len", 1 << 62))
        self._aux_ids: list[int] | None = None
        self._sampling = None
        self.extends = 0  # extend forwards run so far (tests and benchmarks read it)

    # -- TargetRunner ---------------------------------------------------------------
    def set_aux_layers(self, ids: Sequence[int]) -> None:
        """Aux id ``k`` = output of decoder layer ``k``; ids ``0..N-2`` (SGLang captures
        the input of layer ``k+1``, and the last layer has no next one)."""
        self._check_open()
        ids = validate_aux_layer_ids(ids, self._num_layers)
        if max(ids) == self._num_layers - 1:
            raise ValueError(f"aux id {self._num_layers - 1} (the last decoder layer) cannot be "
                             f"captured by SGLang, which captures the input of layer k+1; use ids "
                             f"0..{self._num_layers - 2}")
        ordered = sorted(ids)
        self.model.set_eagle3_layers_to_capture(ordered)
        inner = getattr(self.model, "model", None)
        got = getattr(inner, "layers_to_capture", None)
        if got is not None and list(got) != [k + 1 for k in ordered]:
            raise RuntimeError(f"{type(self.model).__name__}.set_eagle3_layers_to_capture({ordered}) "
                               f"set capture indices {list(got)}, expected {[k + 1 for k in ordered]} "
                               f"(input of layer k+1); this model breaks the aux-id convention")
        order = [ordered.index(k) for k in ids]  # SGLang returns captures in layer order
        for w in self._wrappers:
            w.aux_order = order
        self._aux_ids = ids

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

    def input_embedding_weight(self) -> torch.Tensor:
        """``[V,H]``, without the rows SGLang pads the vocabulary with."""
        self._check_open()
        return self.model.get_input_embeddings().weight.detach()[: self.vocab_size]

    def lm_head(self) -> LMHead:
        self._check_open()
        head = getattr(self.model, "lm_head", None)
        weight = getattr(head, "weight", None)
        if weight is None or not weight.dtype.is_floating_point:
            raise NotImplementedError(f"{type(self.model).__name__}'s LM head is not a plain "
                                      f"floating-point weight (quantized?): use logits mode")
        lp = self._wrappers[0].inner
        bias = getattr(head, "bias", None)
        cap = getattr(lp, "final_logit_softcapping", None)
        return LMHead(
            weight=weight.detach()[: self.vocab_size],
            bias=None if bias is None else bias.detach()[: self.vocab_size],
            scale=float(lp.logit_scale) if lp.logit_scale is not None else 1.0,
            softcap=float(cap) if cap else None,
        )

    def close(self) -> None:
        """Frees the model, its pools and SGLang's process group. Idempotent."""
        mr, self._mr = self._mr, None
        if mr is None:
            return
        self.model = None
        self._wrappers = []
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

    @staticmethod
    def _clear_pools(mr: Any) -> None:
        mr.req_to_token_pool.clear()
        mr.token_to_kv_pool_allocator.clear()

    @torch.no_grad()
    def forward_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       mode: str) -> dict[str, torch.Tensor]:
        """One forward in ``mode`` (see :data:`MODES`): packs the real tokens, runs as few
        extends as the pool allows, scatters every output back to ``[B,S,*]``."""
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
        mask = attention_mask.to(self.device, torch.bool)
        out = {}
        for key in ("logits", "hidden", "aux"):
            got = [getattr(p, key) for p in parts]
            if got[0] is not None:
                packed = got[0] if len(got) == 1 else torch.cat(got, dim=0)
                out[key] = scatter_rows(packed, mask)
        return out

    def _extend(self, rows: list[list[int]], mode: str) -> _Captured | None:
        """One ragged extend over ``rows`` (token-id lists); packed outputs."""
        api, mr = self._api, self._mr
        if self._sampling is None:
            self._sampling = api.SamplingParams(temperature=0, max_new_tokens=1)
        # stock = no capture at all: the flag and the decoder's layer list (with a list
        # set, SGLang's decoder returns (hidden, aux) whatever the flag says)
        inner = getattr(self.model, "model", None)
        capture = getattr(self.model, "capture_aux_hidden_states", None)
        layers = getattr(inner, "layers_to_capture", None)
        for w in self._wrappers:
            w.mode = None if mode == "stock" else mode
            w.result = None
        if mode == "stock":
            if capture is not None:
                self.model.capture_aux_hidden_states = False
            if layers is not None:
                inner.layers_to_capture = []
        self._clear_pools(mr)
        try:
            fb = self._forward_batch(rows)
            mr.forward(fb)
            self.extends += 1
        finally:
            self._clear_pools(mr)
            if capture is not None:
                self.model.capture_aux_hidden_states = capture
            if layers is not None:
                inner.layers_to_capture = layers
            results = [w.result for w in self._wrappers if w.result is not None]
            for w in self._wrappers:
                w.mode, w.result = None, None
        if mode == "stock":
            return None
        if len(results) != 1:
            raise RuntimeError(f"{len(results)} logits processors ran in one extend, expected 1")
        return results[0]

    def _forward_batch(self, rows: list[list[int]]) -> Any:
        """SGLang's scheduler path for one prefill batch, without the scheduler."""
        api, mr = self._api, self._mr
        reqs = []
        for i, toks in enumerate(rows):
            if hasattr(api.Req, "set_extend_range"):  # 0.5.16
                req = api.Req(rid=str(i), origin_input_text="", origin_input_ids=array("q", toks),
                              sampling_params=self._sampling)
                req.full_untruncated_fill_ids = req.origin_input_ids
                req.logprob_start_len = -1
                req.set_extend_range(len(req.prefix_indices), len(toks))
            else:  # 0.5.9
                req = api.Req(rid=str(i), origin_input_text="", origin_input_ids=list(toks),
                              sampling_params=self._sampling)
                req.fill_ids = req.origin_input_ids
                req.extend_input_len = len(req.fill_ids) - len(req.prefix_indices)
                req.logprob_start_len = len(toks) - 1
            reqs.append(req)
        pools = dict(req_to_token_pool=mr.req_to_token_pool,
                     token_to_kv_pool_allocator=mr.token_to_kv_pool_allocator)
        if api.CacheInitParams is not None:
            cache = api.ChunkCache(api.CacheInitParams(disable=True, page_size=self._page, **pools))
        else:
            cache = api.ChunkCache(page_size=self._page, **pools)
        batch = api.ScheduleBatch.init_new(
            reqs=reqs, tree_cache=cache, model_config=mr.model_config, enable_overlap=False,
            spec_algorithm=api.SpeculativeAlgorithm.NONE, **pools)
        batch.prepare_for_extend()
        if getattr(batch, "input_ids", None) is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            # 0.5.16 leaves the ids on pinned CPU memory for its overlap scheduler to move
            batch.input_ids = batch.prefill_input_ids_cpu.to(mr.device, non_blocking=True)
            batch.prefill_input_ids_cpu = None
        src = batch.get_model_worker_batch() if hasattr(batch, "get_model_worker_batch") else batch
        kw = {}
        if "return_hidden_states_before_norm" in inspect.signature(api.ForwardBatch.init_new).parameters:
            kw["return_hidden_states_before_norm"] = False
        return api.ForwardBatch.init_new(src, mr, **kw)


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


def _parallel_state(api: Any, sa: Any, gpu_id: int) -> Any:
    """A world of one, with the sizes the scheduler would derive from ``sa`` at tp=1."""
    values = dict(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=None, dp_size=getattr(sa, "dp_size", 1),
        attn_tp_rank=0, attn_tp_size=1, attn_cp_rank=0, attn_cp_size=getattr(sa, "attn_cp_size", 1),
        attn_dp_rank=0, attn_dp_size=1, moe_ep_rank=0, moe_ep_size=getattr(sa, "ep_size", 1),
        moe_dp_rank=None, moe_dp_size=getattr(sa, "moe_dp_size", 1), dcp_size=getattr(sa, "dcp_size", 1),
        gpu_id=gpu_id,
    )
    fields = inspect.signature(api.ParallelState).parameters
    return api.ParallelState(**{k: v for k, v in values.items() if k in fields})


def _make_model_runner(api: Any, server_args: Any, model_config: Any, gpu_id: int) -> Any:
    params = inspect.signature(api.ModelRunner.__init__).parameters
    kw: dict[str, Any] = dict(model_config=model_config, mem_fraction_static=server_args.mem_fraction_static,
                              gpu_id=gpu_id, nccl_port=_free_port(), server_args=server_args)
    if "ps" in params:  # 0.5.12+: one ParallelState instead of rank arguments
        kw["ps"] = _parallel_state(api, server_args, gpu_id)
    else:  # 0.5.9
        kw.update(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, moe_ep_rank=0, moe_ep_size=1)
    mr = api.ModelRunner(**{k: v for k, v in kw.items() if k in params})
    # 0.5.16 builds pools, attention backends and the (eager) graph runner in separate steps
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
    ``mem_fraction_static``, ``max_total_tokens``, ...). ``tp_size`` must be 1: tensor
    parallelism needs one process per rank, which this in-process runner does not launch.
    """
    if tp_size != 1:
        raise ValueError(f"tp_size={tp_size}: the in-process SGLang runner is a world of one "
                         f"(tp_size=1); run one runner per GPU instead")
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
    n_gpus = _cuda_device_count()
    if n_gpus == 0:
        raise SGLangUnavailableError("the SGLang engine needs a CUDA GPU and torch.cuda.is_available() "
                                     "is False; use engine='hf' here")
    if gpu_id >= n_gpus:
        raise ValueError(f"gpu_id {gpu_id} but only {n_gpus} CUDA device(s)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process; the SGLang "
                           "engine brings up its own world of one: build it in a separate process")
    api = _load_api()
    known = {f for f in inspect.signature(api.ServerArgs).parameters}
    unknown = sorted(set(sglang_kwargs) - known)
    if unknown:
        raise ValueError(f"unknown SGLang ServerArgs field(s) {unknown} for sglang {api.version}")
    page = int(sglang_kwargs.get("page_size") or 1)
    args = dict(
        max_total_tokens=max_batch_tokens + max_batch_rows * page + page,  # page rounding per row
        max_running_requests=max_batch_rows,
    )
    args.update(sglang_kwargs)
    args.update(model_path=model_path, dtype=dtype_str, tp_size=1, trust_remote_code=trust_remote_code,
                skip_tokenizer_init=True, enable_return_hidden_states=True,
                disable_cuda_graph=True, disable_radix_cache=True)
    _set_device(gpu_id)
    server_args = api.ServerArgs(**args)
    for init in api.config_initializers:
        init(server_args)
    model_config = api.ModelConfig.from_server_args(server_args)
    mr = _make_model_runner(api, server_args, model_config, gpu_id)
    try:
        return SGLangTargetRunner(mr, api, max_batch_tokens=max_batch_tokens, max_batch_rows=max_batch_rows)
    except BaseException:
        for fn in api.teardown:
            fn()
        raise
