"""``regenerate --engine sglang``: generation through SGLang's public offline
``sglang.Engine`` on a GPU (the touch point is
:func:`eagle3_target.engines.sglang.offline_engine`; this module imports no sglang).

Prompts go in as token ids rendered by :class:`~.prompts.PromptRenderer` and answers
come back as token ids decoded by it, so the text rules (reasoning split, special
tokens) are the transformers engine's. The whole round goes to ``generate`` at once:
SGLang's scheduler batches it continuously, which is where its throughput comes from.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from eagle3_target.regen.prompts import Answer, PromptRenderer, Request

__all__ = ["SGLangGenerator", "sampling_params"]


def sampling_params(sampling: dict[str, Any], stop_ids: Sequence[int], seed: int | None,
                    seed_field: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """SGLang's sampling dict for one prompt (the seed only where sampling and supported)."""
    out: dict[str, Any] = {"max_new_tokens": sampling["max_new_tokens"], "temperature": sampling["temperature"],
                           "top_p": sampling["top_p"], "stop_token_ids": list(stop_ids)}
    if sampling["temperature"] > 0 and seed_field is not None and seed is not None:
        out[seed_field] = int(seed)
    out.update(extra or {})
    return out


class SGLangGenerator:
    """Answers prompts with ``sglang.Engine`` (one call per round)."""

    name = "sglang"

    def __init__(self, model_path: str, tokenizer: Any, renderer: PromptRenderer, *, sampling: dict[str, Any],
                 dtype: str | None = None, extra_sampling: dict[str, Any] | None = None, **server_args: Any):
        from transformers import AutoConfig

        from eagle3_target.engines import sglang as sg
        from eagle3_target.engines.common import text_config

        self._sg = sg
        self.renderer, self.sampling = renderer, sampling
        self.extra_sampling = dict(extra_sampling or {})
        cfg = AutoConfig.from_pretrained(model_path, local_files_only=True)
        self.context = getattr(text_config(cfg), "max_position_embeddings", None)
        stops = []
        for src in (getattr(cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            for t in (src if isinstance(src, (list, tuple)) else [src]):
                if t is not None and int(t) not in stops:
                    stops.append(int(t))
        self.stop_ids = stops
        self.seed_field = sg.offline_seed_field()
        if sampling["temperature"] > 0 and self.seed_field is None:
            raise ValueError("this sglang has no per-request sampling seed, so sampled answers would not "
                             "be reproducible; use greedy decoding (--temperature 0) or a newer sglang")
        try:
            self.engine = sg.offline_engine(model_path, dtype=dtype, **server_args)
        except sg.SGLangUnavailableError as e:  # a setting to change, found before any work
            raise ValueError(str(e)) from None

    def generate(self, requests: Sequence[Request],
                 on_done: Callable[[int, int], None] | None = None) -> list[Answer]:
        prompts = [r.prompt_ids or [] for r in requests]
        params = [sampling_params(self.sampling, self.stop_ids, r.seed, self.seed_field, self.extra_sampling)
                  for r in requests]
        outs = self._sg.offline_generate(self.engine, prompts, params)
        answers = [self._answer(p, o) for p, o in zip(prompts, outs)]
        if on_done is not None:
            on_done(len(answers), sum(a.completion_tokens for a in answers))
        return answers

    def _answer(self, prompt: list[int], out: dict[str, Any]) -> Answer:
        """One SGLang result as an :class:`Answer`, with the transformers engine's
        finish reasons: ``stop`` whenever the answer ended with a stop token, ``length``
        only when it was cut; an aborted request is refused, never kept as an answer."""
        ids = [int(t) for t in out.get("output_ids") or []]
        fin = (out.get("meta_info") or {}).get("finish_reason") or {}
        reason = fin.get("type") if isinstance(fin, dict) else str(fin)
        if reason not in ("stop", "length"):  # "abort": SGLang gave up on this prompt
            why = fin.get("message") if isinstance(fin, dict) else None
            return Answer.refusal(f"sglang finish_reason {reason!r}" + (f": {why}" if why else ""))
        stopped = bool(ids) and ids[-1] in self.stop_ids
        if stopped:
            ids = ids[:-1]  # the stop token is not part of the answer
        # SGLang checks max_new_tokens before the stop tokens, so an answer whose stop
        # token is its last allowed one comes back as "length": it ended all the same.
        return self.renderer.answer(prompt, ids, "stop" if stopped or reason == "stop" else "length")

    def close(self) -> None:
        self.engine.shutdown()
