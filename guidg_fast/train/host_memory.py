"""A steady heap for the CPU training loops (glibc malloc).

glibc serves every request above its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps
it on free. The vision encoder's activations are larger than that (at ViT-B/16 with 36 images one
MLP activation is 87 MB), so a plain process maps, page-faults (the kernel zeroes every 4 KiB page)
and unmaps gigabytes on every step: measured at ViT-B/16, 12 images per step, ~280,000 minor page
faults and 0.4-2.2 s of kernel time per forward + backward (20 s of CPU time). Inside
``steady_heap`` large blocks come from the heap instead and freed memory stays in the process, so
from the second step on a step takes no page faults at all (measured: 3-5,000 faults, 0.02 s of
kernel time; bench/README.md, "steady heap", gives the step-time effect). On leaving, glibc's
defaults are put back and the free memory is returned to the system (malloc_trim).

Only on the CPU, only under glibc; elsewhere a no-op. DataLoader workers started inside inherit
the settings (a worker's allocations are small images).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading

import torch

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_NEVER_TRIM = -1  # mallopt(3): "-1 disables trimming completely"

_lock = threading.Lock()
_depth = 0
_libc = None
_looked_up = False


def _glibc():
    """glibc's handle, or None under another C library (musl, macOS): the settings are glibc's."""
    global _libc, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # glibc only
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.mallopt.restype = ctypes.c_int
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = libc
        except (OSError, AttributeError):
            _libc = None
    return _libc


@contextlib.contextmanager
def steady_heap(device):
    """Large CPU blocks from a heap that keeps freed memory inside the block (see the module text);
    nests (the outermost block restores the defaults)."""
    global _depth
    libc = _glibc() if torch.device(device).type == "cpu" else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
