"""The cloud process's allocator settings that keep its RSS within the stated budget (README, "Memory").

glibc serves large blocks with ``mmap`` and returns them to the system on ``free``, but it raises that threshold
to the size of each large block freed (up to 32 MiB on 64-bit), after which buffers of that size (upload bodies,
decoded frames) come from the heap arenas, one per thread, which keep freed memory: RSS then creeps above what is
live. Setting ``M_MMAP_THRESHOLD`` explicitly fixes the threshold (glibc ``mallopt(3)``: setting it disables the
dynamic adjustment), the same as the ``MALLOC_MMAP_THRESHOLD_`` environment variable. Measured with
``benchmarks/cloud_memory.py`` (4 clients, 26 uploads of 226 frames at 224 px): peak RSS 1.035 x the budget
without it, 0.887 x with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("cema_deploy.cloud")

#: ``M_MMAP_THRESHOLD`` in glibc's ``malloc.h``.
_M_MMAP_THRESHOLD = -3
#: Blocks from this size on are mmapped, and unmapped when freed.
MMAP_THRESHOLD = 1 << 20


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) was refused", nbytes)
    return ok
