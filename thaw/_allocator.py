"""Freed CPU memory kept by the process for the next training step instead of handed back to the kernel.

glibc's malloc serves every block above its mmap threshold (32 MB at most, so every large activation
of a batch) with a fresh mmap, and hands it back with munmap when the tensor is freed: each step then
faults in and zeroes those pages again. Served from the heap and never trimmed, a step reuses the
pages the step before freed. On the 2-core CPU that made mobilenet_v2's full fine-tuning step 1.38x
faster (benchmarks/throughput.py measures thaw's runs and the train-step limit with it). It changes
where memory comes from, never what is computed (tested: the same weights either way). The price: the
process keeps the memory of its largest step until it ends, as a pooling allocator would.
THAW_KEEP_FREED_MEMORY=0 leaves malloc as it was. Elsewhere than Linux with glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

OPT_OUT = "THAW_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # bytes of free memory at the heap's top before malloc trims it: the most mallopt takes

_applied = False


def keep_freed_memory() -> bool:
    """Large blocks from the heap and a heap that is never trimmed, once per process (its forked workers
    inherit it). Returns whether malloc now works so."""
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    return _applied
