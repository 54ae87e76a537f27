"""Process memory settings of the tile workers."""

from __future__ import annotations

import ctypes
import ctypes.util

MALLOC_ARENAS = 1
MMAP_THRESHOLD_BYTES = 256 << 20  # buffers up to this size come from the heap, not from fresh mmaps
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory the heap keeps for the next forward pass
_M_ARENA_MAX, _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -8, -3, -1  # glibc malloc.h


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> bool:
    """Tune this process's glibc malloc for forward passes: at most ``n`` arenas
    (``M_ARENA_MAX``), buffers up to ``MMAP_THRESHOLD_BYTES`` from the heap, and up to
    ``TRIM_THRESHOLD_BYTES`` of freed heap kept.

    A forward pass on a CPU allocates and frees hundreds of MB of activations. With glibc's
    defaults the large ones are fresh mmaps, unmapped when freed, so every pass pages them in
    (zeroed) again: 10-13 s of the sample slide's 60 CPU seconds were system time. Kept in one
    heap they are reused: system time 2.7-3.5 s, peak memory 1.5-1.8 GB with one-tile batches
    against 2.2 GB before (benchmarks/cpu.md). Every thread that allocates may otherwise also
    get an arena of its own that keeps the freed buffers of a forward pass, so resident memory
    grows with the number of threads that ever ran a stage (benchmarks/slide.md). Arenas that
    exist stay; call it before the worker threads start. Returns False where the C library
    has no ``mallopt``.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, int(n)) and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
