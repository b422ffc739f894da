"""Built-in targets: deterministic Llamas with a locally trained tokenizer, as presets.

Nothing is downloaded. ``make_tiny_model(DIR, cfg)`` writes safetensors weights (random,
fixed seed), a byte-level BPE tokenizer trained with ``tokenizers`` on a corpus
generated here, special tokens, and a ChatML chat template with ``{% generation %}``
markers (so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` works).
Same arguments, same bytes. :data:`PRESETS` names the shapes the project uses (the
default ``tiny`` model, a peaked one whose argmax means something, and the
Llama-3.1-8B shape the GPU benchmarks run). :func:`tiny_model_path` builds a preset
once into a cache folder (``$EAGLE3_TARGET_CACHE``, default ``~/.cache/eagle3-target``);
:func:`resolve_model` is what every command that takes ``--model`` falls back to.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["TinyModelConfig", "PRESETS", "make_tiny_model", "tiny_model_path", "tiny_model_built", "cache_dir",
           "resolve_model",
           "CACHE_ENV", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

CACHE_ENV = "EAGLE3_TARGET_CACHE"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Llama. ``vocab`` is the BPE vocabulary size asked of the trainer."""

    layers: int = 8
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 352
    vocab: int = 2048
    seed: int = 0
    head_scale: float = 1.0
    """Multiplies the LM head weights; >1 makes the next-token distributions peaked."""
    max_position: int = 4096
    rope_theta: float = 10000.0
    norm_noise: float = 0.0
    """RMSNorm weights ``1 + norm_noise * N(0, 1)`` instead of ones, so a norm applied
    twice or skipped changes the outputs."""
    dtype: str = "float32"
    """Weights on disk: ``float32`` or ``bfloat16`` (what a GPU engine runs)."""

    def __post_init__(self) -> None:
        if self.layers < 4:
            raise ValueError(f"layers must be >= 4 for distinct default aux layers, got {self.layers}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must divide by heads ({self.heads}) and heads "
                             f"by kv_heads ({self.kv_heads})")
        if self.vocab < 300:
            raise ValueError(f"vocab must be >= 300 (256 bytes + specials + merges), got {self.vocab}")

    def key(self) -> str:
        # Fields at their defaults are left out, so adding a field keeps existing caches.
        fields = {k: v for k, v in asdict(self).items()
                  if k in _KEY_FIELDS or v != TinyModelConfig.__dataclass_fields__[k].default}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


_KEY_FIELDS = ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "seed", "head_scale")


PRESETS: dict[str, TinyModelConfig] = {
    "tiny": TinyModelConfig(),
    "tiny-peaked": TinyModelConfig(head_scale=40.0),
    # The GPU validation's small model: head_dim 64 as real models have, bf16, peaked.
    "tiny-peaked-256": TinyModelConfig(hidden=256, heads=4, kv_heads=2, intermediate=512,
                                       head_scale=20.0, dtype="bfloat16"),
    # The Llama-3.1-8B shape (8.03 B parameters), random bf16 weights: 16 GB, built on a GPU.
    "llama3-8b": TinyModelConfig(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
                                 vocab=128256, max_position=8192, rope_theta=500000.0,
                                 norm_noise=0.1, dtype="bfloat16"),
}

_WORDS = (
    "the a an model draft target token tokens train training speculative decoding layer layers "
    "hidden state states logits probability distribution batch sequence attention mask loss "
    "server client request response write read file shard data dataset answer question user "
    "assistant system please explain how why what when where which can could would should "
    "is are was were be been being have has had do does did make made use used run runs fast "
    "slow small large first second third one two three four five six seven eight nine ten "
    "and or but because so then if else while for with without from to of in on at by about "
    "python code function class return value list dict string number error test check GPU CPU "
    "memory time speed cost good better best simple clear correct I you we they it this that"
).split()


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    """A deterministic English-like corpus with chat markup, for BPE training only."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(5, 20)
        s = " ".join(rng.choice(_WORDS) for _ in range(n))
        s = s[0].upper() + s[1:] + rng.choice([".", "?", "!", ":", ","])
        if rng.random() < 0.2:
            s += f" {rng.randint(0, 9999)} = {rng.randint(0, 99)}*{rng.randint(0, 99)};"
        out.append(s)
    return out


def _train_tokenizer(cfg: TinyModelConfig, out_dir: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(cfg.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def make_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | str = TinyModelConfig(), *,
                    device: str | None = None) -> Path:
    """Writes the model ``cfg`` (a config or a :data:`PRESETS` name) to ``out_dir``
    (created; must be empty or absent). ``device`` builds the weights there (``cuda``
    for the 8B shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = _preset(cfg)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    # Single-threaded BPE training: the merges never depend on thread timing.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    n_tokens = _train_tokenizer(cfg, out)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    dtype = getattr(torch, cfg.dtype)
    config = LlamaConfig(
        # Like most released models, the embedding may have more rows than the tokenizer
        # has tokens (the BPE trainer stops when merges run out): V is config.vocab_size.
        vocab_size=max(cfg.vocab, n_tokens),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        torch_dtype=cfg.dtype,
    )
    torch.manual_seed(cfg.seed)
    old = torch.get_default_dtype()
    # fp32 initialisation, then a cast, unless the weights are built on a GPU (the 8B
    # shape in fp32 would need 32 GB); the small presets' bytes do not depend on `device`.
    on_gpu = str(device or "cpu").startswith("cuda")
    torch.set_default_dtype(dtype if on_gpu else torch.float32)
    try:
        with torch.device(device or "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        if cfg.head_scale != 1.0:
            model.lm_head.weight.mul_(cfg.head_scale)
        if cfg.norm_noise:
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + cfg.norm_noise * torch.randn_like(p, dtype=torch.float32))
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="5GB")
    (out / "eagle3_tiny.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    return out


def _preset(cfg: TinyModelConfig | str) -> TinyModelConfig:
    if isinstance(cfg, TinyModelConfig):
        return cfg
    if cfg not in PRESETS:
        raise ValueError(f"unknown built-in model {cfg!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[cfg]


def cache_dir() -> Path:
    """``$EAGLE3_TARGET_CACHE`` or ``~/.cache/eagle3-target``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "eagle3-target"
    )
    return Path(root)


def tiny_model_built(cfg: TinyModelConfig | str = "tiny") -> bool:
    """Whether :func:`tiny_model_path` finds ``cfg`` already built in the cache."""
    return (cache_dir() / f"tiny-llama-{_preset(cfg).key()}" / "eagle3_tiny.json").exists()


def tiny_model_path(cfg: TinyModelConfig | str = "tiny") -> Path:
    """The cached tiny model for ``cfg`` (a preset name or config), built on first use.

    Built in a temporary sibling folder and renamed into place, so a killed build never
    leaves a half-written model behind and concurrent builders agree.
    """
    cfg = _preset(cfg)
    final = cache_dir() / f"tiny-llama-{cfg.key()}"
    if tiny_model_built(cfg):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    try:
        make_tiny_model(tmp / "m", cfg)
        try:
            os.rename(tmp / "m", final)
        except OSError:
            if not (final / "eagle3_tiny.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(path: str | None) -> str:
    """The model folder to load: ``path`` itself (a local folder; nothing is downloaded),
    or the built-in tiny model's cache folder when ``path`` is None (built on first use).
    Raises ValueError naming the path when it is not a folder."""
    if path is None:
        return str(tiny_model_path())
    if not Path(path).is_dir():
        raise ValueError(f"--model {path}: not a directory (models are loaded from local folders)")
    return str(path)
