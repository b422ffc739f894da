"""What a dump reports: :class:`DumpSummary` (what it holds and what this run did), the
manifest's summary, and the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from eagle3_target.data.samples import DataReport

__all__ = ["DumpSummary", "Progress", "PROGRESS_LINE_SECONDS", "StageClock", "summary_json",
           "logits_bytes_per_token", "human_bytes", "config_changes"]


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class DumpSummary:
    """What a dump holds (deterministic part, also in the manifest) and what this run did."""

    out: str
    mode: str
    complete: bool
    samples: int
    tokens: int
    supervised_tokens: int
    bytes: int
    shards: int
    skipped: dict[str, dict[str, int]]
    examples: dict[str, list[dict]]
    logits_bytes_per_token: float
    run_samples: int = 0
    run_tokens: int = 0
    run_bytes: int = 0
    run_seconds: float = 0.0
    run_load_seconds: float = 0.0
    """Of ``run_seconds``, the start-up until the target was loaded: the tokenizer, the
    render process's start and the engine's load (0 when a loaded target was passed in)."""
    shards_written: int = 0
    shards_adopted: int = 0
    shards_repaired: int = 0
    run_child_rows: int = 0
    """Rows of this run rendered by the child process (``--render``), the rest by a thread."""
    already_complete: bool = False
    """This run found the dump complete and sound, and loaded no target."""
    max_length: int | None = None
    truncated_rows: int = 0
    """Samples cut to ``max_length``, and the supervised tokens cut from them."""
    truncated_supervised: int = 0

    @property
    def truncated_share(self) -> float:
        """The share of the supervised tokens ``max_length`` cut from the samples kept."""
        total = self.supervised_tokens + self.truncated_supervised
        return self.truncated_supervised / total if total else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def lines(self) -> list[str]:
        report = DataReport()
        report.add_json(self.skipped, self.examples)
        report.truncated_rows, report.truncated_supervised = self.truncated_rows, self.truncated_supervised
        ratio = (f" ({self.logits_bytes_per_token:,.0f} with full logits: "
                 f"{self.logits_bytes_per_token / self.bytes_per_token:.1f}x more)"
                 if self.bytes_per_token and self.mode != "logits" else "")
        dt = max(self.run_seconds, 1e-9)
        out = [
            f"dump {'complete' if self.complete else 'INCOMPLETE'}: {self.out} (mode {self.mode}, "
            f"{self.shards} shards)",
            f"  {self.samples:,} samples, {self.tokens:,} tokens, {self.supervised_tokens:,} supervised; "
            f"{human_bytes(self.bytes)}, {self.bytes_per_token:,.0f} bytes/token{ratio}",
            f"  this run: {self.run_samples:,} samples, {self.run_tokens:,} tokens in {self.run_seconds:.1f} s "
            f"({self.run_samples / dt:,.1f} samples/s, {self.run_tokens / dt:,.0f} tokens/s, "
            f"{self.run_bytes / dt / 1e6:,.1f} MB/s); shards written {self.shards_written}, "
            f"adopted {self.shards_adopted}, repaired {self.shards_repaired}"
            + (f"; {self.run_child_rows:,} rows rendered by a child process" if self.run_child_rows else ""),
        ]
        if self.already_complete:
            out[2] = (f"  this run: nothing to do, the dump was already complete; its {self.shards} shards "
                      f"were checked in {self.run_seconds:.1f} s without loading the target")
        if self.run_load_seconds > 0 and self.run_seconds > self.run_load_seconds:
            work = self.run_seconds - self.run_load_seconds
            out.append(f"  after loading the target ({self.run_load_seconds:.1f} s): "
                       f"{self.run_tokens / work:,.0f} tokens/s, {self.run_bytes / work / 1e6:,.1f} MB/s")
        skipped = report.lines()
        cut = report.truncation_lines(self.max_length, self.supervised_tokens)
        return (out + ([f"  {s}" for s in skipped] if skipped else ["  no rows skipped"])
                + [f"  {s}" for s in cut])


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"differs in: max_length, mode: max_length 2048 on record, 512 now; mode ..."``: each field of a dump's
    configuration record that differs, with the value on record and this run's (a data
    file's record, a long hash, is shortened)."""

    def show(v: Any) -> str:
        if isinstance(v, str) and len(v) > 24:
            return v[:12] + "..."
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return "[" + ", ".join(f"{d.get('name')} ({d.get('bytes')} B, sha256 {str(d.get('sha256'))[:12]}...)"
                                   for d in v) + "]"
        return json.dumps(v)

    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return (f"differs in: {', '.join(keys)}: "
            + "; ".join(f"{k} {show(old.get(k))} on record, {show(new.get(k))} now" for k in keys))


def logits_bytes_per_token(config: dict[str, Any]) -> float:
    """Bytes per token of the same samples in ``logits`` mode (ids, mask, aux, logits)."""
    item = torch.empty(0, dtype=getattr(torch, config["dtype"])).element_size()
    return 8 + 1 + (3 * config["hidden_size"] + config["vocab_size"]) * item


def summary_json(manifest: dict[str, Any]) -> dict[str, Any]:
    report = DataReport()
    for e in manifest["shards"] + ([manifest["tail"]] if manifest.get("tail") else []):
        report.add_json(e["skipped"], e["examples"])
    shards = manifest["shards"]
    out = {"samples": sum(e["num_samples"] for e in shards), "tokens": sum(e["tokens"] for e in shards),
           "supervised_tokens": sum(e["supervised_tokens"] for e in shards),
           "bytes": sum(e["bytes"] for e in shards), "skipped": report.counts_json(),
           "examples": report.examples_json()}
    cut = [e["truncated"] for e in shards if "truncated" in e]
    if cut:  # absent when --max-length cut nothing, as in each shard's entry
        out["truncated"] = {k: sum(c[k] for c in cut) for k in ("rows", "supervised_tokens_lost")}
    return out


PROGRESS_LINE_SECONDS = 30.0
"""Without a terminal, a progress line on stderr this often (and at the start)."""


class Progress:
    """The dump's progress on stderr: a bar (tqdm) on a terminal, lines without one.

    ``enabled``: True, a bar; False, nothing; None, a bar when stderr is a terminal and
    otherwise a line every :data:`PROGRESS_LINE_SECONDS` (a job under a scheduler or
    ``nohup`` would otherwise print nothing until its summary). :meth:`say` prints one
    line in either form."""

    def __init__(self, total: int, initial: int, enabled: bool | None):
        self.bar = None
        self.lines = enabled is None and not sys.stderr.isatty()
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True,
                            desc="dump", file=sys.stderr)
        self.total, self.done = total, initial
        self.t0 = self.last = time.perf_counter()

    @staticmethod
    def announcer(enabled: bool | None) -> Callable[[str], None]:
        """What prints a line before the bar exists: to stderr unless ``enabled`` is False."""
        if enabled is False:
            return lambda msg: None
        return lambda msg: print(f"dump: {msg}", file=sys.stderr, flush=True)

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(f"dump: {msg}", file=sys.stderr)
        elif self.lines:
            print(f"dump: {msg}", file=sys.stderr, flush=True)

    def update(self, rows: int, tokens: int, nbytes: int) -> None:
        self.done += rows
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{tokens / dt:,.0f} tok/s, {nbytes / dt / 1e6:,.1f} MB/s", refresh=False)
            self.bar.update(rows)
        elif self.lines and now - self.last >= PROGRESS_LINE_SECONDS:
            self.last = now
            share = self.done / self.total if self.total else 1.0
            print(f"dump: {self.done:,}/{self.total:,} rows ({share:.0%}), {tokens / dt:,.0f} tokens/s, "
                  f"{nbytes / dt / 1e6:,.1f} MB/s, {now - self.t0:,.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StageClock:
    """Where a dump's threads spend their time, by stage: ``engine`` (the mode's
    computation) and ``gather on device`` on the engine thread (the main thread with
    ``--prefetch 0``), ``wait for host copy``, ``wait for a writer``, ``drain writers``,
    ``wait for LM head`` on the main thread. The seam a benchmark times a dump through:
    ``run_dump(cfg, clock=StageClock())``, then :attr:`totals` (seconds by stage).

    ``sync`` (``torch.cuda.synchronize``, say) runs at the end of every stage, so a GPU
    stage is timed to its completion rather than its launch (it costs the overlap it
    removes: for diagnosis only). ``listener(name, start, seconds)`` sees each stage as
    it ends (``start`` on ``time.perf_counter``'s clock)."""

    def __init__(self, *, sync: Callable[[], None] | None = None,
                 listener: Callable[[str, float, float], None] | None = None):
        self.totals: dict[str, float] = {}
        self.threads: dict[str, str] = {}  # stage -> the name of the thread it ran on
        self._sync, self._listener = sync, listener

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            dt = time.perf_counter() - t0
            self.totals[name] = self.totals.get(name, 0.0) + dt
            self.threads[name] = threading.current_thread().name
            if self._listener is not None:
                self._listener(name, t0, dt)

    def report(self, total: float) -> str:
        """``total`` seconds of the calling thread split by stage, the rest as
        ``other``, then the other threads' stages; clears the totals."""
        me = threading.current_thread().name
        mine = {k: v for k, v in self.totals.items() if self.threads.get(k) == me}
        parts = [f"{k} {v:.2f} s" for k, v in mine.items()]
        text = f"{me} over {total:.2f} s: " + ", ".join(parts + [f"other {total - sum(mine.values()):.2f} s"])
        by_thread: dict[str, list[str]] = {}
        for k, v in self.totals.items():
            if k not in mine:
                by_thread.setdefault(self.threads.get(k, "?"), []).append(f"{k} {v:.2f} s")
        for thread, stages in by_thread.items():
            text += f"; {thread}: " + ", ".join(stages)
        self.totals.clear()
        self.threads.clear()
        return text
