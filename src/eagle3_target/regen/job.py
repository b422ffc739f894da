"""The regeneration job (:func:`run_regenerate`, behind ``eagle3-target regenerate``):
chat data -> the target's own answers, as sharded OpenAI ``messages`` rows that
``vocab`` and ``dump`` read directly.

Guarantees, and how (the dump's, kept the same way):

- nothing dropped silently: a row that is malformed, whose prompt does not fit the
  context, that the server refused, or whose answer was cut by ``--max-new-tokens``
  (kept, marked ``finish_reason: length``, with ``--keep-length``) is counted by reason
  in the shard's manifest entry and the summary, with examples by ``file:line``;
  ``--strict`` turns any of them into an error before the shard is written.
- atomic and resumable: shard ``k`` covers input rows ``[k*R, (k+1)*R)`` whatever the
  run; it is written under ``.tmp-``, fsynced and renamed, then listed in the manifest.
  A rerun re-hashes the listed shards, deletes anything else, and redoes the rest.
- deterministic: batches are cut inside a shard from its rows alone and every answer
  has its own seed (:func:`~.config.row_seed`), so a redone shard has the bytes the
  first run would have written, on an engine that is itself deterministic.
- one run per folder: the manifest records the settings that shape the output; a rerun
  with others is refused, naming the settings that differ.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from eagle3_target.data.rows import check_data_files, count_rows, iter_raw_rows
from eagle3_target.data.samples import MALFORMED, DataReport, Skipped
from eagle3_target.dump.faults import kill_point
from eagle3_target.dump.format import folder_lock, model_fingerprint, sha256_file
from eagle3_target.errors import MalformedRow
from eagle3_target.regen.config import RegenConfig, row_seed
from eagle3_target.regen.output import FORMAT, check_shard, read_manifest, write_manifest, write_shard
from eagle3_target.regen.prompts import (
    REGEN, SKIP_CONTEXT, SKIP_LENGTH, SKIP_REFUSED, Answer, Conversation, PromptRenderer, Request, Trajectory,
    conversation_from_row,
)
from eagle3_target.regen.summary import RegenProgress, RegenSummary, report_from_json

__all__ = ["run_regenerate", "Generator", "GENERATORS", "build_generator"]


class Generator(Protocol):
    """An engine that answers prompts: ``generate`` returns one :class:`Answer` per
    request in order; ``context`` is its context length when it knows it."""

    name: str
    context: int | None

    def generate(self, requests: Sequence[Request],
                 on_done: Callable[[int, int], None] | None = None) -> list[Answer]: ...

    def close(self) -> None: ...


def _build_hf(cfg: RegenConfig, tokenizer: Any, renderer: PromptRenderer | None) -> Generator:
    from eagle3_target.regen.hf import HFGenerator
    from eagle3_target.tiny import resolve_model

    return HFGenerator(resolve_model(cfg.model), tokenizer, renderer, sampling=cfg.sampling(),
                       batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, **cfg.engine_args)


def _build_sglang(cfg: RegenConfig, tokenizer: Any, renderer: PromptRenderer | None) -> Generator:
    from eagle3_target.regen.sglang import SGLangGenerator
    from eagle3_target.tiny import resolve_model

    args = dict(cfg.engine_args)
    if cfg.device not in (None, "cuda"):
        raise ValueError(f"--engine sglang runs on CUDA GPUs; got --device {cfg.device}")
    return SGLangGenerator(resolve_model(cfg.model), tokenizer, renderer, sampling=cfg.sampling(),
                           dtype=cfg.dtype, **args)


def _build_server(cfg: RegenConfig, tokenizer: Any, renderer: PromptRenderer | None) -> Generator:
    from eagle3_target.regen.server import ChatServerGenerator

    return ChatServerGenerator(cfg.server or "", sampling=cfg.sampling(), concurrency=cfg.batch_size,
                               model=cfg.served_model, token=cfg.token, timeout=cfg.timeout, retries=cfg.retries,
                               template_kwargs=cfg.chat_template_kwargs)


GENERATORS: dict[str, Callable[[RegenConfig, Any, PromptRenderer | None], Generator]] = {
    "hf": _build_hf, "sglang": _build_sglang, "server": _build_server,
}
"""Engine name -> builder of its :class:`Generator`."""


def build_generator(cfg: RegenConfig, tokenizer: Any, renderer: PromptRenderer | None) -> Generator:
    """The engine ``cfg`` names, loaded."""
    if cfg.engine not in GENERATORS:
        raise ValueError(f"regenerate has no {cfg.engine!r} engine in this build (engines: {', '.join(GENERATORS)})")
    return GENERATORS[cfg.engine](cfg, tokenizer, renderer)


def _tokenizer_dir(cfg: RegenConfig) -> str | None:
    from eagle3_target.tiny import resolve_model

    if cfg.tokenizer:
        if not Path(cfg.tokenizer).is_dir():
            raise ValueError(f"--tokenizer {cfg.tokenizer}: not a directory")
        return cfg.tokenizer
    if cfg.engine == "server" and not cfg.model:
        return None  # the server renders; prompt lengths are the server's to check
    return resolve_model(cfg.model)


def _new_report() -> DataReport:
    from collections import Counter

    return DataReport(counts={MALFORMED: Counter(), REGEN: Counter()}, examples={MALFORMED: [], REGEN: []})


def run_regenerate(cfg: RegenConfig, *, generator: Generator | None = None, tokenizer: Any = None,
                   log: Callable[[str], None] = print) -> RegenSummary:
    """Runs (or resumes) a regeneration and returns its summary. ``generator`` and
    ``tokenizer`` may be given to reuse loaded ones (tests, benchmarks). Raises
    ValueError on bad input or settings before anything is written."""
    t0 = time.perf_counter()
    data = check_data_files(cfg.data)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    existing = read_manifest(cfg.manifest_path()) if cfg.manifest_path().exists() else None
    if existing is None and out.is_dir():
        stray = sorted(p.name for p in out.glob("regen-*.*"))
        if stray:
            raise ValueError(f"{out} has shards ({stray[0]}, ...) but no manifest.json: they cannot be "
                             f"checked against this run; use an empty folder")
    if tokenizer is None:
        tok_dir = _tokenizer_dir(cfg)
        if tok_dir is not None:
            from eagle3_target.data.tokenizer import load_tokenizer
            from eagle3_target.engines.common import quiet_transformers

            quiet_transformers()
            tokenizer = load_tokenizer(tok_dir)
    renderer = PromptRenderer(tokenizer, cfg.chat_template_kwargs) if tokenizer is not None else None
    total = count_rows(data)
    own = generator is None
    if own:
        generator = build_generator(cfg, tokenizer, renderer)
    assert generator is not None
    try:
        context = cfg.max_context or generator.context
        if cfg.strict:
            _strict_scan(cfg, data, renderer, context)
        config = _config_record(cfg, data, generator, tokenizer, context)
        if existing is not None and existing.get("config") != config:
            old = existing.get("config") or {}
            diff = sorted(k for k in old.keys() | config.keys() if old.get(k) != config.get(k))
            raise ValueError(f"{cfg.manifest_path()} was written with different settings (differs in: "
                             f"{', '.join(diff)}); rerun with the original settings or use a new --out folder")
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out, ".lock", f"another regenerate is writing {out}"):
            job = _Job(cfg, data, generator, renderer, context, total, log)
            return job.run(existing or {"format": FORMAT, "config": config, "shards": [], "complete": False,
                                        "summary": None}, t0)
    finally:
        if own:
            generator.close()


def _config_record(cfg: RegenConfig, data: list[Path], generator: Generator, tokenizer: Any,
                   context: int | None) -> dict[str, Any]:
    from eagle3_target.data.tokenizer import tokenizer_fingerprint
    from eagle3_target.tiny import resolve_model

    local = cfg.engine != "server"
    return {
        "format": FORMAT,
        "data": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in data],
        "engine": cfg.engine,
        "model": (model_fingerprint(resolve_model(cfg.model)) if local
                  else f"server:{getattr(generator, 'model', None)}"),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "turns": cfg.turns, "samples": cfg.samples, "seed": cfg.seed, "sampling": cfg.sampling(),
        "chat_template_kwargs": cfg.chat_template_kwargs, "max_context": context, "keep_length": cfg.keep_length,
        "shard_rows": cfg.shard_rows, "output_format": cfg.output_format, "max_row_mb": cfg.max_row_mb,
        # Batch composition changes a local engine's padding, and so its rounding.
        "batch_size": cfg.batch_size if local else None,
        "dtype": cfg.dtype if local else None,
    }


def _over_context(n_prompt: int, cfg: RegenConfig, context: int | None) -> str | None:
    if context is not None and n_prompt + cfg.max_new_tokens > context:
        return f"{n_prompt} prompt tokens + --max-new-tokens {cfg.max_new_tokens} > context {context}"
    return None


def _strict_scan(cfg: RegenConfig, data: list[Path], renderer: PromptRenderer | None, context: int | None) -> None:
    """--strict: every row parses and its first prompt fits, or nothing is generated."""
    report = _new_report()
    for raw in iter_raw_rows(data, max_row_bytes=cfg.max_row_bytes):
        item = conversation_from_row(raw, cfg.turns)
        if isinstance(item, Conversation) and renderer is not None:
            try:
                ids = renderer.render(item.messages[: item.slots[0]], item.tools)
                why = _over_context(len(ids), cfg, context)
                item = Skipped(raw.index, raw.where, REGEN, SKIP_CONTEXT, why) if why else item
            except MalformedRow as e:
                item = Skipped(raw.index, raw.where, MALFORMED, e.reason, e.detail)
        if isinstance(item, Skipped):
            report.add(item)
    if report.total(MALFORMED) or report.total(REGEN):
        from eagle3_target.regen.summary import report_lines

        raise ValueError("--strict: " + "; ".join(report_lines(report)))


class _Job:
    def __init__(self, cfg: RegenConfig, data: list[Path], generator: Generator, renderer: PromptRenderer | None,
                 context: int | None, total: int, log: Callable[[str], None]):
        self.cfg, self.data, self.gen, self.renderer = cfg, data, generator, renderer
        self.context, self.total, self.log = context, total, log
        self.out = Path(cfg.out)

    def run(self, manifest: dict[str, Any], t0: float) -> RegenSummary:
        cfg = self.cfg
        for tmp in self.out.glob(".tmp-*"):
            tmp.unlink()  # unfinished writes of a killed run: never part of the output
        good: dict[int, dict[str, Any]] = {}
        redone = 0
        for entry in manifest["shards"]:
            why = check_shard(self.out / entry["file"], entry)
            if why is None:
                good[entry["index"]] = entry
            else:
                self.log(f"shard {entry['file']}: {why}; regenerating it")
                redone += 1
        listed = {e["file"] for e in good.values()}
        for p in self.out.glob("regen-*.*"):
            if p.name not in listed:
                p.unlink()  # renamed before a kill but never listed: redone below, not trusted
        manifest["shards"] = sorted(good.values(), key=lambda e: e["index"])
        manifest["complete"] = False
        write_manifest(cfg.manifest_path(), manifest)
        n_shards = -(-self.total // cfg.shard_rows)
        done_rows = sum(e["rows"][1] - e["rows"][0] for e in good.values())
        progress = RegenProgress(self.total, done_rows, cfg.progress)
        run_rows = written = 0
        try:
            for k in range(n_shards):
                if k in good:
                    continue
                entry = self._shard(k, progress)
                good[k] = entry
                manifest["shards"] = sorted(good.values(), key=lambda e: e["index"])
                write_manifest(cfg.manifest_path(), manifest)
                kill_point("regen_manifest_written")
                run_rows += entry["rows"][1] - entry["rows"][0]
                written += 1
                progress.rows_done(entry["rows"][1] - entry["rows"][0])
        finally:
            progress.close()
        entries = manifest["shards"]
        report = report_from_json(entries)
        summary = {"input_rows": self.total, "rows_written": sum(e["num_rows"] for e in entries),
                   "generated_tokens": sum(e["generated_tokens"] for e in entries),
                   "skipped": report.counts_json(), "examples": report.examples_json()}
        manifest["complete"] = True
        manifest["summary"] = summary
        write_manifest(cfg.manifest_path(), manifest)
        return RegenSummary(out=str(self.out), complete=True, shards=len(entries),
                            run_rows=run_rows, run_generated_tokens=progress.tokens,
                            run_seconds=time.perf_counter() - t0, shards_written=written,
                            shards_redone=redone, run_retries=int(getattr(self.gen, "retried", 0)), **summary)

    def _shard(self, k: int, progress: RegenProgress) -> dict[str, Any]:
        cfg = self.cfg
        start, end = k * cfg.shard_rows, min((k + 1) * cfg.shard_rows, self.total)
        items: list[Skipped | Trajectory] = []
        for raw in iter_raw_rows(self.data, start=start, max_row_bytes=cfg.max_row_bytes):
            if raw.index >= end:
                break
            conv = conversation_from_row(raw, cfg.turns)
            if isinstance(conv, Skipped):
                items.append(conv)
            else:
                items.extend(Trajectory(conv, s) for s in range(cfg.samples))
        trajs = [t for t in items if isinstance(t, Trajectory)]
        # One round per slot: every trajectory's next answer, generated together.
        while pending := [t for t in trajs if t.pending]:
            requests, live = [], []
            for t in pending:
                req = self._request(t)
                if req is not None:
                    requests.append(req)
                    live.append(t)
            if not requests:
                continue
            answers = self.gen.generate(requests, on_done=progress.answered)
            for t, a in zip(live, answers):
                if a.refused is not None:
                    t.skip(SKIP_REFUSED, a.refused)
                    continue
                t.apply(a)
                if a.finish_reason == "length" and not cfg.keep_length:
                    t.skip(SKIP_LENGTH, f"{a.completion_tokens} tokens, no end of turn", answered=True)
            kill_point("regen_round_done")
        report = _new_report()
        rows = []
        for it in items:
            skipped = it if isinstance(it, Skipped) else it.skipped
            if skipped is not None:
                report.add(skipped)
            else:
                rows.append(it.output_row())  # type: ignore[union-attr]
        if cfg.strict and (report.total(MALFORMED) or report.total(REGEN)):
            from eagle3_target.regen.summary import report_lines

            raise ValueError("--strict: " + "; ".join(report_lines(report)) +
                             " (the shards before this one are kept)")
        name = cfg.shard_name(k)
        sha, nbytes = write_shard(self.out / name, rows, cfg.output_format)
        kill_point("regen_shard_renamed")
        return {"index": k, "file": name, "rows": [start, end], "sha256": sha, "bytes": nbytes,
                "num_rows": len(rows), "generated_tokens": sum(t.completion_tokens for t in trajs
                                                               if t.skipped is None),
                "skipped": report.counts_json(), "examples": report.examples_json()}

    def _request(self, t: Trajectory) -> Request | None:
        messages = t.prompt()
        ids = None
        if self.renderer is not None:
            try:
                ids = self.renderer.render(messages, t.conv.tools)
            except MalformedRow as e:
                t.skipped = Skipped(t.conv.row, t.conv.where, MALFORMED, e.reason, e.detail)
                return None
            why = _over_context(len(ids), self.cfg, self.context)
            if why is not None:
                t.skip(SKIP_CONTEXT, why)
                return None
        return Request(messages, t.conv.tools, row_seed(self.cfg.seed, t.conv.row, t.sample, t.done), ids)
