"""Freed CPU memory kept by the process for the next step while thaw trains or scores, handed back when it is done.

glibc's malloc serves every block above its mmap threshold (which grows to 32 MB at most, so a
batch's large activations) with a fresh mapping, and unmaps it when the tensor is freed: each step
then faults in and zeroes those pages again. Served from the heap and never trimmed, a step reuses
the pages the step before freed: on the 2-core CPU mobilenet_v2's full fine-tuning phase ran 1.5x
faster and the caching pass 2x (benchmarks/throughput.py, which gives its compute limit the same
settings). It changes where memory comes from, never what is computed (tested). While thaw works the
process holds the memory of its largest step; when a run, an evaluation or a prediction ends, the
free memory goes back to the kernel (malloc_trim). The settings stay for the rest of the process:
glibc cannot be given its dynamic threshold back. THAW_KEEP_FREED_MEMORY=0 leaves malloc as it
was. Elsewhere than Linux with glibc nothing changes. Measured for the thread that trains only (other
threads allocate from glibc's per-thread heaps); worker processes started by spawn do not inherit it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from contextlib import contextmanager
from typing import Iterator

OPT_OUT = "THAW_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
NEVER = -1  # as M_TRIM_THRESHOLD: glibc reads it as the largest size, so the heap is never trimmed

_applied = False
given_back = 0  # times the free memory went back to the kernel (tests read it)


def keep_freed_memory() -> bool:
    """Large blocks from the heap and a heap that is never trimmed, once per process (the workers it forks
    inherit it). Returns whether malloc now works so."""
    global _applied
    if _applied or os.environ.get(OPT_OUT, "1") == "0":
        return _applied
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER) == 1
    return _applied


def give_back_free_memory() -> None:
    """Hand the heap's free memory back to the kernel, where keep_freed_memory() kept it."""
    global given_back
    if _applied:  # so glibc on Linux
        malloc_trim = ctypes.CDLL(None).malloc_trim
        malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        malloc_trim(0)
        given_back += 1


@contextmanager
def memory_kept_between_steps() -> Iterator[None]:
    """keep_freed_memory() while the block (or a decorated function) runs; its free memory back when it ends."""
    keep_freed_memory()
    try:
        yield
    finally:
        give_back_free_memory()
