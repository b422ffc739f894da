"""Rendering chats in a child process, for the dump.

Owns :class:`RenderProcess` (the parent's side), :func:`iter_samples_handover` (the
dump's sample stream) and :func:`main` (the child, ``python -m
eagle3_target.dump.render``). The child imports no torch: ``eagle3_target.dump``
loads its names lazily, and this module needs only the data modules.

Why a process: the chat template is pure Python, and on a thread of the dump it shares
the GIL with the engine. PyTorch drops the GIL around every op it dispatches, so a busy
render thread takes it at each of the engine's kernel launches and the engine waits to
take it back: on an H100 the 8B target ran 6-13% slower inside a dump than alone, and
2-5% slower with this child (docs/benchmarks.md). In a child the template runs on a
core of its own, and the parent only unpacks frames of token ids.

Why a handover: the child needs time to start (it loads the parent's tokenizer class
directly, without ``AutoTokenizer``'s imports of torch and model configurations, but
that is still ~0.5 s here and more on a loaded GPU host), so the parent renders rows
itself until the child says it is ready, then hands over at its next row. Both sides run
the same :class:`ChatEncoder` settings on the same tokenizer: the child proves it with
the tokenizer's fingerprint, and the parent renders the handover row itself too and
drops a child whose render of it differs. So the samples, and the dump's bytes, do not
depend on when (or whether) the handover happens.

Protocol, no pickles: the parent writes two JSON lines to the child's stdin, first
``{"tokenizer": DIR, "class": "module:qualname"}``, then (once the child is ready) a
:class:`RenderJob`. The child
answers with frames on its stdout, ``kind (1 byte) | payload length (uint64 LE) |
payload``:

- ``R`` ready: JSON ``{"fingerprint": sha256 of the tokenizer}``
- ``S`` sample: ``row int64, n int64, lost int64, input_ids int32[n], loss_mask uint8[n]``
  (LE; ``lost``: the supervised tokens ``max_length`` cut, -1 for a row not truncated)
- ``K`` skipped row: JSON of :meth:`Skipped.to_json`
- ``E`` end of the rows
- ``X`` error: JSON ``{"error": message}``
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import Sample, Skipped, encode_row
from eagle3_target.data.rows import MAX_ROW_BYTES, iter_raw_rows, worker_owns
from eagle3_target.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from eagle3_target.wire.frames import FrameReader, die_with_parent, write_frame

__all__ = ["RenderJob", "RenderProcess", "iter_samples_handover", "main", "POLL_SECONDS"]

POLL_SECONDS = 0.02
"""How often the stream asks whether the child is ready: not every row, since each
question is a system call, and a GIL release the engine's thread then waits to win back."""

_SAMPLE = struct.Struct("<qqq")


@dataclass(frozen=True)
class RenderJob:
    """The rows the child renders, and the :class:`ChatEncoder` settings it renders them with."""

    paths: list[str]
    start: int
    num_shards: int
    shard_index: int
    max_length: int | None
    mask_reasoning: bool
    vocab_size: int | None
    use_template_mask: bool
    max_context: int | None = None
    max_row_bytes: int = MAX_ROW_BYTES

    @classmethod
    def of(cls, paths: Sequence[str | Path], encoder: ChatEncoder, start: int,
           num_shards: int, shard_index: int) -> "RenderJob":
        return cls([str(p) for p in paths], start, num_shards, shard_index, encoder.max_length,
                   encoder.mask_reasoning, encoder.vocab_size, encoder.use_template_mask,
                   encoder.max_context, encoder.max_row_bytes)

    def encoder(self, tokenizer: Any) -> ChatEncoder:
        """The :class:`ChatEncoder` that :meth:`of` read these settings from, rebuilt on
        ``tokenizer`` (the child's)."""
        enc = ChatEncoder(tokenizer, max_length=self.max_length, mask_reasoning=self.mask_reasoning,
                          vocab_size=self.vocab_size, use_template_mask=self.use_template_mask,
                          max_context=self.max_context, max_row_bytes=self.max_row_bytes)
        if enc.use_template_mask != self.use_template_mask:
            raise RuntimeError("the child cannot use the template's assistant mask as the parent does")
        return enc

    def keeps(self, row: int) -> bool:
        return worker_owns(row, self.num_shards, self.shard_index)


class RenderProcess:
    """A child process that renders rows for this process.

    ``RenderProcess(tokenizer_dir, fingerprint, tokenizer_class)`` starts it; :meth:`ready`
    says, without waiting, whether it has loaded the tokenizer (and that it is the same
    tokenizer: ``fingerprint`` is :func:`~eagle3_target.data.tokenizer.tokenizer_fingerprint`
    of the parent's; ``tokenizer_class`` its :func:`~eagle3_target.data.tokenizer.tokenizer_class_name`,
    None to resolve it with ``AutoTokenizer``);
    :meth:`samples` hands it a job and yields what it renders; :meth:`close` ends it.
    A child that fails before it is ready is never used (``failure`` says why); one that
    fails after is an error of the dump (RuntimeError)."""

    def __init__(self, tokenizer_dir: str, fingerprint: str, tokenizer_class: str | None = None):
        import eagle3_target

        self.fingerprint = fingerprint
        self.failure: str | None = None
        self.first_row: int | None = None
        """The row the child took over at (None: it rendered nothing)."""
        self.rows = 0
        """Rows (samples and skipped) the child has rendered."""
        self._ready = False
        env = dict(os.environ)
        # The child imports this package from wherever the parent did (an editable
        # install, a PYTHONPATH), and never claims a GPU.
        pkg_root = str(Path(eagle3_target.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
        env["CUDA_VISIBLE_DEVICES"] = ""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "eagle3_target.dump.render"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in, self._out = self._proc.stdin, self._proc.stdout
        self._frames = FrameReader(self._out.fileno())
        self._send({"tokenizer": tokenizer_dir, "class": tokenizer_class})

    def _send(self, obj: dict[str, Any]) -> None:
        try:
            self._in.write(json.dumps(obj).encode() + b"\n")
            self._in.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone; reading its output says why

    def ready(self) -> bool:
        """True once the child has loaded the same tokenizer; never blocks on it."""
        if self._ready or self.failure is not None:
            return self._ready
        if not select.select([self._out], [], [], 0)[0]:
            return False
        kind, payload = self._frames.frame()
        if kind == b"R":
            got = json.loads(payload).get("fingerprint")
            if got == self.fingerprint:
                self._ready = True
            else:
                self.failure = "the child loaded a different tokenizer (fingerprint mismatch)"
        elif kind == b"X":
            self.failure = json.loads(payload).get("error", "unknown error")
        else:
            self.failure = f"the child exited before it was ready (exit code {self._proc.poll()})"
        if self.failure is not None:
            self.close()
        return self._ready

    def wait_ready(self, timeout: float) -> bool:
        """Blocks up to ``timeout`` seconds for :meth:`ready`."""
        if not self._ready and self.failure is None:
            select.select([self._out], [], [], timeout)
        return self.ready()

    def samples(self, job: RenderJob) -> Iterator[Sample | Skipped]:
        """What :func:`~eagle3_target.data.chat.iter_samples` yields for ``job``'s rows, rendered
        by the child. Call once, after :meth:`ready` returned True."""
        if not self._ready:
            raise RuntimeError("the render process is not ready")
        self._send({"job": asdict(job)})
        self.first_row = job.start
        last = job.start - 1
        while True:
            kind, payload = self._frames.frame()
            if kind == b"S":
                row, n, lost = _SAMPLE.unpack_from(payload)
                if len(payload) != _SAMPLE.size + 5 * n:
                    raise RuntimeError(f"the render process sent a malformed frame for row {row}")
                ids = np.frombuffer(payload, dtype="<i4", count=n, offset=_SAMPLE.size).tolist()
                mask = np.frombuffer(payload, dtype=np.uint8, count=n, offset=_SAMPLE.size + 4 * n).tolist()
                last = row
                self.rows += 1
                yield Sample(row, ids, mask, None if lost < 0 else lost)
            elif kind == b"K":
                s = Skipped(**json.loads(payload))
                last = s.row
                self.rows += 1
                yield s
            elif kind == b"E":
                return
            elif kind == b"X":
                raise RuntimeError(f"the render process failed after row {last}: "
                                   f"{json.loads(payload).get('error')}")
            else:
                raise RuntimeError(f"the render process exited after row {last} without finishing "
                                   f"(exit code {self._proc.wait()})")

    def reject(self, why: str) -> None:
        """Stops using the child (``failure`` says why); what it rendered does not count."""
        self.failure, self._ready, self.rows, self.first_row = why, False, 0, None
        self.close()

    def close(self) -> None:
        for f in (self._in, self._out):
            try:
                f.close()
            except OSError:
                pass
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def __enter__(self) -> "RenderProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def iter_samples_handover(paths: Sequence[str | Path], encoder: ChatEncoder, *, start: int = 0,
                          num_shards: int = 1, shard_index: int = 0,
                          child: RenderProcess | None = None) -> Iterator[Sample | Skipped]:
    """Samples and skipped rows in row order, as :func:`~eagle3_target.data.chat.iter_samples`
    gives them with ``keep`` = rows ``r % num_shards == shard_index``: rendered here until
    ``child`` is ready, by the child from the next row on."""
    job = RenderJob.of(paths, encoder, start, num_shards, shard_index)
    next_poll = 0.0
    for raw in iter_raw_rows(paths, start=start, keep=job.keeps, max_row_bytes=encoder.max_row_bytes):
        mine = None
        if child is not None and (now := time.monotonic()) >= next_poll:
            next_poll = now + POLL_SECONDS
            if child.ready():
                theirs = child.samples(replace(job, start=raw.index))
                mine = encode_row(raw, encoder)
                if next(theirs, None) == mine:
                    yield mine
                    yield from theirs
                    return
                child.reject(f"its render of row {raw.index} differs from this process's")
                child = None
        yield mine if mine is not None else encode_row(raw, encoder)


def _sample_payload(s: Sample) -> bytes:
    lost = -1 if s.lost_supervised is None else s.lost_supervised
    return (_SAMPLE.pack(s.row, len(s.input_ids), lost) + np.asarray(s.input_ids, dtype="<i4").tobytes()
            + np.asarray(s.loss_mask, dtype=np.uint8).tobytes())


# --------------------------------------------------------------------------- child


def main() -> int:
    die_with_parent()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print from a library goes to stderr, not into the frames
    # The parent loaded the same tokenizer and showed its warnings once already.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        first = sys.stdin.readline()
        if not first:
            return 0
        spec = json.loads(first)
        tokenizer = load_tokenizer(spec["tokenizer"], spec.get("class"))
        write_frame(out, b"R", json.dumps({"fingerprint": tokenizer_fingerprint(tokenizer)}).encode())
        line = sys.stdin.readline()
        if not line:
            return 0  # the parent finished without us
        job = RenderJob(**json.loads(line)["job"])
        encoder = job.encoder(tokenizer)
        for raw in iter_raw_rows(job.paths, start=job.start, keep=job.keeps, max_row_bytes=job.max_row_bytes):
            item = encode_row(raw, encoder)
            if isinstance(item, Sample):
                write_frame(out, b"S", _sample_payload(item))
            else:
                write_frame(out, b"K", json.dumps(item.to_json()).encode())
        write_frame(out, b"E", b"")
        return 0
    except BrokenPipeError:
        return 0  # the parent stopped reading: it is done or gone
    except BaseException as e:  # told to the parent, which raises it
        try:
            write_frame(out, b"X", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
