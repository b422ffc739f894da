"""Chat data -> training rows: ``input_ids`` and an assistant-only ``loss_mask``.

Owns everything between a row read from a file (:mod:`.rows`) and the token ids the
target sees:

- normalising a row: OpenAI-style ``messages`` (``role``/``content``) or ShareGPT-style
  ``conversations`` (``from``/``value``, roles ``human``/``gpt``/``system``)
  (:func:`row_to_messages`);
- rendering with the tokenizer's chat template and building the loss mask
  (:class:`ChatEncoder`): the template's own assistant mask when it has
  ``{% generation %}`` markers, otherwise a per-turn rendering (see
  :meth:`ChatEncoder.turn_mask`); optional masking of reasoning (``<think>`` text and
  ``reasoning_content``); truncation to ``max_length``;

Rows become samples, or skipped rows with a reason, in :mod:`.samples`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from eagle3_target.data.rows import MAX_ROW_BYTES
from eagle3_target.errors import MalformedRow

__all__ = [
    "MAX_LENGTH",
    "ChatEncoder",
    "Encoded",
    "row_to_messages",
    "has_generation_block",
    "SHAREGPT_ROLES",
    "OPENAI_ROLES",
    "REASONING_FIELDS",
]

MAX_LENGTH = 2048
"""Tokens a rendered chat keeps by default (``dump`` and ``vocab``: ``--max-length``)."""

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool",
}
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
"""Roles an OpenAI-style message may have; a row with any other is skipped ("unknown
role"): a chat template renders a role it does not know as it likes (often as plain
text under a made-up header), which is no conversation the model was trained on."""
# Fields in which chat templates (and transformers' aliasing) carry an assistant's reasoning.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# --------------------------------------------------------------------------- rows


def _text_content(content: Any, where: str) -> Any:
    """Message content as a string; lists of text parts are joined, None is kept (an
    assistant turn that only calls tools)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise MalformedRow("non-text content", f"{where} has a content part of type {kind!r}")
        return "".join(parts)
    raise MalformedRow("bad content", f"{where} content is a {type(content).__name__}, not a string")


def row_to_messages(row: Any) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """A row -> ``(messages, tools)`` in OpenAI form, or :class:`MalformedRow`.

    Accepts ``{"messages": [{"role", "content", ...}]}`` and
    ``{"conversations": [{"from", "value"}]}`` (ShareGPT; also ``conversations`` holding
    OpenAI-style messages). Extra message keys (``reasoning_content``, ``tool_calls``)
    are kept for the template; an optional top-level ``system`` string is prepended.
    """
    if not isinstance(row, dict):
        raise MalformedRow("not an object", f"row is a {type(row).__name__}")
    key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    if key is None:
        raise MalformedRow("no messages", "row has neither 'messages' nor 'conversations'")
    turns = row[key]
    if not isinstance(turns, list):
        raise MalformedRow("no messages", f"'{key}' is a {type(turns).__name__}, not a list")
    if not turns:
        raise MalformedRow("no messages", f"'{key}' is empty")
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise MalformedRow("bad message", f"{where} is a {type(turn).__name__}, not an object")
        if "from" in turn and "role" not in turn:
            who = turn["from"]
            if not isinstance(who, str) or who.lower() not in SHAREGPT_ROLES:
                raise MalformedRow("unknown role", f"{where} has ShareGPT role {who!r} "
                                   f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
            msg = {k: v for k, v in turn.items() if k not in ("from", "value")}
            msg["role"] = SHAREGPT_ROLES[who.lower()]
            msg["content"] = _text_content(turn.get("value"), where)
        elif "role" in turn:
            role = turn["role"]
            if not isinstance(role, str) or role not in OPENAI_ROLES:
                raise MalformedRow("unknown role", f"{where} has role {role!r} "
                                   f"(known: {', '.join(OPENAI_ROLES)})")
            msg = dict(turn)
            msg["content"] = _text_content(turn.get("content"), where)
        else:
            raise MalformedRow("bad message", f"{where} has neither 'role' nor 'from'")
        if msg["content"] is None and not msg.get("tool_calls"):
            raise MalformedRow("bad content", f"{where} has no content")
        messages.append(msg)
    system = row.get("system")
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise MalformedRow("bad tools", f"'tools' is a {type(tools).__name__}, not a list")
    return messages, tools


# --------------------------------------------------------------------------- encoding


def has_generation_block(template: str) -> bool:
    """True when the Jinja template has a ``{% generation %}`` block (found with Jinja's
    own lexer, so comments and string literals that mention the word do not count)."""
    import jinja2

    prev = None
    try:
        for _, kind, value in jinja2.Environment().lex(template):
            if kind == "whitespace":
                continue
            if kind == "name" and value == "generation" and prev == "block_begin":
                return True
            prev = kind
    except jinja2.TemplateSyntaxError:
        return False
    return False


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _without_reasoning(message: dict[str, Any]) -> dict[str, Any] | None:
    """The message with its reasoning text emptied (``reasoning_content`` and friends,
    and the text inside ``<think>...</think>`` in the content), or None if it has none."""
    out = dict(message)
    changed = False
    for k in REASONING_FIELDS:
        if isinstance(out.get(k), str) and out[k]:
            out[k] = ""
            changed = True
    content = out.get("content")
    if isinstance(content, str) and THINK_OPEN in content:
        pieces, pos = [], 0
        while True:
            a = content.find(THINK_OPEN, pos)
            if a < 0:
                pieces.append(content[pos:])
                break
            a += len(THINK_OPEN)
            b = content.find(THINK_CLOSE, a)
            pieces.append(content[pos:a])
            if b < 0:  # unterminated: the rest is reasoning
                break
            changed = changed or b > a
            pos = b
        new = "".join(pieces)
        if new != content:
            out["content"] = new
            changed = True
    return out if changed else None


@dataclass
class Encoded:
    """``input_ids``/``loss_mask`` (equal length lists); ``full_supervised`` counts the
    supervised tokens before truncation (to explain a zero-supervision sample)."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool
    full_supervised: int
    mask_source: str


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template into ``input_ids`` and an
    assistant-only ``loss_mask``.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        max_length: keep at most this many tokens (right truncation); None keeps all.
        mask_reasoning: exclude reasoning text (``<think>`` content, ``reasoning_content``)
            from the loss mask; the ``<think>``/``</think>`` tags stay supervised.
        vocab_size: when given, a token id >= it is a malformed row (tokenizer and model
            disagree), caught here rather than failing a whole batch in the target.
        use_template_mask: None (default) uses the template's ``{% generation %}`` mask
            when the template has one; False always uses the per-turn rendering.
        max_context: the model's context (``max_position_embeddings``): a sample longer
            than this after truncation is a malformed row, never run (a 100k-token
            conversation ran for minutes on a 4k-context model before it was killed).
        max_row_bytes: the largest row read from a file for this encoder (see
            :func:`~eagle3_target.data.rows.iter_raw_rows`).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        mask_reasoning: bool = False,
        vocab_size: int | None = None,
        use_template_mask: bool | None = None,
        max_context: int | None = None,
        max_row_bytes: int = MAX_ROW_BYTES,
    ):
        if max_length is not None and (isinstance(max_length, bool) or max_length < 2):
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length!r}")
        if isinstance(max_row_bytes, bool) or not isinstance(max_row_bytes, int) or max_row_bytes < 1:
            raise ValueError(f"max_row_bytes must be a positive integer, got {max_row_bytes!r}")
        self.max_context = max_context
        self.max_row_bytes = max_row_bytes
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mask_reasoning = mask_reasoning
        self.vocab_size = vocab_size
        try:
            template = tokenizer.get_chat_template()
        except Exception as e:  # no template at all: nothing we can render
            raise ValueError(f"the tokenizer has no chat template ({e})") from None
        self.template = template
        can_mask = has_generation_block(template) and bool(getattr(tokenizer, "is_fast", False))
        self.use_template_mask = can_mask if use_template_mask is None else (use_template_mask and can_mask)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(tok, "special", False):
                special.add(int(tid))
        self._special = special

    # -- rendering ------------------------------------------------------------------
    def _render(self, messages: list[dict], tools: list | None, *, mask: bool = False,
                generation_prompt: bool = False) -> tuple[list[int], list[int] | None]:
        import jinja2

        try:
            out = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=mask, add_generation_prompt=generation_prompt)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise MalformedRow("template error", f"the chat template rejected the conversation: {e}") from None
        ids = list(out["input_ids"])
        return ids, (list(out["assistant_masks"]) if mask else None)

    def turn_mask(self, messages: list[dict], tools: list | None, full: list[int]) -> list[int]:
        """The assistant mask from per-turn renders, with no pattern matching on text.

        For each assistant message ``k``: it starts where the render of ``messages[:k]``
        with the generation prompt stops agreeing with the full render (so the role
        header, and anything else the template supplies before the model speaks, stays
        unsupervised), and ends where the render of ``messages[:k+1]`` ends, less
        trailing layout (whitespace-only tokens after the turn's last special token,
        e.g. ChatML's newline after ``<|im_end|>``). A prefix that does not reproduce the
        start of the full render (a template that rewrites earlier turns from later
        ones) makes the row malformed instead of guessing.
        """
        mask = [0] * len(full)
        plain: dict[int, list[int]] = {len(messages): full}

        def prefix(k: int) -> list[int]:
            if k not in plain:
                plain[k] = self._render(messages[:k], tools)[0]
            return plain[k]

        def consistent_end(ids: list[int]) -> int:
            if ids == full[: len(ids)]:
                return len(ids)
            # A template may close the conversation with a special token (an EOS) that
            # the same turn does not carry mid-conversation.
            if len(ids) > 1 and ids[-1] in self._special and ids[:-1] == full[: len(ids) - 1]:
                return len(ids) - 1
            raise MalformedRow(
                "template rewrites turns",
                "rendering the conversation up to a turn does not reproduce the start of the "
                "full render (the template changes earlier turns based on later ones), so the "
                "assistant tokens cannot be located; use a template with {% generation %} markers")

        for k, msg in enumerate(messages):
            if msg.get("role") != "assistant":
                continue
            if k == 0:
                start = 0
            else:
                before = consistent_end(prefix(k))
                head = self._render(messages[:k], tools, generation_prompt=True)[0]
                start = max(before, _common_prefix(head, full))
            end = consistent_end(prefix(k + 1))
            end = self._trim_layout(full, start, end)
            for i in range(start, end):
                mask[i] = 1
        return mask

    def _trim_layout(self, ids: list[int], start: int, end: int) -> int:
        last_special = next((i for i in range(end - 1, start - 1, -1) if ids[i] in self._special), None)
        if last_special is None:
            return end
        tail = ids[last_special + 1 : end]
        if all(not self.tokenizer.decode([t]).strip() for t in tail):
            return last_special + 1
        return end

    def reasoning_spans(self, messages: list[dict], tools: list | None,
                        full: list[int]) -> list[tuple[int, int]]:
        """Token spans of reasoning text: for each assistant turn that has reasoning, the
        part of the full render that changes when that reasoning is emptied."""
        spans = []
        for k, msg in enumerate(messages):
            if msg.get("role") != "assistant":
                continue
            variant = _without_reasoning(msg)
            if variant is None:
                continue
            other = self._render(messages[:k] + [variant] + messages[k + 1:], tools)[0]
            p = _common_prefix(full, other)
            s = _common_prefix(full[p:][::-1], other[p:][::-1])
            if len(full) - s > p:
                spans.append((p, len(full) - s))
        return spans

    def encode(self, messages: list[dict], tools: list | None = None) -> Encoded:
        """Renders one conversation. Raises :class:`MalformedRow` on a conversation the
        template cannot render or whose assistant tokens cannot be located."""
        if self.use_template_mask:
            full, mask = self._render(messages, tools, mask=True)
            source = "template"
        else:
            full, _ = self._render(messages, tools)
            mask = self.turn_mask(messages, tools, full)
            source = "turns"
        if not full:
            raise MalformedRow("empty render", "the conversation renders to no tokens")
        if self.mask_reasoning:
            for a, b in self.reasoning_spans(messages, tools, full):
                mask[a:b] = [0] * (b - a)
        if self.vocab_size is not None:
            bad = [t for t in full if t >= self.vocab_size]
            if bad:
                raise MalformedRow("token id out of range",
                                   f"token ids {bad[:3]} >= the model's vocab size {self.vocab_size}")
        full_supervised = sum(mask[1:])
        truncated = self.max_length is not None and len(full) > self.max_length
        if truncated:
            full, mask = full[: self.max_length], mask[: self.max_length]
        if self.max_context is not None and len(full) > self.max_context:
            raise MalformedRow("longer than the model's context",
                               f"{len(full)} tokens, max_position_embeddings {self.max_context}; "
                               f"--max-length {self.max_context} keeps the first {self.max_context} tokens")
        return Encoded(full, mask, truncated, full_supervised, source)
