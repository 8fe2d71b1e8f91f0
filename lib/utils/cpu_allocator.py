"""Keep freed CPU memory inside the process, so that tensors do not page-fault on every allocation.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a large block (above a
threshold that it adapts up to 32 MiB) with ``mmap`` and hands it back to the kernel on ``free``,
and it also trims the top of its heap once more than a threshold of it is free. Each new tensor
then starts on fresh pages, and the kernel zeroes and maps them one 4 KiB page fault at a time.
An MDEQ training step allocates and frees the same large activations (and solver vectors)
hundreds of times, so page faults become a large share of a CPU training step (docs/performance.md: "CPU
settings that matter more than the solver" has the figures).

:func:`retain_freed_memory` fixes glibc's thresholds with ``mallopt``: blocks up to
``mmap_threshold`` come from the heap, and the heap keeps up to ``trim_threshold`` of freed
memory for the next allocation. The process's resident size then stays at its high-water mark
instead of going up and down (the peak itself does not change). Other C libraries (musl, macOS)
are left alone. The programs under ``tools/`` call it at start-up; call it yourself when you
train from a notebook. (``LD_PRELOAD`` of jemalloc or tcmalloc does the same job from outside.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1      # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20   # glibc refuses larger values on 64-bit systems


def retain_freed_memory(mmap_threshold: int = _MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30) -> bool:
    """Tell glibc's ``malloc`` to reuse freed memory instead of returning it to the kernel.

    Args:
        mmap_threshold: blocks up to this size (bytes, at most 32 MiB) come from the heap.
        trim_threshold: free memory (bytes) the heap keeps before it shrinks.

    Returns:
        True when both thresholds were set; False on a C library other than glibc (nothing
        changed) or when glibc refused a value.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logger.debug("not glibc: the C allocator is left as it is")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_threshold = min(int(mmap_threshold), _MMAP_THRESHOLD_MAX)
    trim_threshold = min(int(trim_threshold), 2 ** 31 - 1)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if ok:
        logger.debug("malloc keeps freed memory: mmap threshold %d B, trim threshold %d B",
                     mmap_threshold, trim_threshold)
    return ok
