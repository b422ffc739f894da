"""Samples: a row read from a file -> a training sample (``input_ids`` + ``loss_mask``)
or a skipped row with its reason, and the accounting of what was skipped.

A malformed row is skipped with a reason, a row with no supervised token is reported
(never silently kept), and both are counted (:class:`DataReport`); ``strict`` turns
either into an error. A *supervised token* is a position the draft is trained on after
the EAGLE-3 shift: ``loss_mask[1:]`` summed (position 0 never is a target).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from eagle3_target.data.chat import ChatEncoder, row_to_messages
from eagle3_target.data.rows import RawRow, iter_raw_rows
from eagle3_target.errors import MalformedRow

__all__ = ["MALFORMED", "ZERO_SUPERVISION", "TRUNCATION_WARN_SHARE", "Sample", "Skipped", "DataReport", "encode_row",
           "iter_samples", "scan", "iter_supervised_ids"]

MALFORMED = "malformed"
ZERO_SUPERVISION = "zero_supervision"
TRUNCATION_WARN_SHARE = 0.02
"""Above this share of the supervised tokens cut by ``max_length``, the summary warns."""


@dataclass
class Sample:
    """A training row: ``row`` is the global row index it came from."""

    row: int
    input_ids: list[int]
    loss_mask: list[int]
    lost_supervised: int | None = None
    """Supervised tokens ``max_length`` cut from the row; None: the row was not truncated."""

    @property
    def supervised(self) -> int:
        return sum(self.loss_mask[1:])

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Skipped:
    """A row that produced no sample. ``kind`` is ``"malformed"`` or
    ``"zero_supervision"``; ``reason`` is the category counted, ``detail`` the specifics."""

    row: int
    where: str
    kind: str
    reason: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.where} (row {self.row}): {self.reason}" + (f" ({self.detail})" if self.detail else "")

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "where": self.where, "kind": self.kind, "reason": self.reason,
                "detail": self.detail}


def encode_row(raw: RawRow, encoder: ChatEncoder) -> Sample | Skipped:
    """One raw row -> a :class:`Sample`, or a :class:`Skipped` saying why not."""
    if raw.error is not None:
        return Skipped(raw.index, raw.where, MALFORMED, raw.reason, raw.error)
    try:
        messages, tools = row_to_messages(raw.value)
        enc = encoder.encode(messages, tools)
    except MalformedRow as e:
        return Skipped(raw.index, raw.where, MALFORMED, e.reason, e.detail)
    sample = Sample(raw.index, enc.input_ids, enc.loss_mask)
    if enc.truncated:
        sample.lost_supervised = enc.full_supervised - sample.supervised
    if sample.supervised == 0:
        if not any(m.get("role") == "assistant" for m in messages):
            reason = "no assistant turn"
        elif enc.truncated and enc.full_supervised > 0:
            reason = f"truncated before the first assistant token (max_length {encoder.max_length})"
        elif encoder.mask_reasoning:
            reason = "no assistant tokens outside reasoning"
        else:
            reason = "no assistant tokens"
        return Skipped(raw.index, raw.where, ZERO_SUPERVISION, reason, f"{len(enc.input_ids)} tokens")
    return sample


def iter_samples(
    paths: Sequence[str | Path],
    encoder: ChatEncoder,
    *,
    start: int = 0,
    keep: Callable[[int], bool] | None = None,
) -> Iterator[Sample | Skipped]:
    """Samples and skipped rows of the files, in row order (see :func:`iter_raw_rows`;
    rows are read up to the encoder's ``max_row_bytes``)."""
    for raw in iter_raw_rows(paths, start=start, keep=keep, max_row_bytes=encoder.max_row_bytes):
        yield encode_row(raw, encoder)


@dataclass
class DataReport:
    """Counts of skipped rows by kind and reason, with the first few examples of each kind."""

    max_examples: int = 5
    counts: dict[str, Counter] = field(default_factory=lambda: {MALFORMED: Counter(), ZERO_SUPERVISION: Counter()})
    examples: dict[str, list[dict]] = field(default_factory=lambda: {MALFORMED: [], ZERO_SUPERVISION: []})

    truncated_rows: int = 0
    """Samples kept but cut to ``max_length``, and the supervised tokens cut from them."""
    truncated_supervised: int = 0

    def add_truncated(self, s: Sample) -> None:
        if s.lost_supervised is not None:
            self.truncated_rows += 1
            self.truncated_supervised += s.lost_supervised

    def truncation_lines(self, max_length: int | None, supervised_kept: int) -> list[str]:
        """What ``max_length`` cut from the rows kept, and a warning above
        :data:`TRUNCATION_WARN_SHARE` of their supervised tokens."""
        if not self.truncated_rows:
            return []
        total = supervised_kept + self.truncated_supervised
        share = self.truncated_supervised / total if total else 0.0
        out = [f"truncated to --max-length {max_length}: {self.truncated_rows:,} rows, "
               f"{self.truncated_supervised:,} supervised tokens cut ({share:.1%} of {total:,})"]
        if share > TRUNCATION_WARN_SHARE:
            out.append(f"warning: {share:.1%} of the supervised tokens were cut by --max-length {max_length} "
                       f"(more than {TRUNCATION_WARN_SHARE:.0%}); raise it (0 keeps every token) or use "
                       f"--strict to refuse such data")
        return out

    def add(self, s: Skipped) -> None:
        self.counts[s.kind][s.reason] += 1
        if len(self.examples[s.kind]) < self.max_examples:
            self.examples[s.kind].append(s.to_json())

    def add_json(self, counts: dict[str, dict[str, int]], examples: dict[str, list[dict]]) -> None:
        for kind, by_reason in counts.items():
            self.counts.setdefault(kind, Counter()).update(by_reason)
        for kind, exs in examples.items():
            room = self.max_examples - len(self.examples.setdefault(kind, []))
            self.examples[kind].extend(exs[: max(room, 0)])

    def total(self, kind: str) -> int:
        return sum(self.counts.get(kind, Counter()).values())

    def counts_json(self) -> dict[str, dict[str, int]]:
        return {k: dict(sorted(v.items())) for k, v in sorted(self.counts.items())}

    def examples_json(self) -> dict[str, list[dict]]:
        return {k: list(v) for k, v in sorted(self.examples.items())}

    def lines(self) -> list[str]:
        out = []
        for kind, title in ((MALFORMED, "malformed rows skipped"),
                            (ZERO_SUPERVISION, "rows with no supervised token skipped")):
            n = self.total(kind)
            if not n:
                continue
            reasons = ", ".join(f"{r}: {c}" for r, c in sorted(self.counts[kind].items()))
            out.append(f"{title}: {n} ({reasons})")
            for ex in self.examples[kind]:
                detail = f" ({ex['detail']})" if ex.get("detail") else ""
                out.append(f"  e.g. {ex['where']} (row {ex['row']}): {ex['reason']}{detail}")
        return out

    def strict_error(self, max_length: int | None = None) -> str | None:
        """The message ``--strict`` raises, or None when nothing was skipped or cut."""
        lines = self.lines()
        if self.truncated_rows:
            lines.append(f"{self.truncated_rows} rows longer than --max-length {max_length} would lose "
                         f"{self.truncated_supervised:,} supervised tokens (raise --max-length, or 0 keeps "
                         f"every token)")
        return "--strict: " + "; ".join(lines) if lines else None


def scan(
    paths: Sequence[str | Path],
    encoder: ChatEncoder,
    *,
    keep: Callable[[int], bool] | None = None,
    on_sample: Callable[[Sample], None] | None = None,
) -> tuple[int, DataReport]:
    """Encodes every row once: ``(number of samples, report)``; ``on_sample`` sees each."""
    report = DataReport()
    n = 0
    for item in iter_samples(paths, encoder, keep=keep):
        if isinstance(item, Skipped):
            report.add(item)
        else:
            n += 1
            report.add_truncated(item)
            if on_sample is not None:
                on_sample(item)
    return n, report


def iter_supervised_ids(samples: Iterable[Sample]) -> Iterator[list[int]]:
    """Supervised token ids of each sample (the tokens at positions 1.. under the mask)."""
    for s in samples:
        yield [t for t, m in zip(s.input_ids[1:], s.loss_mask[1:]) if m]
