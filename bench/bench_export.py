"""Export throughput against the dump's own write path, at the 8B shape, as a Markdown table.

    python bench/bench_export.py [--tokens 4096] [--shape 4096,128256,32000,bfloat16]
                                 [--max-length 512] [--workdir DIR]
    python bench/bench_export.py --dump DIR --vocab V --model M   # export an existing dump

Without ``--dump``: a synthetic target of the given shape (H, V, Vd, dtype; default the
Llama-3.1-8B shape) answers every batch with the same precomputed random tensors, so
the dump's time is its write path (render, pack, gather, host copy, hash, write, fsync,
rename, manifest) and not a model; it writes a ``draft`` dump with ``--with-prenorm``
(the one dump both formats export from) of the bundled sample chats repeated to
``--tokens``, rendered with the built-in tiny model's tokenizer. Then each format is
exported from it. Per row: MB/s and tokens/s of the bytes written, and bytes per real
token (a NeMo cache pads every sample to ``seq_length``; speculators stores
``[S,4,H]`` per token). With ``--dump``, only the exports run, over that dump.

The NeMo export also writes ``target_embeddings.safetensors`` once (``V x H`` fp32:
2.1 GB at the 8B shape); the synthetic run takes the tiny model's, so the table counts
the shards and manifest only, and says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from eagle3_target.contract import Eagle3TargetBatch
from eagle3_target.data.rows import sample_data_path
from eagle3_target.data.tokenizer import load_tokenizer
from eagle3_target.dump import DumpConfig, run_dump
from eagle3_target.export import export
from eagle3_target.tiny import resolve_model
from eagle3_target.vocab import VocabMapping

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inprocess import cpu_name  # noqa: E402


BATCH_TOKENS = 8192  # the dump's default: a padded batch never holds more


class SyntheticTarget:
    """A target source of the given shape that computes nothing: every call slices the
    same random tensors (made once), so what is timed is the dump's own work."""

    def __init__(self, h: int, v: int, dtype: torch.dtype, max_tokens: int):
        g = torch.Generator().manual_seed(0)
        self.hidden_size, self.vocab_size, self.dtype = h, v, dtype
        self.aux_layer_ids = [1, 15, 28]
        self._aux = torch.randn(max_tokens, 3 * h, generator=g).to(dtype)
        self._pre = torch.randn(max_tokens, h, generator=g).to(dtype)
        self._probs: torch.Tensor | None = None

    def set_vocab_mapping(self, mapping: VocabMapping) -> None:
        g = torch.Generator().manual_seed(1)
        n = self._aux.shape[0]
        self._probs = torch.softmax(torch.randn(n, mapping.draft_vocab_size, generator=g), dim=-1)

    def _rows(self, t: torch.Tensor, b: int, s: int) -> torch.Tensor:
        return t[: b * s].reshape(b, s, -1)

    def generate_batch(self, ids, attn, lmask) -> Eagle3TargetBatch:
        b, s = ids.shape
        return Eagle3TargetBatch(aux_hidden_states=self._rows(self._aux, b, s), input_ids=ids, attention_mask=attn,
                                 loss_mask=lmask, target_probs=self._rows(self._probs, b, s).clone(),
                                 position_mask=lmask.bool()[..., None].clone())

    def generate_prenorm(self, ids, attn, lmask):
        b, s = ids.shape
        return self._rows(self._aux, b, s), self._rows(self._pre, b, s)

    def close(self) -> None:
        pass


def chats_with(tokens: int, folder: Path, max_length: int) -> Path:
    """The bundled sample chats, repeated until they hold about ``tokens`` tokens."""
    from eagle3_target.data.chat import ChatEncoder
    from eagle3_target.data.samples import iter_samples

    lines = sample_data_path().read_text().splitlines()
    tok = load_tokenizer(resolve_model(None))
    one = folder / "one.jsonl"
    one.write_text("\n".join(lines) + "\n")
    per_pass = sum(len(s) for s in iter_samples([one], ChatEncoder(tok, max_length=max_length))
                   if hasattr(s, "input_ids"))
    out = folder / "chats.jsonl"
    reps = max(1, -(-tokens // per_pass))
    n_lines = max(1, min(len(lines) * reps, round(len(lines) * tokens / per_pass)))
    out.write_text("\n".join((lines * reps)[:n_lines]) + "\n")
    return out


def tree_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--shape", default="4096,128256,32000,bfloat16", help="H,V,Vd,dtype")
    p.add_argument("--max-length", type=int, default=512, help="the dump's --max-length (NeMo's seq_length)")
    p.add_argument("--dump", default=None, help="export this dump instead of a synthetic one")
    p.add_argument("--vocab", default=None, help="with --dump: the draft vocabulary")
    p.add_argument("--model", default=None, help="with --dump: the dump's model")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--formats", default="speculators,nemo", help="comma-separated formats to export")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.workdir))
    rows = []
    try:
        if args.dump is None:
            h, v, vd, dts = args.shape.split(",")
            h, v, vd, dtype = int(h), int(v), int(vd), getattr(torch, dts)
            data = chats_with(args.tokens, work, args.max_length)
            mapping = VocabMapping.from_ids(torch.arange(vd, dtype=torch.int64), v)
            vocab = work / "vocab.safetensors"
            mapping.save(vocab)
            source = SyntheticTarget(h, v, dtype, max_tokens=BATCH_TOKENS)
            dump = work / "dump"
            cfg = DumpConfig(out=str(dump), data=[str(data)], mode="draft", vocab=str(vocab), with_prenorm=True,
                             max_length=args.max_length, batch_tokens=BATCH_TOKENS, shard_size_mb=256)
            t0 = time.perf_counter()
            s = run_dump(cfg, source=source, tokenizer=load_tokenizer(resolve_model(None)), log=lambda x: None)
            secs = time.perf_counter() - t0
            tokens = s.tokens
            rows.append(("dump (draft + prenorm): our write path", secs, s.bytes, tokens))
            model = resolve_model(None)
            what = f"synthetic H={h}, V={v}, Vd={vd}, {dts}"
        else:
            dump, vocab, model = Path(args.dump), args.vocab, args.model
            m = json.loads(next(dump.glob("manifest*.json")).read_text())
            tokens = m["summary"]["tokens"] if m.get("summary") else None
            what = f"dump {dump} ({m['config']['mode']}, H={m['config']['hidden_size']})"
        formats = {"speculators": {}, "nemo": {"vocab": str(vocab), "model": str(model)}}
        for to, kw in ((f, formats[f]) for f in args.formats.split(",")):
            out = work / f"export-{to}"
            t0 = time.perf_counter()
            es = export(to, str(dump), str(out), **({"vocab": str(vocab)} if to == "speculators" else kw))
            secs = time.perf_counter() - t0
            emb = out / "target_embeddings.safetensors"
            written = tree_bytes(out) - (emb.stat().st_size if emb.is_file() else 0)
            rows.append((f"export --to {to}", secs, written, es.tokens))
            tokens = es.tokens
            shutil.rmtree(out)
        print(f"export vs the dump's write path, {what}; {tokens} tokens, CPU: {cpu_name()}\n")
        print("| step | seconds | MB written | MB/s | tokens/s | bytes/token |")
        print("|---|---|---|---|---|---|")
        for name, secs, nbytes, ntok in rows:
            print(f"| {name} | {secs:.2f} | {nbytes / 1e6:.1f} | {nbytes / 1e6 / secs:.0f} | {ntok / secs:.0f} "
                  f"| {nbytes / ntok:.0f} |")
        if args.json:
            Path(args.json).write_text(json.dumps([dict(zip(("step", "seconds", "bytes", "tokens"), r))
                                                   for r in rows], indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
