"""Process memory settings of the tile workers."""

from __future__ import annotations

import ctypes
import ctypes.util

MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc malloc.h


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> bool:
    """Cap this process's glibc malloc arenas at ``n`` (``mallopt(M_ARENA_MAX)``).

    Every thread that allocates may otherwise get an arena of its own that keeps the freed
    buffers of a forward pass (hundreds of MB on the CPU), so resident memory grows with the
    number of threads that ever ran a stage: measured on a 67 Mpx slide, 3,064 MiB with glibc's
    default and 2,502 MiB with 2 arenas (benchmarks/slide.md). Arenas that exist stay; call it
    before the worker threads start. Returns False where the C library has no ``mallopt``.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, int(n)))
    except (OSError, AttributeError):
        return False
