"""What a regeneration reports: :class:`RegenSummary` (what the output holds, also in
the manifest, and what this run did) and the progress bar (rows/s, generated tokens/s).

Skipped rows are counted with the dump's :class:`~eagle3_target.data.samples.DataReport`
(kinds ``malformed`` and ``regen``, by reason), so both jobs report alike.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from eagle3_target.data.samples import MALFORMED, DataReport
from eagle3_target.regen.prompts import REGEN

__all__ = ["RegenSummary", "RegenProgress", "report_from_json", "report_lines"]


def report_from_json(entries: list[dict[str, Any]]) -> DataReport:
    """The skip report of manifest shard entries, added up."""
    report = DataReport(counts={MALFORMED: Counter(),
                                REGEN: Counter()},
                        examples={MALFORMED: [], REGEN: []})
    for e in entries:
        report.add_json(e["skipped"], e["examples"])
    return report


def report_lines(report: DataReport) -> list[str]:
    """Lines for skipped rows by kind and reason, with examples (``file:line``)."""
    out = []
    for kind, title in ((MALFORMED, "malformed rows skipped"), (REGEN, "answers not written")):
        n = report.total(kind)
        if not n:
            continue
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(report.counts[kind].items()))
        out.append(f"{title}: {n} ({reasons})")
        for ex in report.examples.get(kind, []):
            detail = f" ({ex['detail']})" if ex.get("detail") else ""
            out.append(f"  e.g. {ex['where']} (row {ex['row']}): {ex['reason']}{detail}")
    return out


@dataclass
class RegenSummary:
    """What the output folder holds and what this run did."""

    out: str
    complete: bool
    input_rows: int
    rows_written: int
    generated_tokens: int
    shards: int
    skipped: dict[str, dict[str, int]]
    examples: dict[str, list[dict]]
    run_rows: int = 0
    run_generated_tokens: int = 0
    run_seconds: float = 0.0
    shards_written: int = 0
    shards_redone: int = 0
    run_retries: int = 0
    """Server requests retried in this run (``--server``)."""

    def lines(self) -> list[str]:
        report = DataReport(counts={k: Counter(v) for k, v in self.skipped.items()},
                            examples={k: list(v) for k, v in self.examples.items()})
        state = "complete" if self.complete else "incomplete (rerun the same command to continue)"
        dt = max(self.run_seconds, 1e-9)
        out = [f"regenerate {self.out}: {state}",
               f"  {self.rows_written} rows written from {self.input_rows} input rows in {self.shards} shards, "
               f"{self.generated_tokens} generated tokens",
               f"  this run: {self.run_rows} input rows, {self.shards_written} shards written"
               + (f" ({self.shards_redone} redone after a failed check)" if self.shards_redone else "")
               + f", {self.run_rows / dt:.2f} rows/s, {self.run_generated_tokens / dt:.1f} generated tok/s"
               + (f", {self.run_retries} server requests retried" if self.run_retries else "")]
        lines = report_lines(report)
        return out + ([f"  {s}" for s in lines] if lines else ["  no rows skipped"])


class RegenProgress:
    """The progress bar (tqdm on stderr): input rows, rows/s and generated tokens/s."""

    def __init__(self, total: int, initial: int, enabled: bool | None):
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, desc="regenerate",
                            file=sys.stderr)
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.answers = 0

    def answered(self, answers: int, tokens: int) -> None:
        self.tokens += tokens
        self.answers += answers
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.answers} answers, {self.tokens / dt:,.0f} gen tok/s")

    def rows_done(self, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
