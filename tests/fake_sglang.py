"""Fakes of the SGLang releases the engine supports, laid out as the real package, for CPU tests.

``install(release)`` puts a package ``fakesg_<release>`` in ``sys.modules`` whose modules
sit at the real paths (``srt.server_args``, ``srt.model_executor.model_runner``, ...)
and hold only what that release's wheel has, with its signatures (read from the wheels;
see docs/sglang.md "Versions" and "Capture table"). The engine's own ``_load_api``
imports it by name, so a symbol path, a constructor keyword, a missing ``publish``, a
``Req`` field or a tree-cache method the release lacks fails the test as it would on a
GPU. :data:`RELEASES` is the per-release feature table.

The models are real: transformers' Llama weights from the tiny model directory, run row
by row, with each family's SGLang capture rules on top (capture index ``c`` = the
residual stream entering layer ``c``; per-family setter quirks, per-layer flags that
are never cleared, packed ``[T,3H]`` output, whether index ``N`` is honoured, Gemma-3's
fused-residual capture of the wrong tensor). The family comes from the checkpoint's
``config.json`` ``architectures``. So a packing, ordering, index or reset bug changes
the numbers a test compares.

Nothing here imports sglang; no module is named ``sglang``.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib.machinery
import sys
import types
from array import array
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

RELEASES: dict[str, dict[str, Any]] = {}


def _release(name: str, base: str | None = None, **features: Any) -> None:
    f = dict(RELEASES[base]) if base else {}
    f.update(features)
    RELEASES[name] = f


# runner: how ModelRunner gets its ranks (rank args, ps=ParallelState, bootstrap first)
# req: fill (fill_ids), range (set_extend_range), end (extend_end/prefix_len)
_release("0.5.9", runner="ranks", ps=None, req="fill", fb="worker", chunk_cache=True, publish=None,
         asserts_published=False, init_noarg=(), server_args="dataclass", resolve_once=False,
         packed_deepseek=False, gemma3_fused=False, official=False, gatherer=False)
_release("0.5.12", "0.5.9")
_release("0.5.16", "0.5.9", runner="ps", ps="dcp_size", req="range", fb="schedule", gatherer=True)
_release("0.5.17", "0.5.16", publish="plain", packed_deepseek=True, gemma3_fused=True)
_release("0.5.19", "0.5.17", asserts_published=True, init_noarg=("moe", "fp8", "fp4"),
         ps="attn_dcp", resolve_once=True)
_release("0.5.20", "0.5.19", server_args="struct", init_noarg=("moe", "fp8", "fp4", "bf16"))
_release("0.5.21", "0.5.20", runner="bootstrap", ps=None, publish="ranks")
_release("0.5.22", "0.5.21", req="end", chunk_cache=False)
_release("0.5.23", "0.5.22", official=True)

ALL = tuple(RELEASES)
"""Every release with a fake, oldest first: the suites parametrise over these."""


# --------------------------------------------------------------------------- shared pieces


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
    """Allocates whole pages per request, as SGLang's paged allocator does."""

    def __init__(self, size: int, page_size: int = 1):
        self.size = size
        self.page_size = page_size
        self._free = size
        self.device = torch.device("cpu")

    def available_size(self) -> int:
        return self._free

    def alloc_rows(self, lengths: list[int]) -> torch.Tensor:
        need = sum(-(-n // self.page_size) * self.page_size for n in lengths)
        if need > self._free:
            raise RuntimeError(f"KV pool exhausted: need {need} tokens (page {self.page_size}), "
                               f"have {self._free}")
        self._free -= need
        return torch.arange(sum(lengths))

    def clear(self) -> None:
        self._free = self.size


class ForwardMode(enum.IntEnum):
    EXTEND = 1
    DECODE = 2

    def is_extend(self) -> bool:
        return self == ForwardMode.EXTEND


class CaptureHiddenMode(enum.IntEnum):
    NULL = 0
    LAST = 1
    FULL = 2

    def is_full(self) -> bool:
        return self == CaptureHiddenMode.FULL


class SpeculativeAlgorithm(enum.Enum):
    NONE = 0


@dataclass
class SamplingParams:
    temperature: float = 1.0
    max_new_tokens: int = 128


# --------------------------------------------------------------------------- models


class FakeLayer(nn.Module):
    """Stands where SGLang's decoder layer is (flags live here); the numbers come from
    the transformers model the decoder runs."""

    def forward(self, positions: Any, hidden_states: torch.Tensor, forward_batch: Any) -> Any:
        raise AssertionError("fake layers are not called")


class FusedResidualLayer(FakeLayer):
    """Gemma-3's layer from 0.5.17: takes and returns the residual separately."""

    def forward(self, positions: Any, hidden_states: torch.Tensor, forward_batch: Any,  # type: ignore[override]
                residual: Optional[torch.Tensor] = None) -> Any:
        raise AssertionError("fake layers are not called")


class Decoder(nn.Module):
    def __init__(self, hf_model: nn.Module, layer_cls: type):
        super().__init__()
        self.hf = hf_model  # transformers' LlamaModel
        self.embed_tokens = hf_model.embed_tokens
        # its own module (same weights): transformers' per-row forwards call theirs
        self.norm = copy.deepcopy(hf_model.norm)
        self.layers = nn.ModuleList([layer_cls() for _ in hf_model.layers])
        self.layers_to_capture: list[int] = []

    def set_eagle3_layers_to_capture(self, indices: list[int]) -> None:  # flag-based families
        self.layers_to_capture = list(indices)
        for c in indices:
            if c < len(self.layers):
                setattr(self.layers[c], "_is_layer_to_capture", True)  # never cleared


def tp_all_gather(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """SGLang's ``tensor_model_parallel_all_gather`` over the fake's gloo world."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def init_tp_world(rank: int, world: int, port: int) -> None:
    """What SGLang's distributed init does for a TP world, on the CPU: a gloo group on
    loopback (rank 0 hosts it)."""
    import datetime

    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))


def destroy_tp_world() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class CausalLM(nn.Module):
    """An SGLang ``*ForCausalLM`` surface over transformers' Llama; subclasses set the
    family's capture rules. Under tensor parallelism (:meth:`shard_vocab`) the LM head and
    the input embedding hold this rank's vocabulary rows, as SGLang's vocab-parallel
    layers do; everything else is computed whole on every rank (the residual stream is
    replicated in SGLang too)."""

    flag_based = False
    last_layer = False
    packed = False
    layer_cls: type = FakeLayer

    def __init__(self, hf_causal_lm: nn.Module, logits_processor_cls: type, release: dict):
        super().__init__()
        self.config = hf_causal_lm.config
        self.release = release
        self.model = Decoder(hf_causal_lm.model, self.layer_cls)
        self.lm_head = hf_causal_lm.lm_head
        self.logits_processor = logits_processor_cls(self.config)
        self.capture_aux_hidden_states = False
        self.fail_next_forward = False

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def shard_vocab(self, rank: int, world: int) -> None:
        v = self.lm_head.weight.shape[0]
        assert v % world == 0, "the fake pads no vocabulary"
        rows = slice(rank * v // world, (rank + 1) * v // world)
        head = nn.Linear(self.lm_head.in_features, v // world, bias=False)
        head.weight = nn.Parameter(self.lm_head.weight.detach()[rows].clone(), requires_grad=False)
        self.lm_head = head
        emb = self.model.embed_tokens.weight.detach()
        self.model.embed_tokens = nn.Embedding.from_pretrained(emb[rows].clone())
        lp = self.logits_processor
        lp.do_tensor_parallel_all_gather = True
        if hasattr(lp, "_logits_gatherer"):
            lp._logits_gatherer = tp_all_gather

    def indices_for(self, layer_ids: list[int]) -> list[int]:
        return [v + 1 for v in layer_ids]

    def set_eagle3_layers_to_capture(self, layer_ids: Optional[list[int]] = None) -> None:
        self.capture_aux_hidden_states = True
        n = self.config.num_hidden_layers
        idx = [2, n // 2, n - 3] if layer_ids is None else self.indices_for(list(layer_ids))
        if self.flag_based:
            self.model.set_eagle3_layers_to_capture(idx)
        else:
            self.model.layers_to_capture = idx

    def _captured_indices(self) -> list[int]:
        n = self.config.num_hidden_layers
        if self.flag_based:
            got = [i for i, layer in enumerate(self.model.layers) if getattr(layer, "_is_layer_to_capture", False)]
        else:
            got = [i for i in range(n) if i in self.model.layers_to_capture]
        if self.last_layer and n in self.model.layers_to_capture:
            got.append(n)  # captured after the loop
        return got

    def _stream(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream entering each layer ``c`` (0..N; N = last layer's output,
        before the norm) for one row."""
        outs: list[torch.Tensor] = []
        handle = self.model.hf.layers[-1].register_forward_hook(
            lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
        try:
            o = self.model.hf(input_ids=ids[None], output_hidden_states=True, use_cache=False)
        finally:
            handle.remove()
        hs = [h[0] for h in o.hidden_states[:-1]]
        return hs + [outs[0][0]]

    def capture(self, stream: list[torch.Tensor], c: int) -> torch.Tensor:
        return stream[c]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any) -> Any:
        if self.fail_next_forward:
            self.fail_next_forward = False
            raise RuntimeError("injected failure inside the model forward")
        pre, auxes = [], []
        off = 0
        idx = self._captured_indices()
        for n in forward_batch.extend_seq_lens_cpu:
            ids, pos = input_ids[off:off + n], positions[off:off + n]
            assert torch.equal(pos, torch.arange(n)), "each row must start at position 0"
            s = self._stream(ids)
            pre.append(s[-1])
            auxes.append([self.capture(s, c) for c in idx])  # layer order, as SGLang appends
            off += n
        hidden = self.model.norm(torch.cat(pre))  # one final norm over the packed stream
        aux: Any = None
        if idx:
            aux = [torch.cat([a[j] for a in auxes]) for j in range(len(idx))]
            if self.packed:
                aux = torch.cat(aux, dim=-1)
        # As SGLang's decoders: (hidden, aux) whenever something is captured, unpacked
        # only when the capture flag is on.
        out: Any = (hidden, aux) if aux is not None else hidden
        if self.capture_aux_hidden_states:
            hidden, aux = out if isinstance(out, tuple) else (out, None)
        elif isinstance(out, tuple):
            raise TypeError("only integer tensors of a single element can be converted to an index")
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch, aux)


class LlamaForCausalLM(CausalLM):
    pass


class Phi3ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(CausalLM):
    pass


class Qwen3MoeForCausalLM(CausalLM):
    flag_based = True


class GptOssForCausalLM(CausalLM):
    last_layer = True

    def indices_for(self, layer_ids: list[int]) -> list[int]:
        n = self.config.num_hidden_layers
        return list(layer_ids) if layer_ids and max(layer_ids) == n else [v + 1 for v in layer_ids]


class DeepseekV3ForCausalLM(CausalLM):
    def __init__(self, *a: Any, **k: Any):
        super().__init__(*a, **k)
        self.packed = bool(self.release["packed_deepseek"])

    def indices_for(self, layer_ids: list[int]) -> list[int]:
        return [v + 1 for v in layer_ids] if layer_ids and layer_ids[0] == 1 else list(layer_ids)


class Gemma3ForCausalLM(CausalLM):
    last_layer = True

    def __init__(self, hf: nn.Module, lp: type, release: dict):
        self.layer_cls = FusedResidualLayer if release["gemma3_fused"] else FakeLayer
        super().__init__(hf, lp, release)

    def capture(self, stream: list[torch.Tensor], c: int) -> torch.Tensor:
        if self.release["gemma3_fused"] and 0 < c < len(stream) - 1:
            return stream[c] - stream[c - 1]  # the branch, not the stream
        return stream[c]


class MixtralForCausalLM(CausalLM):
    set_eagle3_layers_to_capture = None  # type: ignore[assignment]


FAMILIES = {c.__name__: c for c in (LlamaForCausalLM, Phi3ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM,
                                    GptOssForCausalLM, DeepseekV3ForCausalLM, Gemma3ForCausalLM,
                                    MixtralForCausalLM)}


# --------------------------------------------------------------------------- one release


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__path__ = []  # a package, so its children import
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install(release: str) -> str:
    """Registers the fake package for ``release``; returns its import name."""
    f = RELEASES[release]
    pkg = "fakesg_" + release.replace(".", "_")
    for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[name]
    ctx = types.SimpleNamespace(server_args=None, role=None, ranks=None, bootstrapped=False,
                                torn_down=[], initialised=[], runners=[], tp=(0, 1))

    # -- ServerArgs --------------------------------------------------------------
    names = ["model_path", "dtype", "tp_size", "pp_size", "dp_size", "ep_size", "trust_remote_code",
             "skip_tokenizer_init", "enable_return_hidden_states", "disable_cuda_graph",
             "disable_radix_cache", "max_total_tokens", "max_running_requests", "mem_fraction_static",
             "attention_backend", "page_size", "speculative_algorithm"]
    if f["official"]:
        names += ["enable_return_aux_hidden_states", "return_aux_hidden_state_layer_ids"]
    defaults = dict(dtype="auto", tp_size=1, pp_size=1, dp_size=1, ep_size=1, trust_remote_code=False,
                    skip_tokenizer_init=False, enable_return_hidden_states=False, disable_cuda_graph=False,
                    disable_radix_cache=False, enable_return_aux_hidden_states=False)

    def resolved(raw: dict) -> dict:
        r = dict(raw)
        if not isinstance(r["dtype"], str):  # what real ServerArgs silently mishandles
            raise TypeError(f"dtype must be a string, got {r['dtype']!r}")
        r["mem_fraction_static"] = r["mem_fraction_static"] or 0.88
        # From 0.5.20 SGLang may choose the page itself; the fake picks 4 when unset
        r["page_size"] = r["page_size"] or (4 if f["server_args"] == "struct" else 1)
        if r.get("enable_return_aux_hidden_states"):
            if (r["speculative_algorithm"] or "").upper() != "EAGLE3":
                raise ValueError("--enable-return-aux-hidden-states needs --speculative-algorithm EAGLE3")
            r["speculative_algorithm"], r["aux_hidden_state_capture"] = None, "eagle3"
        return r

    if f["server_args"] == "dataclass":
        def _apply(self: Any, r: dict) -> None:
            for k in names:
                object.__setattr__(self, k, r[k])
            self._resolved = r

        def __post_init__(self: Any) -> None:
            if not f["resolve_once"]:  # resolved at construction up to 0.5.18
                self._apply(resolved(dataclasses.asdict(self)))

        def resolve_once(self: Any) -> None:
            if not getattr(self, "_resolved", None):
                self._apply(resolved(dataclasses.asdict(self)))

        ns = dict(_apply=_apply, __post_init__=__post_init__)
        if f["resolve_once"]:
            ns["resolve_once"] = resolve_once
        cls_fields = [(n, Any, field(default=defaults.get(n))) for n in names if n != "model_path"]
        ServerArgs = dataclasses.make_dataclass("ServerArgs", [("model_path", str)] + cls_fields, namespace=ns)
    else:  # msgspec struct: raw input fields, sealed once resolved, resolved values elsewhere
        class ServerArgs:  # type: ignore[no-redef]
            __struct_fields__ = tuple(names)

            def __init__(self, **kw: Any):
                bad = set(kw) - set(names)
                if bad:
                    raise TypeError(f"Unexpected keyword argument {sorted(bad)[0]!r}")
                if "model_path" not in kw:
                    raise TypeError("Missing required argument 'model_path'")
                for n in names:
                    object.__setattr__(self, n, kw.get(n, defaults.get(n)))

            def __setattr__(self, name: str, value: Any) -> None:
                if getattr(self, "_resolution_finished", False) and name in names:
                    raise AttributeError(f"server_args.{name} assigned after resolution")
                object.__setattr__(self, name, value)

            def resolve_once(self) -> None:
                if not getattr(self, "_resolution_finished", False):
                    object.__setattr__(self, "_resolved", resolved({n: getattr(self, n) for n in names}))
                    object.__setattr__(self, "_resolution_finished", True)

    def view(sa: Any) -> Any:
        r = getattr(sa, "_resolved", None)
        assert r is not None, "read before resolution"
        return types.SimpleNamespace(**r)

    # -- context, initialisers, ranks ---------------------------------------------
    def publish(server_args: Any, *, role: str, hf_config: Any = None) -> Any:
        if f["resolve_once"]:
            server_args.resolve_once()
        ctx.server_args, ctx.role = server_args, role
        return ctx

    def publish_ranks(server_args: Any, *, role: str, hf_config: Any = None, ranks: Any = None) -> Any:
        ctx.ranks = ranks
        return publish(server_args, role=role, hf_config=hf_config)

    def initializer(name: str) -> Any:
        if name in f["init_noarg"]:
            def init() -> None:
                assert ctx.server_args is not None, f"initialize_{name} read an unpublished config"
                ctx.initialised.append(name)
        else:
            def init(server_args: Any) -> None:  # type: ignore[misc]
                ctx.initialised.append(name)
        init.__name__ = f"initialize_{name}_config"
        return init

    @dataclass(frozen=True)
    class SpawnRanks:
        world_rank: int
        dp_rank: Optional[int] = None
        gpu_id: Optional[int] = None

    ps_fields = ["tp_rank", "tp_size", "pp_rank", "pp_size", "dp_rank", "dp_size", "attn_tp_rank",
                 "attn_tp_size", "attn_cp_rank", "attn_cp_size"]
    ps_fields += ["attn_dcp_rank", "attn_dcp_size"] if f["ps"] == "attn_dcp" else []
    ps_fields += ["attn_dp_rank", "attn_dp_size", "moe_ep_rank", "moe_ep_size", "moe_dp_rank", "moe_dp_size"]
    ps_fields += ["dcp_size"] if f["ps"] == "dcp_size" else []
    ps_fields += ["gpu_id"]
    ParallelState = dataclasses.make_dataclass("ParallelState", ps_fields)

    def trivial(**overrides: Any) -> Any:
        kw = {n: (1 if n.endswith("_size") else 0) for n in ps_fields}
        kw.update(overrides)
        return ParallelState(**kw)

    ParallelState.trivial = staticmethod(trivial)

    def init_parallel_runtime(*, server_args: Any, device: str, dist_port: int) -> None:
        assert ctx.server_args is server_args, "bootstrap before publish"
        world = int(getattr(server_args, "tp_size", 1) or 1)
        rank = int(getattr(ctx.ranks, "world_rank", 0) or 0)
        assert world == 1 or ctx.ranks is not None, "a TP world needs each rank published"
        init_tp_world(rank, world, dist_port)
        ctx.tp = (rank, world)
        ctx.bootstrapped = True

    def init_layer_runtime(*, model_config: Any) -> None:
        assert ctx.bootstrapped

    # -- logits -------------------------------------------------------------------
    out_fields = [("next_token_logits", Optional[torch.Tensor]),
                  ("hidden_states", Optional[torch.Tensor], field(default=None))]
    if f["official"]:
        out_fields.append(("last_hidden_states", Optional[torch.Tensor], field(default=None)))
    LogitsProcessorOutput = dataclasses.make_dataclass("LogitsProcessorOutput", out_fields)

    @dataclass
    class LogitsMetadata:
        forward_mode: ForwardMode
        extend_seq_lens_cpu: list = field(default_factory=list)
        capture_hidden_mode: CaptureHiddenMode = CaptureHiddenMode.NULL

        @classmethod
        def from_forward_batch(cls, fb: Any) -> "LogitsMetadata":
            return cls(forward_mode=fb.forward_mode, extend_seq_lens_cpu=list(fb.extend_seq_lens_cpu),
                       capture_hidden_mode=getattr(fb, "capture_hidden_mode", CaptureHiddenMode.NULL))

    class LogitsProcessor(nn.Module):
        """Stock behaviour on extend: the logits of each row's last position only; with
        the official switch and a FULL capture, packed aux and post-norm states too."""

        def __init__(self, config: Any, logit_scale: Optional[float] = None):
            super().__init__()
            self.config = config
            self.vocab_size = config.vocab_size
            self.logit_scale = logit_scale
            self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
            self.do_tensor_parallel_all_gather = False
            self.use_attn_tp_group = False
            # the official switch keeps the post-norm states of every token (0.5.23)
            self.keep_last_hidden_states = bool(
                f["official"] and ctx.server_args is not None
                and getattr(view(ctx.server_args), "aux_hidden_state_capture", None))
            self.calls: list[str] = []
            if f["gatherer"]:
                self._logits_gatherer = lambda x: x

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
                    hidden_states_before_norm=None):
            if not isinstance(logits_metadata, LogitsMetadata):
                logits_metadata = LogitsMetadata.from_forward_batch(logits_metadata)
            self.calls.append("stock")
            last = torch.tensor(logits_metadata.extend_seq_lens_cpu).cumsum(0) - 1
            logits = self._compute_lm_head(hidden_states[last], lm_head, None)
            if self.do_tensor_parallel_all_gather:
                logits = tp_all_gather(logits)
            logits = logits[:, : self.vocab_size]
            out = LogitsProcessorOutput(next_token_logits=logits.float())
            if logits_metadata.capture_hidden_mode.is_full():
                if aux_hidden_states is not None:
                    out.hidden_states = (aux_hidden_states if isinstance(aux_hidden_states, torch.Tensor)
                                         else torch.cat(aux_hidden_states, dim=-1))
                else:
                    out.hidden_states = hidden_states
                if self.keep_last_hidden_states and aux_hidden_states is not None:
                    out.last_hidden_states = hidden_states
            return out

    # -- requests and batches -----------------------------------------------------
    class Req:
        def __init__(self, rid: str, origin_input_text: str, origin_input_ids: Any,
                     sampling_params: SamplingParams, return_logprob: bool = False,
                     return_hidden_states: bool = False):
            want = list if f["req"] == "fill" else array
            assert isinstance(origin_input_ids, want), f"origin_input_ids must be {want.__name__}"
            self.rid = rid
            self.origin_input_ids = origin_input_ids
            self.sampling_params = sampling_params
            self.return_hidden_states = return_hidden_states
            self.logprob_start_len = 0
            if f["req"] == "fill":
                self.prefix_indices: Any = []
                self.fill_ids: Any = []
                self.extend_input_len = 0
            elif f["req"] == "range":
                self.prefix_indices = torch.empty(0, dtype=torch.int64)
                self.full_untruncated_fill_ids = array("q")
                self.extend_range: Any = None
            else:
                self.full_untruncated_fill_ids = array("q")
                self.extend_end: Optional[int] = None
                self.prefix_len = 0

        def fill(self) -> list[int]:
            if f["req"] == "fill":
                assert self.extend_input_len == len(self.fill_ids) - len(self.prefix_indices)
                return list(self.fill_ids)
            assert self.logprob_start_len == -1
            return list(self.get_fill_ids())

    if f["req"] == "fill":
        def set_extend_input_len(self: Any, n: int) -> None:
            self.extend_input_len = n

        Req.set_extend_input_len = set_extend_input_len
    else:
        def get_fill_ids(self: Any) -> array:
            end = self.extend_range[1] if f["req"] == "range" else self.extend_end
            return self.full_untruncated_fill_ids[:end]

        Req.get_fill_ids = get_fill_ids
    if f["req"] == "range":
        def set_extend_range(self: Any, start: int, end: int) -> None:
            self.extend_range = (start, end)

        Req.set_extend_range = set_extend_range

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

    class ScheduleBatch:
        @classmethod
        def init_new(cls, reqs, req_to_token_pool, token_to_kv_pool_allocator, tree_cache, model_config,
                     enable_overlap, spec_algorithm, chunked_req=None, dllm_config=None):
            if f["chunk_cache"]:
                assert isinstance(tree_cache, ChunkCache), type(tree_cache).__name__
            else:  # what 0.5.22+ asks of any tree cache
                assert not tree_cache.supports_swa() and not tree_cache.supports_mamba()
                tree_cache.supports_prefix_sharing()
                tree_cache.evict(None)
            assert tree_cache.token_to_kv_pool_allocator is token_to_kv_pool_allocator
            b = cls()
            b.reqs, b.req_to_token_pool, b.alloc = reqs, req_to_token_pool, token_to_kv_pool_allocator
            b.page_size = tree_cache.page_size
            b.model_config = model_config
            b.input_ids = None
            return b

        def prepare_for_extend(self) -> None:
            self.forward_mode = ForwardMode.EXTEND
            fills = [r.fill() for r in self.reqs]
            self.extend_lens = [len(x) for x in fills]
            self.req_pool_indices = self.req_to_token_pool.alloc(len(self.reqs))
            assert self.page_size == self.alloc.page_size, \
                f"tree cache page {self.page_size} but the pool's is {self.alloc.page_size}"
            self.out_cache_loc = self.alloc.alloc_rows(self.extend_lens)
            flat = torch.tensor([t for x in fills for t in x], dtype=torch.int64)
            if f["fb"] == "schedule":  # ids stay on the CPU for the overlap scheduler
                self.prefill_input_ids_cpu = flat
            else:
                self.input_ids = flat

    if f["fb"] == "worker":
        def get_model_worker_batch(self: Any) -> Any:
            return types.SimpleNamespace(input_ids=self.input_ids, extend_lens=self.extend_lens,
                                         forward_mode=self.forward_mode)

        ScheduleBatch.get_model_worker_batch = get_model_worker_batch

    class ForwardBatch:
        def __init__(self, **kw: Any):
            self.__dict__.update(kw)

        @classmethod
        def _make(cls, batch: Any, mode: CaptureHiddenMode) -> "ForwardBatch":
            if batch.input_ids is None:
                raise RuntimeError("ForwardBatch.init_new got a batch without input_ids on the device")
            lens = list(batch.extend_lens)
            return cls(input_ids=batch.input_ids, positions=torch.cat([torch.arange(n) for n in lens]),
                       forward_mode=batch.forward_mode, extend_seq_lens=torch.tensor(lens),
                       extend_seq_lens_cpu=lens, capture_hidden_mode=mode)

    if f["fb"] == "worker":
        def init_new(cls: Any, batch: Any, model_runner: Any) -> Any:
            return cls._make(batch, CaptureHiddenMode.NULL)
    else:
        def init_new(cls: Any, batch: Any, model_runner: Any, *, capture_hidden_mode: Any = None,  # type: ignore[misc]
                     return_hidden_states_before_norm: bool) -> Any:
            assert isinstance(batch, ScheduleBatch)
            return cls._make(batch, capture_hidden_mode or CaptureHiddenMode.NULL)
    ForwardBatch.init_new = classmethod(init_new)

    # -- runner -------------------------------------------------------------------
    class ModelConfig:
        def __init__(self, hf_config: Any, context_len: int):
            self.hf_config = hf_config
            self.vocab_size = hf_config.vocab_size
            self.context_len = context_len

        @classmethod
        def from_server_args(cls, sa: Any) -> "ModelConfig":
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(sa.model_path)
            return cls(cfg, cfg.max_position_embeddings)

    class ModelRunnerBase:
        def _setup(self, model_config: Any, mem_fraction_static: float, gpu_id: int, nccl_port: int,
                   server_args: Any) -> None:
            assert mem_fraction_static is not None, "mem_fraction_static is None (read the raw field?)"
            if f["asserts_published"]:
                assert ctx.server_args is server_args and ctx.role == "scheduler", "config not published"
            if f["runner"] == "bootstrap":
                assert ctx.bootstrapped, "ModelRunner no longer creates process groups"
            self.model_config = model_config
            self.server_args = server_args
            self.resolved = resolved({n: getattr(server_args, n) for n in names}) \
                if getattr(server_args, "_resolved", None) is None else server_args._resolved
            self.page_size = self.resolved["page_size"]
            self.gpu_id, self.nccl_port, self.device = gpu_id, nccl_port, "cpu"
            if f["runner"] != "bootstrap":  # 0.5.9-0.5.20: the runner brings the world up
                tp = getattr(self, "ps", None)
                rank, world = ((tp.tp_rank, tp.tp_size) if tp is not None
                               else (self.ranks["tp_rank"], self.ranks["tp_size"]))
                assert world == getattr(server_args, "tp_size", 1), "ServerArgs.tp_size differs from the ranks"
                init_tp_world(rank, world, nccl_port)
                ctx.tp = (rank, world)
            self.req_to_token_pool = None
            self.attn_backend = self.eager_runner = None
            self.steps: list[str] = []
            self.model = self._load()
            ctx.runners.append(self)

        def _load(self) -> nn.Module:
            from transformers import LlamaForCausalLM as HFLlama

            hf = HFLlama.from_pretrained(self.server_args.model_path, dtype=torch.float32).eval()
            arch = (hf.config.architectures or ["LlamaForCausalLM"])[0]
            model = FAMILIES[arch](hf, LogitsProcessor, f)
            if ctx.tp[1] > 1:
                model.shard_vocab(*ctx.tp)
            return model

        def alloc_memory_pool(self) -> None:
            r = self.resolved
            self.max_total_num_tokens = r["max_total_tokens"]
            self.req_to_token_pool = ReqToTokenPool(r["max_running_requests"] + 1)
            self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(r["max_total_tokens"], self.page_size)
            self.steps.append("alloc_memory_pool")

        def init_attention_backends(self) -> None:
            if self.resolved.get("aux_hidden_state_capture") == "eagle3":  # the official switch
                self.model.set_eagle3_layers_to_capture(self.resolved.get("return_aux_hidden_state_layer_ids"))
            self.attn_backend = object()
            self.steps.append("init_attention_backends")

        def init_cuda_graphs(self) -> None:
            self.eager_runner = object()
            self.steps.append("init_cuda_graphs")

        def forward(self, forward_batch: Any) -> Any:
            assert self.attn_backend is not None and self.eager_runner is not None
            out = self.model.forward(forward_batch.input_ids, forward_batch.positions, forward_batch)
            if f["runner"] == "ranks":
                return out, False
            return types.SimpleNamespace(logits_output=out, can_run_graph=False)

    if f["runner"] == "ranks":
        class ModelRunner(ModelRunnerBase):
            def __init__(self, model_config, mem_fraction_static, gpu_id, tp_rank, tp_size, moe_ep_rank,
                         moe_ep_size, pp_rank, pp_size, nccl_port, server_args, dp_rank=None,
                         attn_cp_rank=None, moe_dp_rank=None, is_draft_worker=False, req_to_token_pool=None,
                         token_to_kv_pool_allocator=None, draft_model_idx=None):
                self.ranks = dict(tp_rank=tp_rank, tp_size=tp_size, moe_ep_rank=moe_ep_rank,
                                  moe_ep_size=moe_ep_size, pp_rank=pp_rank, pp_size=pp_size)
                self._setup(model_config, mem_fraction_static, gpu_id, nccl_port, server_args)
                self.alloc_memory_pool()
                self.init_attention_backends()
                self.init_cuda_graphs()
                self.steps = ["constructor"]
    elif f["runner"] == "ps":
        class ModelRunner(ModelRunnerBase):  # type: ignore[no-redef]
            def __init__(self, model_config, mem_fraction_static, gpu_id, ps, nccl_port, server_args,
                         is_draft_worker=False, req_to_token_pool=None, token_to_kv_pool_allocator=None,
                         memory_pool_config=None, draft_model_idx=None):
                assert isinstance(ps, ParallelState)
                self.ps = ps
                self._setup(model_config, mem_fraction_static, gpu_id, nccl_port, server_args)
    else:
        class ModelRunner(ModelRunnerBase):  # type: ignore[no-redef]
            def __init__(self, model_config, mem_fraction_static, gpu_id, nccl_port, server_args,
                         is_draft_worker=False, req_to_token_pool=None, token_to_kv_pool_allocator=None,
                         memory_pool_config=None, draft_model_idx=None, draft_attention_backend=None):
                self._setup(model_config, mem_fraction_static, gpu_id, nccl_port, server_args)

    # -- the package ----------------------------------------------------------------
    root = _module(pkg, __version__=release, CTX=ctx, RELEASE=release, FEATURES=f)
    m = lambda name, **attrs: _module(f"{pkg}.{name}", **attrs)  # noqa: E731
    m("srt")
    m("srt.server_args", ServerArgs=ServerArgs)
    m("srt.configs")
    m("srt.configs.model_config", ModelConfig=ModelConfig)
    m("srt.model_executor")
    m("srt.model_executor.model_runner", ModelRunner=ModelRunner)
    m("srt.model_executor.forward_batch_info", ForwardBatch=ForwardBatch, ForwardMode=ForwardMode,
      **({"CaptureHiddenMode": CaptureHiddenMode} if f["fb"] == "schedule" else {}))
    m("srt.managers")
    m("srt.managers.schedule_batch", Req=Req, ScheduleBatch=ScheduleBatch)
    m("srt.sampling")
    m("srt.sampling.sampling_params", SamplingParams=SamplingParams)
    m("srt.speculative")
    m("srt.speculative.spec_info", SpeculativeAlgorithm=SpeculativeAlgorithm)
    m("srt.mem_cache")
    m("srt.mem_cache.cache_init_params", CacheInitParams=CacheInitParams)
    if f["chunk_cache"]:
        m("srt.mem_cache.chunk_cache", ChunkCache=ChunkCache)
    m("srt.layers")
    m("srt.layers.logits_processor", LogitsProcessor=LogitsProcessor, LogitsMetadata=LogitsMetadata,
      LogitsProcessorOutput=LogitsProcessorOutput)
    m("srt.layers.moe", initialize_moe_config=initializer("moe"))
    m("srt.layers.quantization")
    m("srt.layers.quantization.fp8_utils", initialize_fp8_gemm_config=initializer("fp8"))
    m("srt.layers.quantization.fp4_utils", initialize_fp4_gemm_config=initializer("fp4"))
    m("srt.layers.quantization.unquant", initialize_bf16_gemm_config=initializer("bf16"))
    def destroy_model_parallel() -> None:
        ctx.torn_down.append("model_parallel")
        destroy_tp_world()
        ctx.tp = (0, 1)

    m("srt.distributed", tensor_model_parallel_all_gather=tp_all_gather)
    m("srt.distributed.parallel_state",
      destroy_model_parallel=destroy_model_parallel,
      destroy_distributed_environment=lambda: ctx.torn_down.append("distributed_environment"))
    if f["ps"]:
        m("srt.distributed.parallel_state_wrapper", ParallelState=ParallelState)
    if f["runner"] == "bootstrap":
        m("srt.distributed.bootstrap", init_parallel_runtime=init_parallel_runtime,
          init_layer_runtime=init_layer_runtime)
    if f["publish"]:
        m("srt.runtime_context", publish=publish if f["publish"] == "plain" else publish_ranks,
          **({"SpawnRanks": SpawnRanks} if f["publish"] == "ranks" else {}))
    if f["resolve_once"]:
        m("srt.arg_groups")
        m("srt.arg_groups.overrides", resolving_view=view)
    return root.__name__


def uninstall(release: str) -> None:
    pkg = "fakesg_" + release.replace(".", "_")
    for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
        del sys.modules[name]


def ctx_of(release: str) -> Any:
    """The fake package's process context (published config, torn-down groups, runners)."""
    return sys.modules["fakesg_" + release.replace(".", "_")].CTX
