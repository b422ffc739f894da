"""The transformers engine of ``regenerate``: batched, left-padded generation with a KV
cache over ``AutoModelForCausalLM`` (CPU or GPU).

Why our own loop rather than ``model.generate``: every row samples with its own
generator seeded from the run seed (:func:`~eagle3_target.regen.config.row_seed`), so a
row's text does not depend on the rows that share its batch; ``generate`` draws a
batch's samples from one global generator. Greedy decoding is the same arithmetic as
``generate``'s (a test compares the two token for token). The loop is gpt-fast's
shape: :func:`prefill`, :func:`decode_step`, :func:`generate_ids`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from eagle3_target.regen.prompts import Answer, PromptRenderer, Request

__all__ = ["HFGenerator", "generate_ids", "choose_tokens", "stop_token_ids", "max_position"]


def max_position(model: Any) -> int | None:
    """The model's context (``max_position_embeddings`` of its text config), if it says."""
    from eagle3_target.engines.common import text_config

    v = getattr(text_config(model.config), "max_position_embeddings", None)
    return int(v) if v else None


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the generation config's ``eos_token_id`` (an id or a list) and
    the tokenizer's EOS, as transformers' ``generate`` and OpenAI servers stop on."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    if not ids:
        raise ValueError("the model has no end-of-turn token (generation_config.eos_token_id or the "
                         "tokenizer's eos_token); set one in the model folder")
    return ids


def choose_tokens(logits: torch.Tensor, *, temperature: float, top_p: float,
                  generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """``logits [B,V] fp32`` -> next tokens ``[B] int64``: argmax when ``temperature`` is
    0, else nucleus sampling, row ``i`` drawing from ``generators[i]``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if generators is None or len(generators) != probs.shape[0]:
        raise ValueError("sampling needs one generator per row")
    cpu = probs.cpu()
    picks = [torch.multinomial(cpu[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)


def _cache_kwarg(model: Any) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` (the old name warns from 5.2x on).
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any,
             cache_kw: str) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    return out.logits[:, -1, :].float()


def generate_ids(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int],
                 pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                 seeds: Sequence[int] | None = None) -> list[tuple[list[int], str]]:
    """Answers ``prompts`` (token id lists) together: ``[(ids without the stop token,
    finish_reason)]`` in order, ``finish_reason`` ``stop`` or ``length``.

    The batch is left-padded to ``[B,L]`` (pads masked out, positions counted from each
    row's first real token), prefilled once, then decoded one token a step against the
    KV cache; a finished row keeps feeding the pad id until the batch is done.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.int64)
    mask = torch.zeros((b, width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.int64)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B,L]
    gens = None
    if temperature > 0:
        if seeds is None or len(seeds) != b:
            raise ValueError("sampling needs one seed per prompt")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    stops = torch.tensor(list(stop_ids), device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cache, cache_kw = DynamicCache(), _cache_kwarg(model)
    with torch.inference_mode():
        logits = _forward(model, ids, mask, pos, cache, cache_kw)  # [B,V]
        for step in range(max_new_tokens):
            nxt = choose_tokens(logits, temperature=temperature, top_p=top_p, generators=gens)  # [B]
            hit = torch.isin(nxt, stops) & ~finished
            for i in (~finished & ~hit).nonzero().flatten().tolist():
                out[i].append(int(nxt[i]))
            for i in hit.nonzero().flatten().tolist():
                reasons[i] = "stop"
            finished |= hit
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            nxt = nxt.masked_fill(finished, pad_id)
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
            logits = _forward(model, nxt[:, None], mask, pos, cache, cache_kw)
    return [(o, r) for o, r in zip(out, reasons)]


class HFGenerator:
    """``regenerate``'s transformers engine: prompts (token ids) in batches of
    ``batch_size``, longest first within a call so a batch pads little."""

    name = "hf"

    def __init__(self, model_path: str, tokenizer: Any, renderer: PromptRenderer, *, sampling: dict[str, Any],
                 batch_size: int, device: str | None = None, dtype: str | None = None, **engine_args: Any):
        from eagle3_target.engines import check_options
        from eagle3_target.engines import hf as hf_engine

        check_options("hf", engine_args)  # an option build() does not take: named, with those it does
        self._runner = hf_engine.build(model_path, device=device, dtype=dtype, **engine_args)
        self.model = self._runner.model
        self.renderer = renderer
        self.sampling = sampling
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(self.model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        self.context = max_position(self.model)

    def generate(self, requests: Sequence[Request],
                 on_done: Callable[[int, int], None] | None = None) -> list[Answer]:
        """One :class:`Answer` per request (rendered: ``prompt_ids`` set), in order;
        ``on_done(answers, tokens)`` after each batch."""
        prompts = [r.prompt_ids or [] for r in requests]
        seeds = [r.seed for r in requests]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        answers: list[Answer | None] = [None] * len(prompts)
        s = self.sampling
        for a in range(0, len(order), self.batch_size):
            chunk = order[a:a + self.batch_size]
            outs = generate_ids(self.model, [prompts[i] for i in chunk], max_new_tokens=s["max_new_tokens"],
                                stop_ids=self.stop_ids, pad_id=self.pad_id, temperature=s["temperature"],
                                top_p=s["top_p"], seeds=[seeds[i] for i in chunk])
            tokens = 0
            for i, (ids, reason) in zip(chunk, outs):
                answers[i] = self.renderer.answer(prompts[i], ids, reason)
                tokens += answers[i].completion_tokens  # type: ignore[union-attr]
            if on_done is not None:
                on_done(len(chunk), tokens)
        return answers  # type: ignore[return-value]

    def close(self) -> None:
        self._runner.close()
