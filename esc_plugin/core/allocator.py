"""Keep freed heap memory in the process, so repeated forwards do not page-fault it back in.

Every evaluation of a search runs the model on the same calibration batches,
allocating and freeing the same activation tensors of up to tens of megabytes.
glibc's malloc hands such memory back to the operating system when it is freed
(it trims the top of the heap, and once a trim threshold is set its mmap
threshold stops adapting), so the next evaluation faults the pages in and
zeroes them again; on a small CNN such as honk that is a large part of each
evaluation on CPU. :func:`keep_freed_memory` pins glibc's mmap threshold
at its largest value, turns trimming off in practice and pads the heap top, so
the evaluations reuse the memory of the first one. The process keeps its peak
heap until it exits, which a calibration run reaches anyway. The arithmetic
is unchanged (torch aligns its buffers itself), so are the results.

The settings are process-wide and cannot be undone, so esc_plugin applies them
only in processes it owns: its Ray actors and the ``esc-quantize`` command. A
calibration script can call it once at its start.

Example
-------
Skipped by the doctests: it would change the test process for good.

>>> from esc_plugin.core.allocator import keep_freed_memory
>>> keep_freed_memory()  # doctest: +SKIP
True
"""
import ctypes
import os
import platform

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# The environment variables that set them: a user who tuned malloc keeps their settings.
USER_TUNING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")
# glibc refuses an mmap threshold above DEFAULT_MMAP_THRESHOLD_MAX (4 MiB x sizeof(long)): 32 MiB on 64-bit
MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_applied = None  # the first call's answer: the settings are per process


def keep_freed_memory():
    """Apply the settings (once per process); True when they are in effect.

    False, and nothing changed, off glibc or when the environment sets one of
    :data:`USER_TUNING`.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply():
    if any(name in os.environ for name in USER_TUNING) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: it is the one glibc may refuse (then the others would make it worse)
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(M_TOP_PAD, TOP_PAD))
