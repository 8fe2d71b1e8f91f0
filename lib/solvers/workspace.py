"""Scratch buffers that a solver keeps from one call to the next.

A limited-memory solver needs O(m D) scratch memory per call. Fresh memory from the operating
system costs a page fault per 4 KiB on first touch, a visible share of a CPU solver step (docs/performance.md:
"Where the solver's time goes"). A :class:`SolverWorkspace`, owned by the model and handed to
its solvers (L-Broyden and Anderson), lends the same buffer back on the next call instead. (The process-wide
:func:`mdeq.utils.cpu_allocator.retain_freed_memory` does not cover it: glibc always maps blocks
above 32 MiB afresh, and a solver's history is usually larger.)

On CUDA nothing is kept (:meth:`SolverWorkspace.take` hands out fresh memory): PyTorch's caching
allocator already reuses device memory, and a buffer kept alive across the rest of a training
step would raise its peak.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


class SolverWorkspace:
    """A pool of scratch tensors, at most one per (trailing shape, dtype, device), safe across threads.

    :meth:`take` lends a tensor with *at least* the leading size asked for (a solve with a lower
    threshold reuses the buffer of one with a higher threshold); :meth:`give` returns it.
    """

    def __init__(self) -> None:
        self._free: Dict[Tuple, Tensor] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(shape: Sequence[int], like: Tensor) -> Tuple:
        return tuple(int(s) for s in shape[1:]), like.dtype, like.device

    def take(self, shape: Sequence[int], like: Tensor) -> Tensor:
        """An uninitialised tensor with ``like``'s dtype and device, of ``shape`` or, on the CPU, of a
        larger leading size (slice it)."""
        if like.device.type == "cpu":
            with self._lock:
                buf = self._free.pop(self._key(shape, like), None)
            if buf is not None and buf.shape[0] >= shape[0]:
                return buf
        return like.new_empty(tuple(shape))

    def give(self, buf: Tensor) -> None:
        """Return ``buf`` (from :meth:`take`, unsliced) for the next call."""
        if buf.device.type != "cpu":
            return
        with self._lock:
            key = self._key(buf.shape, buf)
            kept = self._free.get(key)
            if kept is None or kept.shape[0] <= buf.shape[0]:
                self._free[key] = buf

    def __getstate__(self) -> dict:        # copies and pickles of a model start with an empty pool
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def clear(self) -> None:
        """Release every kept buffer."""
        with self._lock:
            self._free = {}


def take(workspace: Optional[SolverWorkspace], shape: Sequence[int], like: Tensor) -> Tensor:
    """``workspace.take(shape, like)``, or fresh memory of ``shape`` without a workspace."""
    return workspace.take(shape, like) if workspace is not None else like.new_empty(tuple(shape))
