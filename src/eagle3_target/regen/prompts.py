"""From a data row to the prompts the target answers, and from its answers back to an
OpenAI ``messages`` row.

Owns what is regenerated (``--turns``): a :class:`Conversation` is a row's messages
(read by :func:`eagle3_target.data.chat.row_to_messages`, so every row format ``dump``
takes works here) with its *slots*, the assistant turns to write, and a
:class:`Trajectory` is one sample of it being answered slot by slot. Also owns the
prompt's rendering with the chat template (:class:`PromptRenderer`: the generation
prompt and ``--chat-template-kwarg`` variables) and the split of an answer's token ids
into ``reasoning_content`` and ``content`` when the template opens a thinking block.

No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from eagle3_target.data.chat import THINK_CLOSE, THINK_OPEN, row_to_messages
from eagle3_target.data.rows import RawRow
from eagle3_target.data.samples import MALFORMED, Skipped
from eagle3_target.errors import MalformedRow

__all__ = ["Conversation", "Trajectory", "Answer", "Request", "PromptRenderer", "conversation_from_row",
           "SKIP_CONTEXT", "SKIP_LENGTH", "SKIP_REFUSED", "REGEN"]

REGEN = "regen"
"""The :class:`Skipped` kind of a row (sample) whose answer could not be written."""
SKIP_CONTEXT = "prompt over the context"
SKIP_LENGTH = "answer cut by --max-new-tokens"
SKIP_REFUSED = "server refused the prompt"


@dataclass
class Conversation:
    """One data row to answer: ``slots`` are the indices into ``messages`` where an
    answer goes (an index equal to the length of the messages so far appends one)."""

    row: int
    where: str
    messages: list[dict[str, Any]]
    tools: list[Any] | None
    slots: list[int]


@dataclass
class Request:
    """One prompt for an engine: the conversation so far, its rendered ids (local
    engines; None when no tokenizer is at hand) and its seed."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None
    seed: int
    prompt_ids: list[int] | None = None


@dataclass
class Answer:
    """What an engine wrote for one prompt."""

    content: str
    finish_reason: str
    """``stop`` (an end-of-turn token or a stop string) or ``length`` (``--max-new-tokens``)."""
    completion_tokens: int
    reasoning_content: str | None = None
    prompt_tokens: int | None = None
    refused: str | None = None
    """Set when the server refused the prompt (a 4xx answer: too long, say): its message."""
    tool_calls: list[Any] | None = None
    """Tool calls the server parsed out of the answer (kept in the message)."""

    @classmethod
    def refusal(cls, why: str) -> "Answer":
        """No answer for this prompt, and why: the row is skipped with ``why`` as its reason."""
        return cls("", "refused", 0, refused=why)

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


@dataclass
class Trajectory:
    """Sample ``sample`` of a conversation, answered slot by slot: ``messages`` holds
    the regenerated answers so far, ``done`` counts the slots answered."""

    conv: Conversation
    sample: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0
    finish_reason: str | None = None
    completion_tokens: int = 0
    skipped: Skipped | None = None

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = [dict(m) for m in self.conv.messages]

    @property
    def pending(self) -> bool:
        return self.skipped is None and self.done < len(self.conv.slots)

    def prompt(self) -> list[dict[str, Any]]:
        """The conversation up to the next slot (earlier slots already regenerated)."""
        return self.messages[: self.conv.slots[self.done]]

    def apply(self, answer: Answer) -> None:
        k = self.conv.slots[self.done]
        msg = answer.message()
        if k < len(self.messages):
            self.messages[k] = msg
        else:
            self.messages.append(msg)
        self.done += 1
        # A row is ``length`` when any of its answers was cut (kept with --keep-length).
        self.finish_reason = "length" if self.finish_reason == "length" else answer.finish_reason
        self.completion_tokens += answer.completion_tokens

    def skip(self, reason: str, detail: str, *, answered: bool = False) -> None:
        """Marks this sample skipped at its next slot (``answered``: at the slot just answered)."""
        n = self.done if answered else self.done + 1
        turn = f"answer {n} of {len(self.conv.slots)}, sample {self.sample}"
        self.skipped = Skipped(self.conv.row, self.conv.where, REGEN, reason, f"{turn}: {detail}")

    def output_row(self) -> dict[str, Any]:
        """The row written: OpenAI ``messages`` (up to the last answer), ``tools`` when
        the input had them, and where it came from."""
        last = self.conv.slots[-1]
        row: dict[str, Any] = {"messages": self.messages[: last + 1]}
        if self.conv.tools is not None:
            row["tools"] = self.conv.tools
        row["source"] = {"where": self.conv.where, "row": self.conv.row, "sample": self.sample}
        row["finish_reason"] = self.finish_reason
        return row


def _slots(messages: list[dict[str, Any]], turns: str) -> list[int]:
    roles = [m.get("role") for m in messages]
    if turns == "last":
        end = len(messages) - 1 if roles[-1] == "assistant" else len(messages)
        if "user" not in roles[:end]:
            raise MalformedRow("nothing to answer", "no user turn before the answer to write")
        return [end]
    if "tool" in roles:
        raise MalformedRow("tool results in --turns all",
                           "tool results answer the original assistant turn, not a regenerated one; "
                           "use --turns last")
    slots = [k for k, r in enumerate(roles) if r == "assistant"]
    if roles[-1] != "assistant":
        slots.append(len(messages))
    first_user = roles.index("user") if "user" in roles else len(roles)
    if slots[0] < first_user:
        raise MalformedRow("nothing to answer", f"messages[{slots[0]}] is an assistant turn before any user turn")
    return slots


def conversation_from_row(raw: RawRow, turns: str) -> Conversation | Skipped:
    """A raw row -> the :class:`Conversation` to answer, or a :class:`Skipped` (kind
    ``malformed``) saying why not."""
    if raw.error is not None:
        return Skipped(raw.index, raw.where, MALFORMED, raw.reason, raw.error)
    try:
        messages, tools = row_to_messages(raw.value)
        slots = _slots(messages, turns)
    except MalformedRow as e:
        return Skipped(raw.index, raw.where, MALFORMED, e.reason, e.detail)
    # Nothing after the last slot is kept (a trailing assistant turn in --turns last is
    # the one being replaced).
    return Conversation(raw.index, raw.where, messages[: slots[-1] + 1], tools, slots)


class PromptRenderer:
    """Renders prompts with the tokenizer's chat template (generation prompt on, the
    ``--chat-template-kwarg`` variables passed) and decodes answers.

    Reasoning: when the rendered prompt ends inside an open ``<think>`` block, or the
    answer starts one, the tokens up to ``</think>`` are the answer's
    ``reasoning_content`` and the rest its ``content`` (split on token ids, not text).
    Answers are decoded without special tokens, as OpenAI-compatible servers do.
    """

    def __init__(self, tokenizer: Any, template_kwargs: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        vocab = tokenizer.get_vocab()
        self.think_open = vocab.get(THINK_OPEN)
        self.think_close = vocab.get(THINK_CLOSE)

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> list[int]:
        """Token ids of the prompt. Raises :class:`MalformedRow` when the template
        rejects the conversation."""
        import jinja2

        try:
            out = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=True, return_dict=True, add_generation_prompt=True,
                **self.template_kwargs)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise MalformedRow("template error", f"the chat template rejected the conversation: {e}") from None
        return [int(t) for t in out["input_ids"]]

    def _opens_think(self, prompt: Sequence[int]) -> bool:
        if self.think_open is None:
            return False
        for t in reversed(prompt):
            if t == self.think_open:
                return True
            if t == self.think_close or self.tokenizer.decode([t]).strip():
                return False
        return False

    def answer(self, prompt: Sequence[int], ids: Sequence[int], finish_reason: str) -> Answer:
        """An answer from its generated ids (without the stop token)."""
        ids = list(ids)
        generated = len(ids) + (1 if finish_reason == "stop" else 0)  # the stop token counts
        reasoning = None
        thinking = self._opens_think(prompt)
        if not thinking and ids and ids[0] == self.think_open:
            thinking, ids = True, ids[1:]
        body = ids
        if thinking:
            if self.think_close in ids:
                cut = ids.index(self.think_close)
                reasoning, body = self._decode(ids[:cut]).strip(), ids[cut + 1:]
            else:  # cut inside the reasoning: all of it is reasoning
                reasoning, body = self._decode(ids).strip(), []
        text = self._decode(body)
        if reasoning is not None:
            text = text.lstrip()
        return Answer(text, finish_reason, generated, reasoning, len(prompt))

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
