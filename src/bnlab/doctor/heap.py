"""Letting the ``bnlab doctor`` process keep and reuse the memory of freed tensors.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB when it adapts the
threshold itself) with a fresh ``mmap`` and unmaps it on ``free``. A 16-channel 28x28 float32
activation at the doctor's batch of 1000 is 50 MB, so each such tensor of each training step
was mapped, page-faulted in page by page (the kernel zeroing every page) and unmapped again.
Raising the mmap and trim thresholds makes those blocks come from the heap and stay there
between steps. Numbers, same machine, one sitting, before/after interleaved (docs/speed.md):
``/usr/bin/time -v bnlab doctor a_shared_cnn.py:SharedBNCNN --data mnist --json`` went from
15.8 million minor page faults and 35 s of system time to 0.28 million and 1 s; the
findings were the same.

Only the command-line process calls :func:`reuse_freed_memory`: a notebook that imports
``bnlab.doctor`` keeps its own allocator settings (tests/doctor/test_doctor_heap.py).
"""

from __future__ import annotations

import ctypes
import sys

# mallopt's parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# 1 GiB: far above any single activation the doctor's probes make on a CPU, and within
# mallopt's int argument. Freed blocks up to this size stay in the heap for the next step;
# the process is short-lived, so keeping them costs nothing after it exits.
KEEP_BYTES = 1 << 30


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed large blocks for reuse; True when it accepted.

    False, and nothing changed, where the C library is not glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: no mallopt to call
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The trim threshold first: with it low, glibc would hand the kept blocks back at once.
    trimmed = mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    return trimmed and mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1
