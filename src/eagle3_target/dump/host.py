"""Host copies: a batch's outputs from the GPU to pinned host memory, off the thread
that drives the engine, and the pinned pool's growth.

On a GPU host a pageable device-to-host copy ran at ~1.5 GB/s (page faults on fresh
memory) and a pinned one at ~54 GB/s (an H100 host); pinning fresh memory costs
~0.35 s/GB the first time, and torch caches pinned blocks afterwards. Both happen on a
copy thread and CUDA stream of their own (:class:`HostCopier`), so the next forward
starts at once. CPU tensors need no copy.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from eagle3_target.dump.config import pin_threads_ok

__all__ = ["HostCopier", "host_copy", "threaded_pinning", "set_allocator_settings", "done"]


def done(value: Any) -> Future:
    """A future that already holds ``value``."""
    f: Future = Future()
    f.set_result(value)
    return f


class HostCopier:
    """Copies a batch's outputs to host memory on a thread and CUDA stream of its own.

    On the H100 host a pageable device-to-host copy ran at ~1.5 GB/s, which held the
    dump to a third of the engine; a pinned one runs at ~54 GB/s, but pinning fresh
    memory costs ~0.35 s/GB the first time (torch caches the blocks afterwards). Both
    happen here, off the thread that drives the engine, so the next forward starts at
    once. CPU outputs need no copy and come back as they are."""

    def __init__(self, pin_threads: int = 0) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, Any] = {}
        self._pin_threads = pin_threads
        self._pinning = threading.Lock()
        self._pinning_set = False

    def prepare_pinning(self) -> None:
        """Applies ``pin_threads`` (once) before this dump's first pinned allocation,
        whichever thread makes it: the LM head's 1 GB copy usually comes first."""
        with self._pinning:
            if not self._pinning_set:
                threaded_pinning(self._pin_threads)
                self._pinning_set = True

    def submit(self, flat: dict[str, torch.Tensor]) -> Future:
        some = next(iter(flat.values()))
        if not some.is_cuda:
            return done(flat)
        ready = torch.cuda.Event()
        ready.record()  # the outputs are complete once the engine's stream gets here
        if self._pool is None:
            self.prepare_pinning()
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagle3-d2h")
        return self._pool.submit(self._copy, flat, ready, some.device)

    def _copy(self, flat: dict[str, torch.Tensor], ready: Any, device: torch.device) -> dict[str, torch.Tensor]:
        with torch.cuda.device(device):
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            stream.wait_event(ready)
            with torch.cuda.stream(stream):  # each copy waits on this stream only
                return {k: host_copy(v) for k, v in flat.items()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)



def threaded_pinning(threads: int) -> str | None:
    """Makes torch grow its pinned host pool by malloc, page faults on ``threads``
    threads and ``cudaHostRegister`` instead of one ``cudaHostAlloc`` per block; returns
    the setting applied, or None where it was left alone (``threads == 0``, or the user
    set a ``pinned_`` option in ``PYTORCH_CUDA_ALLOC_CONF``/``PYTORCH_ALLOC_CONF``).

    Why: on an H100 host ``cudaHostAlloc`` pinned ~1.5 GB/s and held the driver lock
    the engine's launches also need; with 8 threads the dump's ~3 GiB pool took 0.5 s
    instead of 2.5 s. The setting is torch's, process-wide, and read at each new block.
    """
    if threads <= 0:
        return None
    if not pin_threads_ok(threads):
        raise ValueError(f"pin threads must be a power of two up to 128 (torch's rule), got {threads}")
    if any("pinned_" in os.environ.get(v, "") for v in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return None
    conf = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
    set_allocator_settings(conf)
    return conf


def set_allocator_settings(conf: str) -> None:
    """torch's allocator options at run time (the ``PYTORCH_CUDA_ALLOC_CONF`` syntax)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch before 2.9
        setter = torch.cuda.memory._set_allocator_settings
    setter(conf)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor (a pinned copy when ``t`` is on a GPU).

    Pageable device-to-host copies ran at ~1.5 GB/s on an H100 host (page faults on
    fresh memory), pinned ones at ~54 GB/s; torch caches pinned blocks, so the next
    batch of the same size reuses them.
    """
    if not t.is_cuda:
        return t.to("cpu").contiguous()
    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    h.copy_(t)
    return h
