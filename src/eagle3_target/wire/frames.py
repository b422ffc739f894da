"""Length-prefixed frames over a pipe: how this process talks to its children (the
dump's render process, an engine's tensor-parallel workers) without pickles, and a
child's tie to its parent (:func:`die_with_parent`).

A frame is ``kind (1 byte) | payload length (uint64 LE) | payload``; what a kind means
and what its payload holds (JSON, or packed little-endian arrays) is each protocol's
own. :class:`FrameReader` reads in large chunks: one ``read`` (a GIL release, and a wait
to take it back from a busy thread) per chunk of many frames, not two per frame.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
from typing import BinaryIO

__all__ = ["FRAME_HEADER", "FrameReader", "write_frame", "die_with_parent"]

FRAME_HEADER = struct.Struct("<cQ")


class FrameReader:
    """Frames from the pipe ``fd``."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.pos = 0

    def _fill(self, need: int) -> bool:
        while len(self.buf) - self.pos < need:
            data = os.read(self.fd, 1 << 20)
            if not data:
                return False
            if self.pos:
                del self.buf[: self.pos]
                self.pos = 0
            self.buf += data
        return True

    def buffered(self) -> bool:
        """Whether a whole frame is already read (so :meth:`frame` will not block)."""
        have = len(self.buf) - self.pos
        if have < FRAME_HEADER.size:
            return False
        _, n = FRAME_HEADER.unpack_from(self.buf, self.pos)
        return have >= FRAME_HEADER.size + n

    def frame(self) -> tuple[bytes, bytes]:
        """``(kind, payload)``; kind ``b""`` when the stream ended (the writer exited)."""
        if not self._fill(FRAME_HEADER.size):
            return b"", b""
        kind, n = FRAME_HEADER.unpack_from(self.buf, self.pos)
        if not self._fill(FRAME_HEADER.size + n):
            return b"", b""
        start = self.pos + FRAME_HEADER.size
        payload = bytes(self.buf[start : start + n])
        self.pos = start + n
        return kind, payload


def write_frame(f: BinaryIO, kind: bytes, payload: bytes) -> None:
    """One frame to ``f``, flushed."""
    f.write(FRAME_HEADER.pack(kind, len(payload)) + payload)
    f.flush()


def die_with_parent() -> None:
    """In a child process, on Linux: the kernel kills this process when its parent dies,
    even where a process the parent forked later still holds the pipes open."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
