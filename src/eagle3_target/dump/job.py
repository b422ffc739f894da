"""The offline dump: chat data -> sharded safetensors of EAGLE-3 supervision, written so
that a killed job never costs a rerun or a silent error.

Owns the job (:func:`run_dump`, behind the ``dump`` subcommand): loading the target
and the tokenizer, the configuration record, the writer's lock, checking and adopting
finished shards, repairs, the LM head, and the summary. The rows-to-shards stream is
:mod:`.produce`; the file format and the shard writer are :mod:`.format`; the checker
is :mod:`.verify`; the trainer's side is :mod:`.reader`. Each stored sample holds
exactly what ``generate_batch`` gives for that sample alone.

Guarantees, and how:

- atomic: a shard is written under ``.tmp-``, hashed on the way, fsynced, then renamed;
  the manifest (itself written by temp + rename) lists it only after the rename. A
  shard on disk that the manifest does not list yet (a kill between rename and
  manifest) is adopted on the next run after its header is checked, not rewritten.
- resumable: the manifest's last shard says which data row comes next; a rerun of the
  same command continues there. Every finished shard is re-hashed first
  (``--trust-existing`` skips that); a damaged one is regenerated from its row range.
- deterministic: samples keep data order, batches are cut greedily by
  ``--batch-tokens`` and shards by ``--shard-size-mb`` at batch boundaries, so the
  batch that starts after any shard is the same in every run; nothing run-dependent
  (times, temporary names) is stored. Interrupted or not, the bytes match.
- split: ``--num-shards K --shard-index i`` takes the rows ``r`` with ``r % K == i``;
  workers share nothing and write distinct files, so they can run on several machines
  and their outputs be copied into one folder.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import scan
from eagle3_target.data.rows import check_data_files, count_rows
from eagle3_target.data.tokenizer import tokenizer_class_name, tokenizer_fingerprint
from eagle3_target.dump.complete import config_record, finished_without_target, summary_of
from eagle3_target.dump.config import DumpConfig
from eagle3_target.dump.format import (
    FORMAT,
    LM_HEAD_FILE,
    ShardJob,
    ShardWriter,
    dtype_name,
    folder_lock,
    model_fingerprint,
    read_manifest,
    save_lm_head,
    sha256_file,
)
from eagle3_target.dump.modes import MODES, TargetSource, compute_prenorm
from eagle3_target.dump.produce import ShardProducer
from eagle3_target.dump.repair import plan_repairs, regenerate
from eagle3_target.dump.render import RenderProcess
from eagle3_target.dump.summary import DumpSummary, Progress, StageClock, config_changes, summary_json
from eagle3_target.engines.common import quiet_transformers, text_config
from eagle3_target.tiny import resolve_model
from eagle3_target.wire import TOKEN_ENV, read_token

__all__ = ["run_dump"]


def _load_source(cfg: DumpConfig) -> TargetSource:
    if cfg.server:
        try:
            from eagle3_target.client import RemoteTarget
        except ImportError as e:
            raise ValueError(f"--server needs eagle3_target.client.RemoteTarget, which this build "
                             f"does not have ({e})") from None
        # The token as the server takes it: from the environment, never the command line
        # (or inside the URL: http://user:TOKEN@host:port).
        from eagle3_target.client import RemoteTargetError

        try:
            # batch="alone": each request runs in its own engine call, so the shards'
            # bytes do not depend on what else the servers serve (resumes stay identical).
            client = RemoteTarget(list(cfg.server), token=read_token(cfg.token_file), mode=cfg.mode,
                                  batch="alone")
        except RemoteTargetError as e:  # refused (401, wrong mode...) or unreachable: say so plainly
            if e.status == 401:
                raise ValueError(f"--server {','.join(cfg.server)}: the server wants an access token and got "
                                 f"{'a wrong one' if read_token(cfg.token_file) else 'none'} (401): pass "
                                 f"--token-file FILE (first line: the token) or set ${TOKEN_ENV}") from None
            raise ValueError(f"--server {','.join(cfg.server)}: {e}") from None
        needs = {"hidden": ("generate_hidden", "lm_head")}.get(cfg.mode, ("generate_batch",))
        missing = [n for n in needs if not hasattr(client, n)]
        if missing:
            client.close()
            raise ValueError(f"--mode {cfg.mode} over --server needs RemoteTarget.{', '.join(missing)}, "
                             f"which this client does not have")
        return client
    from eagle3_target import Eagle3TargetModel

    quiet_transformers()
    return Eagle3TargetModel.from_pretrained(resolve_model(cfg.model), engine=cfg.engine,
                                             device=cfg.device, dtype=cfg.dtype,
                                             aux_layer_ids=cfg.aux_layer_ids, aux_ids_name="--aux-layers",
                                             **cfg.engine_args)


def _source_dims(source: Any, mode: str, mapping: Any) -> tuple[int, int, str]:
    """``(hidden_size, vocab_size, dtype name)`` of a target source: from its attributes
    (``Eagle3TargetModel``), else from one forward on two tokens (a remote target, whose
    wire dtype is the server model's)."""
    h = getattr(source, "hidden_size", None)
    v = getattr(source, "vocab_size", None)
    model = getattr(source, "model", None)
    dt = getattr(source, "dtype", None)
    if not isinstance(dt, torch.dtype):
        dt = next(model.parameters()).dtype if model is not None and hasattr(model, "parameters") else None
    if h is None or v is None or dt is None:
        ids = torch.zeros((1, 2), dtype=torch.int64)
        out = MODES[mode].compute(source, ids, torch.ones_like(ids), torch.ones_like(ids), [2], mapping)
        aux = out["aux_hidden_states"]
        h, dt = aux.shape[-1] // 3, aux.dtype
        if v is None:
            if "logits" not in out:
                raise ValueError("the target does not say its vocab_size")
            v = out["logits"].shape[-1]
    return int(h), int(v), dtype_name(dt)


def _context_length(source: Any) -> int | None:
    """The target's context (``max_position_embeddings``), when it says: from the model's
    config in process, from the server's model info remotely (None if it does not say)."""
    model = getattr(source, "model", None)
    if getattr(model, "config", None) is not None:
        n = getattr(text_config(model.config), "max_position_embeddings", None)
    else:
        info = getattr(source, "info", None) or {}
        n = info.get("max_context", info.get("max_position_embeddings"))  # /v1/model_info says max_context
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _tokenizer_dir(cfg: DumpConfig) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.server and not cfg.model:
        raise ValueError("--server needs --tokenizer DIR (or --model DIR) to render the chats")
    return resolve_model(cfg.model)


def run_dump(cfg: DumpConfig, *, source: TargetSource | None = None, tokenizer: Any = None,
             log: Callable[[str], None] = print, render: RenderProcess | None = None,
             clock: StageClock | None = None) -> DumpSummary:
    """Runs (or resumes, or repairs) one worker's dump and returns its summary.

    ``source``/``tokenizer`` may be given to reuse a loaded target (tests, benchmarks);
    otherwise they are built from ``cfg``. ``render``: a render process already started
    for this tokenizer (:class:`~.render.RenderProcess`), used instead of the one
    ``cfg.render`` would start (and closed at the end). ``clock`` times the main
    thread's stages (:class:`~.summary.StageClock`). Raises ValueError on bad input
    before anything is written.
    """
    from eagle3_target.data import tokenizer as tokenizers  # looked up at call time: a test seam
    from eagle3_target.vocab import VocabMapping

    t_start = time.perf_counter()
    data = check_data_files(cfg.data)
    tokenizer_dir = _tokenizer_dir(cfg) if tokenizer is None else getattr(tokenizer, "name_or_path", None)
    if tokenizer is None:
        tokenizer = tokenizers.load_tokenizer(tokenizer_dir)
    if source is None and not cfg.server:  # before minutes of loading: the config says the size
        from eagle3_target.data.draft_vocab import target_vocab_size

        model_dir = resolve_model(cfg.model)
        try:
            v_config = target_vocab_size(model_dir)
        except (OSError, ValueError, KeyError, AttributeError):  # a config only remote code reads: after the load
            v_config = None
        if v_config is not None:
            tokenizers.check_tokenizer_fits(tokenizer, v_config)
    mapping = None
    if cfg.vocab:
        if not Path(cfg.vocab).is_file():
            raise ValueError(f"--vocab {cfg.vocab}: no such file")
        mapping = VocabMapping.load(cfg.vocab)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    existing = read_manifest(cfg.manifest_path()) if cfg.manifest_path().exists() else None
    if existing is None and out.is_dir():
        stray = sorted(p.name for p in out.glob(f"shard{cfg.worker_tag}-*.safetensors"))
        if stray:
            raise ValueError(f"{out} has shards ({stray[0]}, ...) but no {cfg.manifest_path().name}: "
                             f"they cannot be checked against this run; use an empty folder")

    if existing is not None and source is None:  # complete: say so, and load nothing if it is sound
        out.mkdir(parents=True, exist_ok=True)
        with _lock(out, cfg):
            done = finished_without_target(cfg, existing, data, tokenizer, mapping, Progress.announcer(cfg.progress))
        if done is not None:
            done.already_complete, done.run_seconds = True, time.perf_counter() - t_start
            return done

    if cfg.prefetch > 1 and not cfg.server and (source is None or _in_process(source)):
        raise ValueError(f"--prefetch {cfg.prefetch}: an in-process target runs one forward at a time "
                         f"(its capture hooks are shared); use --prefetch 0 or 1")
    # Started before the target loads, so the child's imports overlap the engine's.
    own_source = source is None
    child = render if render is not None else _start_render_process(cfg, tokenizer, tokenizer_dir,
                                                                     _engine_on_gpu(cfg, source))
    try:
        load_seconds = 0.0
        if own_source:
            source = _load_source(cfg)
            # From the start, not from the load's own start: importing transformers for
            # the tokenizer took seconds on a GPU host, and the rate after this point
            # is the one to set against the engine alone.
            load_seconds = time.perf_counter() - t_start
        v = getattr(source, "vocab_size", None)
        if mapping is not None and v is not None and mapping.target_vocab_size != v:
            raise ValueError(f"--vocab maps a vocabulary of {mapping.target_vocab_size} tokens but the "
                             f"target has {v}")
        if mapping is not None and hasattr(source, "set_vocab_mapping") and cfg.mode == "draft":
            source.set_vocab_mapping(mapping)
        hidden_size, vocab_size, dtype = _source_dims(source, cfg.mode, mapping)
        tokenizers.check_tokenizer_fits(tokenizer, vocab_size)
        if cfg.with_prenorm:  # refuse before anything is written when the target cannot give it
            probe = torch.zeros((1, 2), dtype=torch.int64)
            compute_prenorm(source, probe, torch.ones_like(probe), torch.ones_like(probe))
        encoder = ChatEncoder(tokenizer, max_length=cfg.max_length, mask_reasoning=cfg.mask_reasoning,
                              vocab_size=vocab_size, max_context=_context_length(source),
                              max_row_bytes=cfg.max_row_bytes)
        if cfg.strict:
            _, report = scan(data, encoder, keep=cfg.owns)
            if (msg := report.strict_error(cfg.max_length)) is not None:
                raise ValueError(msg)
        model_sha = (model_fingerprint(resolve_model(cfg.model)) if not cfg.server
                     else "server:" + str((getattr(source, "info", None) or {}).get("model")))
        config = config_record(
            cfg, data, child.fingerprint if child is not None else tokenizer_fingerprint(tokenizer), model_sha,
            mapping, encoder.use_template_mask,
            {"aux_layer_ids": source.aux_layer_ids, "dtype": dtype, "hidden_size": hidden_size,
             "vocab_size": vocab_size})
        if existing is not None and existing.get("config") != config:
            old = existing.get("config") or {}
            raise ValueError(f"{cfg.manifest_path()} was written with a different configuration "
                             f"({config_changes(old, config)}); rerun with the original settings "
                             f"or use a new --out folder")
        out.mkdir(parents=True, exist_ok=True)
        with _lock(out, cfg):
            summary = _run_locked(cfg, source, encoder, mapping, config, existing, tokenizer, child, t_start, log,
                                  clock or StageClock())
        summary.run_load_seconds = load_seconds
        return summary
    finally:
        if child is not None:
            child.close()
            if child.failure is not None:
                log(f"note: the render process was not used ({child.failure}); this process rendered the chats")
        if own_source and source is not None:
            source.close()


def _engine_on_gpu(cfg: DumpConfig, source: TargetSource | None) -> bool:
    """Whether the target is (or, not loaded yet, will be) an engine in this process on a GPU."""
    if source is None:
        return not cfg.server and not str(cfg.device or "").startswith("cpu") and torch.cuda.is_available()
    if not _in_process(source):
        return False
    return source.get_input_embeddings().weight.device.type == "cuda"


def _start_render_process(cfg: DumpConfig, tokenizer: Any, tokenizer_dir: str | None,
                          engine_on_gpu: bool) -> RenderProcess | None:
    if not cfg.render_in_child(engine_on_gpu):
        return None
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        if cfg.render == "process":
            raise ValueError("--render process needs the tokenizer's folder (--tokenizer or --model), "
                             "which the child loads")
        return None
    return RenderProcess(str(tokenizer_dir), tokenizer_fingerprint(tokenizer), tokenizer_class_name(tokenizer))


def _in_process(source: Any) -> bool:
    from eagle3_target.contract import Eagle3TargetModel

    return isinstance(source, Eagle3TargetModel)


def _lock(out: Path, cfg: DumpConfig):
    """This worker's lock on ``out`` (workers of a split job write side by side)."""
    return folder_lock(out, f".lock{cfg.worker_tag or '-00000-of-00001'}",
                       f"another dump is writing {out} (worker {cfg.shard_index} of {cfg.num_shards})")


def _run_locked(cfg: DumpConfig, source: TargetSource, encoder: ChatEncoder, mapping: Any,
                config: dict[str, Any], existing: dict[str, Any] | None, tokenizer: Any,
                child: RenderProcess | None, t_start: float, log: Callable[[str], None],
                clock: StageClock) -> DumpSummary:
    out = Path(cfg.out)
    pad = getattr(tokenizer, "pad_token_id", None)
    d = ShardProducer(cfg, source, encoder, mapping, config, pad if pad is not None else 0, clock)
    for tmp in out.glob(f".tmp-{cfg.worker_tag}*"):
        tmp.unlink()  # this worker's unfinished temporary files: never part of the dataset
    if existing is None:
        d.manifest = {"format": FORMAT, "config": config, "shards": [], "complete": False,
                      "tail": None, "summary": None}
        d.save_manifest()
    else:
        d.manifest = existing
    if d.manifest["shards"]:
        Progress.announcer(cfg.progress)(f"checking the {len(d.manifest['shards'])} finished shards in {out} "
                                         f"({'sizes only' if cfg.trust_existing else 'sha256 of each'})")
    # Finished shards: check them, account for every row and shard file (re-adopting an
    # unlisted shard, e.g. one renamed just before a kill), then recompute what is lost.
    plan = plan_repairs(d, hash_it=not cfg.trust_existing, log=log)
    head = _LMHeadWriter(d, source, cfg) if cfg.mode == "hidden" else None

    d.writer = ShardWriter(out, d.record, d.config_sha, d.fields, cfg.worker_tag, threads=cfg.writer_threads)

    def put(job: ShardJob) -> None:
        with clock.stage("wait for a writer"):
            d.writer.put(job)

    try:
        repaired = regenerate(d, plan, put)
        written = 0
        finishing = not d.manifest["complete"]
        if finishing:
            with d.lock:  # the last listed shard: repairs still being committed lie before it
                last = d.manifest["shards"][-1] if d.manifest["shards"] else None
            start = last["rows"][1] if last else 0
            first = last["first_sample"] + last["num_samples"] if last else 0
            next_index = last["index"] + 1 if last else 0
            total_rows = count_rows(cfg.data)
            owned = len(range(cfg.shard_index, total_rows, cfg.num_shards))
            done = len(range(cfg.shard_index, start, cfg.num_shards))
            progress = Progress(owned, done, cfg.progress)
            progress.say(f"{f'resuming after {next_index} shards at' if last else 'starting at'} "
                         f"row {start:,}: {owned - done:,} of {owned:,} rows left")
            shards = d.produce(start, first, next_index, progress, child=child)
            try:
                for job in shards:
                    put(job)
                    written += 1
            finally:
                shards.close()  # its threads end now, not when a traceback lets go of it
                progress.close()
        with clock.stage("drain writers"):
            d.writer.close()
        if head is not None:
            with clock.stage("wait for LM head"):
                head.join()  # the dump is complete only with its LM head
        if finishing:
            d.tail["rows"][1] = total_rows
            with d.lock:
                d.manifest["tail"] = d.tail
                d.manifest["complete"] = True
                d.manifest["summary"] = summary_json(d.manifest)
                d.save_manifest()
        elif d.manifest.get("summary") != summary_json(d.manifest):  # repaired, or edited
            with d.lock:
                d.manifest["summary"] = summary_json(d.manifest)
                d.save_manifest()
    finally:
        d.copier.close()
        if d.writer.error is None:
            d.writer.close()
        if head is not None:
            head.wait()  # never leave it writing; its error, if any, was raised above
    for entry in plan.damaged:  # a regenerated shard must reproduce the bytes it replaced
        now = next(e for e in d.manifest["shards"] if e["index"] == entry["index"])
        if now["sha256"] != entry["sha256"]:
            log(f"warning: regenerated {entry['file']} differs from the original bytes "
                f"(different hardware or library versions?); the manifest now records the new hash")
    return summary_of(
        cfg, d.manifest, run_samples=d.run_samples, run_tokens=d.run_tokens, run_bytes=d.writer.bytes_written,
        run_seconds=time.perf_counter() - t_start, shards_written=written, shards_adopted=plan.adopted,
        shards_repaired=repaired, run_child_rows=child.rows if child is not None else 0)


class _LMHeadWriter:
    """Checks or writes ``lm_head.safetensors`` on a background thread.

    The 8B head is 1 GB (hash, device-to-host copy, write): in line it cost seconds of
    engine time per dump. The manifest records the head once it is complete; :meth:`join`
    (before the dump is marked complete) re-raises a failure."""

    def __init__(self, d: ShardProducer, source: TargetSource, cfg: DumpConfig):
        self.d, self.source = d, source
        self.path, self.tag = Path(cfg.out) / LM_HEAD_FILE, cfg.worker_tag
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="eagle3-lm-head", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            rec = self.d.manifest.get("lm_head")
            if rec is not None and self.path.is_file() and sha256_file(self.path) == rec["sha256"]:
                return
            head = self.source.lm_head()
            if head.weight.is_cuda:
                self.d.copier.prepare_pinning()
            sha, size = save_lm_head(self.path, head, self.tag)
            with self.d.lock:
                self.d.manifest["lm_head"] = {"file": LM_HEAD_FILE, "bytes": size, "sha256": sha}
                self.d.save_manifest()
        except BaseException as e:  # re-raised by join()
            self.error = e

    def wait(self) -> None:
        self._thread.join()

    def join(self) -> None:
        self.wait()
        if self.error is not None:
            raise RuntimeError(f"writing {LM_HEAD_FILE} failed: {self.error}") from self.error
