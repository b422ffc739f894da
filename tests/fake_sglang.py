"""A fake of the SGLang surface that ``eagle3_target.engines.sglang`` touches, for CPU tests.

Shaped like sglang 0.5.16's classes (``variant="0.5.16"``) or 0.5.9's (``"0.5.9"``):
``ServerArgs``, ``ModelConfig.from_server_args``, ``ModelRunner`` (``ps=`` or rank
arguments; pools and backends built in separate steps or in the constructor), ``Req``,
``ScheduleBatch.init_new``/``prepare_for_extend`` with real pool bookkeeping that raises
when a pool runs out, ``ForwardBatch.init_new``, and a ``LogitsProcessor`` whose stock
``forward`` keeps only each row's last position, as SGLang's does.

The model is real: transformers' Llama, run row by row on the flat extend batch (by
``extend_seq_lens``), capturing aux states with SGLang's convention (capture index ``c``
= the residual stream entering layer ``c`` = HF ``hidden_states[c]``) in layer order. So
a packing, unpacking or index-convention bug changes the numbers a test compares.

Nothing here imports sglang; the module is deliberately not named ``sglang``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn


# --------------------------------------------------------------------------- config


@dataclass
class ServerArgs:
    model_path: str
    dtype: str = "auto"
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    ep_size: int = 1
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    enable_return_hidden_states: bool = False
    disable_cuda_graph: bool = False
    disable_radix_cache: bool = False
    max_total_tokens: Optional[int] = None
    max_running_requests: Optional[int] = None
    mem_fraction_static: Optional[float] = None
    attention_backend: Optional[str] = None
    page_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str):  # what real ServerArgs silently mishandles
            raise TypeError(f"dtype must be a string, got {self.dtype!r}")
        if self.mem_fraction_static is None:
            self.mem_fraction_static = 0.88


class ModelConfig:
    def __init__(self, hf_config: Any, context_len: int):
        self.hf_config = hf_config
        self.vocab_size = hf_config.vocab_size
        self.context_len = context_len

    @classmethod
    def from_server_args(cls, sa: ServerArgs) -> "ModelConfig":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(sa.model_path)
        return cls(cfg, cfg.max_position_embeddings)


@dataclass
class ParallelState:
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: Optional[int]
    dp_size: int
    attn_tp_rank: int
    attn_tp_size: int
    attn_cp_rank: int
    attn_cp_size: int
    attn_dp_rank: int
    attn_dp_size: int
    moe_ep_rank: int
    moe_ep_size: int
    moe_dp_rank: Optional[int]
    moe_dp_size: int
    dcp_size: int
    gpu_id: int


# --------------------------------------------------------------------------- pools


class ReqToTokenPool:
    def __init__(self, size: int):
        self.size = size
        self.free_slots = list(range(size))

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free_slots):
            raise RuntimeError(f"req_to_token_pool exhausted: need {n}, have {len(self.free_slots)}")
        got, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return got

    def clear(self) -> None:
        self.free_slots = list(range(self.size))


class TokenToKVPoolAllocator:
    def __init__(self, size: int, page_size: int = 1):
        self.size = size
        self.page_size = page_size
        self._free = size
        self.device = torch.device("cpu")

    def available_size(self) -> int:
        return self._free

    def alloc(self, n: int) -> torch.Tensor:
        if n > self._free:
            raise RuntimeError(f"KV pool exhausted: need {n} tokens, have {self._free}")
        start = self.size - self._free
        self._free -= n
        return torch.arange(start, start + n)

    def clear(self) -> None:
        self._free = self.size


@dataclass
class CacheInitParams:
    disable: bool
    req_to_token_pool: ReqToTokenPool
    token_to_kv_pool_allocator: TokenToKVPoolAllocator
    page_size: int


class ChunkCache:
    def __init__(self, params: CacheInitParams):
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator = params.token_to_kv_pool_allocator
        self.page_size = params.page_size


# --------------------------------------------------------------------------- batches


class ForwardMode(enum.IntEnum):
    EXTEND = 1
    DECODE = 2

    def is_extend(self) -> bool:
        return self == ForwardMode.EXTEND


class SpeculativeAlgorithm(enum.Enum):
    NONE = 0


@dataclass
class SamplingParams:
    temperature: float = 1.0
    max_new_tokens: int = 128


class Req:
    """0.5.16 shape: ``origin_input_ids`` an ``array('q')``, ``set_extend_range``."""

    def __init__(self, rid: str, origin_input_text: str, origin_input_ids: Any,
                 sampling_params: SamplingParams, return_hidden_states: bool = False):
        self.rid = rid
        self.origin_input_ids = origin_input_ids
        self.sampling_params = sampling_params
        self.return_hidden_states = return_hidden_states
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.full_untruncated_fill_ids: Any = None
        self.extend_range: Optional[tuple[int, int]] = None
        self.logprob_start_len = 0

    def set_extend_range(self, start: int, end: int) -> None:
        self.extend_range = (start, end)

    def fill(self) -> list[int]:
        start, end = self.extend_range
        return list(self.full_untruncated_fill_ids[start:end])


class OldReq:
    """0.5.9 shape: ``fill_ids`` and ``extend_input_len`` set by the caller."""

    def __init__(self, rid: str, origin_input_text: str, origin_input_ids: list[int],
                 sampling_params: SamplingParams, return_hidden_states: bool = False):
        self.rid = rid
        self.origin_input_ids = origin_input_ids
        self.sampling_params = sampling_params
        self.prefix_indices: list[int] = []
        self.fill_ids: Any = None
        self.extend_input_len = 0
        self.logprob_start_len = 0

    def fill(self) -> list[int]:
        assert self.extend_input_len == len(self.fill_ids)
        return list(self.fill_ids)


class ScheduleBatch:
    variant = "0.5.16"

    @classmethod
    def init_new(cls, reqs, req_to_token_pool, token_to_kv_pool_allocator, tree_cache,
                 model_config, enable_overlap, spec_algorithm) -> "ScheduleBatch":
        assert tree_cache.token_to_kv_pool_allocator is token_to_kv_pool_allocator
        b = cls()
        b.reqs, b.req_to_token_pool, b.alloc = reqs, req_to_token_pool, token_to_kv_pool_allocator
        b.model_config = model_config
        b.input_ids = None
        return b

    def prepare_for_extend(self) -> None:
        self.forward_mode = ForwardMode.EXTEND
        fills = [r.fill() for r in self.reqs]
        self.extend_lens = [len(f) for f in fills]
        self.req_pool_indices = self.req_to_token_pool.alloc(len(self.reqs))
        self.out_cache_loc = self.alloc.alloc(sum(self.extend_lens))
        flat = torch.tensor([t for f in fills for t in f], dtype=torch.int64)
        if self.variant == "0.5.16":  # ids stay on the CPU for the overlap scheduler
            self.prefill_input_ids_cpu = flat
        else:
            self.input_ids = flat


class OldScheduleBatch(ScheduleBatch):
    variant = "0.5.9"

    def get_model_worker_batch(self) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.input_ids, extend_lens=self.extend_lens,
                               forward_mode=self.forward_mode)


class ForwardBatch:
    def __init__(self, **kw: Any):
        self.__dict__.update(kw)

    @classmethod
    def init_new(cls, batch: ScheduleBatch, model_runner: Any, *, capture_hidden_mode: Any = None,
                 return_hidden_states_before_norm: bool) -> "ForwardBatch":
        return cls._make(batch)

    @classmethod
    def _make(cls, batch: Any) -> "ForwardBatch":
        if batch.input_ids is None:
            raise RuntimeError("ForwardBatch.init_new got a batch without input_ids on the device")
        lens = list(batch.extend_lens)
        positions = torch.cat([torch.arange(n) for n in lens])
        return cls(input_ids=batch.input_ids, positions=positions, forward_mode=batch.forward_mode,
                   extend_seq_lens=torch.tensor(lens), extend_seq_lens_cpu=lens)


class OldForwardBatch(ForwardBatch):
    @classmethod
    def init_new(cls, batch: Any, model_runner: Any) -> "ForwardBatch":  # type: ignore[override]
        return cls._make(batch)


# --------------------------------------------------------------------------- logits


@dataclass
class LogitsProcessorOutput:
    next_token_logits: Optional[torch.Tensor]
    hidden_states: Optional[torch.Tensor] = None


@dataclass
class LogitsMetadata:
    forward_mode: ForwardMode
    extend_seq_lens_cpu: list[int] = field(default_factory=list)

    @classmethod
    def from_forward_batch(cls, fb: ForwardBatch) -> "LogitsMetadata":
        return cls(forward_mode=fb.forward_mode, extend_seq_lens_cpu=list(fb.extend_seq_lens_cpu))


class LogitsProcessor(nn.Module):
    """Stock SGLang behaviour on extend: the logits of each row's last position only."""

    def __init__(self, config: Any, logit_scale: Optional[float] = None):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.logit_scale = logit_scale
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        self.do_tensor_parallel_all_gather = False
        self.use_attn_tp_group = False
        self.calls: list[str] = []  # which helper ran, in order

    def _gather_dp_attn_hidden_states(self, hidden: torch.Tensor, md: Any):
        assert isinstance(md, LogitsMetadata), f"got {type(md).__name__}, not LogitsMetadata"
        self.calls.append("gather_dp")
        return hidden, hidden

    def _compute_lm_head(self, hidden: torch.Tensor, lm_head: Any, bias: Any) -> torch.Tensor:
        self.calls.append("lm_head")
        return torch.matmul(hidden.to(lm_head.weight.dtype), lm_head.weight.T)

    def _scatter_dp_attn_logits(self, logits: torch.Tensor, local: torch.Tensor, md: Any) -> torch.Tensor:
        self.calls.append("scatter_dp")
        return logits

    def forward(self, input_ids, hidden_states, lm_head, logits_metadata, aux_hidden_states=None,
                hidden_states_before_norm=None) -> LogitsProcessorOutput:
        if isinstance(logits_metadata, ForwardBatch):
            logits_metadata = LogitsMetadata.from_forward_batch(logits_metadata)
        last = torch.tensor(logits_metadata.extend_seq_lens_cpu).cumsum(0) - 1
        logits = self._compute_lm_head(hidden_states[last], lm_head, None)[:, : self.vocab_size]
        return LogitsProcessorOutput(next_token_logits=logits.float())


# --------------------------------------------------------------------------- model


class LlamaModel(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model  # transformers' LlamaModel
        self.embed_tokens = hf_model.embed_tokens
        self.layers_to_capture: list[int] = []


class LlamaForCausalLM(nn.Module):
    """sglang.srt.models.llama.LlamaForCausalLM's surface over transformers' Llama."""

    def __init__(self, hf_causal_lm: nn.Module, capture_offset: int = 1):
        super().__init__()
        self.config = hf_causal_lm.config
        self.model = LlamaModel(hf_causal_lm.model)
        self.lm_head = hf_causal_lm.lm_head
        self.logits_processor = LogitsProcessor(self.config)
        self.capture_aux_hidden_states = False
        self.capture_offset = capture_offset  # 1 in SGLang; other values model a broken port
        self.fail_next_forward = False

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_eagle3_layers_to_capture(self, layer_ids: Optional[list[int]] = None) -> None:
        self.capture_aux_hidden_states = True
        n = self.config.num_hidden_layers
        if layer_ids is None:
            self.model.layers_to_capture = [2, n // 2, n - 3]
        else:
            self.model.layers_to_capture = [v + self.capture_offset for v in layer_ids]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch):
        if self.fail_next_forward:
            self.fail_next_forward = False
            raise RuntimeError("injected failure inside the model forward")
        finals, auxes = [], []
        off = 0
        for n in forward_batch.extend_seq_lens_cpu:
            ids, pos = input_ids[off:off + n], positions[off:off + n]
            assert torch.equal(pos, torch.arange(n)), "each row must start at position 0"
            out = self.model.hf(input_ids=ids[None], output_hidden_states=True, use_cache=False)
            finals.append(out.last_hidden_state[0])
            n_layers = self.config.num_hidden_layers
            # SGLang appends the capture while looping over layers 0..N-1: layer order
            auxes.append([out.hidden_states[i][0] for i in range(n_layers)
                          if i in self.model.layers_to_capture])
            off += n
        hidden = torch.cat(finals)
        # As SGLang's LlamaModel: (hidden, aux) whenever a layer list is set, and
        # LlamaForCausalLM unpacks it only when its capture flag is on.
        out = hidden
        if self.model.layers_to_capture:
            out = (hidden, [torch.cat([a[j] for a in auxes]) for j in range(len(auxes[0]))])
        aux = None
        if self.capture_aux_hidden_states:
            hidden, aux = out
        else:
            hidden = out
        if not isinstance(hidden, torch.Tensor):
            raise TypeError("only integer tensors of a single element can be converted to an index")
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch, aux)


# --------------------------------------------------------------------------- runner


class ModelRunner:
    """0.5.16 shape: ``ps=``; pools, attention backends and graph runners built by
    separate calls after the constructor."""

    instances: list["ModelRunner"] = []

    def __init__(self, model_config: ModelConfig, mem_fraction_static: float, gpu_id: int,
                 ps: ParallelState, nccl_port: int, server_args: ServerArgs,
                 is_draft_worker: bool = False, req_to_token_pool: Any = None):
        self.model_config = model_config
        self.server_args = server_args
        self.gpu_id = gpu_id
        self.ps = ps
        self.nccl_port = nccl_port
        self.device = "cpu"
        self.req_to_token_pool = req_to_token_pool
        self.steps: list[str] = []
        self.model = self._load()
        ModelRunner.instances.append(self)

    def _load(self) -> nn.Module:
        from transformers import LlamaForCausalLM as HFLlama

        hf = HFLlama.from_pretrained(self.server_args.model_path, dtype=torch.float32).eval()
        return LlamaForCausalLM(hf)

    def alloc_memory_pool(self) -> None:
        sa = self.server_args
        self.max_total_num_tokens = sa.max_total_tokens
        self.req_to_token_pool = ReqToTokenPool(sa.max_running_requests + 1)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(sa.max_total_tokens, sa.page_size)
        self.steps.append("alloc_memory_pool")

    def init_attention_backends(self) -> None:
        self.attn_backend = object()
        self.steps.append("init_attention_backends")

    def init_cuda_graphs(self) -> None:
        self.eager_runner = object()
        self.steps.append("init_cuda_graphs")

    def forward(self, forward_batch: ForwardBatch) -> SimpleNamespace:
        assert self.attn_backend is not None and self.eager_runner is not None
        out = self.model.forward(forward_batch.input_ids, forward_batch.positions, forward_batch)
        return SimpleNamespace(logits_output=out, can_run_graph=False)


class OldModelRunner(ModelRunner):
    """0.5.9 shape: rank arguments, and everything built inside the constructor."""

    def __init__(self, model_config: ModelConfig, mem_fraction_static: float, gpu_id: int,
                 tp_rank: int, tp_size: int, moe_ep_rank: int, moe_ep_size: int, pp_rank: int,
                 pp_size: int, nccl_port: int, server_args: ServerArgs, is_draft_worker: bool = False):
        self.model_config = model_config
        self.server_args = server_args
        self.gpu_id = gpu_id
        self.ranks = dict(tp_rank=tp_rank, tp_size=tp_size, moe_ep_rank=moe_ep_rank,
                          moe_ep_size=moe_ep_size, pp_rank=pp_rank, pp_size=pp_size)
        self.device = "cpu"
        self.steps = []
        self.model = self._load()
        self.alloc_memory_pool()
        self.attn_backend = object()
        self.eager_runner = object()
        ModelRunner.instances.append(self)


# --------------------------------------------------------------------------- api


def make_api(variant: str = "0.5.16") -> SimpleNamespace:
    """What ``engines.sglang._load_api()`` returns, built from these fakes."""
    torn_down: list[str] = []
    new = variant == "0.5.16"
    return SimpleNamespace(
        version=variant + "+fake",
        ServerArgs=ServerArgs,
        ModelConfig=ModelConfig,
        ModelRunner=ModelRunner if new else OldModelRunner,
        ParallelState=ParallelState if new else None,
        config_initializers=[],
        Req=Req if new else OldReq,
        ScheduleBatch=ScheduleBatch if new else OldScheduleBatch,
        ForwardBatch=ForwardBatch if new else OldForwardBatch,
        SamplingParams=SamplingParams,
        SpeculativeAlgorithm=SpeculativeAlgorithm,
        ChunkCache=ChunkCache,
        CacheInitParams=CacheInitParams,
        LogitsProcessor=LogitsProcessor,
        LogitsMetadata=LogitsMetadata,
        LogitsProcessorOutput=LogitsProcessorOutput,
        tp_all_gather=None,
        teardown=[lambda: torn_down.append("model_parallel"),
                  lambda: torn_down.append("distributed_environment")],
        torn_down=torn_down,
    )


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "dataclasses")]
