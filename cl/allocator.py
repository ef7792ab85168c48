"""The C allocator's settings for a process that allocates and frees large tensors over and over (glibc only).

glibc's ``malloc`` serves a block of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB, raised as such blocks are freed,
up to 32 MiB) with a fresh ``mmap`` and gives it back on ``free``, and returns the free top of its heap to the system
past ``M_TRIM_THRESHOLD``. Each tensor of a forward pass (a few MiB at batch 32) is then new memory every time: the
kernel zeroes and maps it page by page on first touch (a page fault per 4 KiB). Which regime a process lands in
depends on its allocation history, so the same pass costs either: the EfficientNet-Lite0 prefix at 64 px, batch 32,
one thread, ran at 0.96-0.99 ms per image with no page faults in some processes and 1.31-1.53 ms with 280,000-370,000
faults per 1,280 images in others (``benchmarks/RESULTS.md``, "Allocator").

``tune_allocator`` fixes the mmap threshold at glibc's ceiling (32 MiB) and the trim threshold at 2 GiB: blocks below
32 MiB are reused from the heap instead of being mapped anew. The cost: up to 2 GiB of freed memory per malloc arena
stays with the process (its resident size holds at its peak instead of shrinking between passes).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); a larger value is refused
MMAP_THRESHOLD = 32 << 20
#: mallopt takes a C int
TRIM_THRESHOLD = 2**31 - 1
#: set to 0 to leave the allocator as it is
ENV = "CL_TUNE_ALLOCATOR"

_tuned: bool | None = None


def _user_settings() -> bool:
    """Whether the environment already configures the allocator (glibc's variables or tunables, a preloaded one)."""
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
    return any(n in os.environ for n in names) or "malloc" in os.environ.get("GLIBC_TUNABLES", "") or \
        any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc"))


def tune_allocator() -> bool:
    """Keep freed tensor memory for reuse (see the module docstring); once per process, on Linux with glibc only.

    Does nothing (returns False) where ``$CL_TUNE_ALLOCATOR`` is ``0``, the environment configures the allocator
    itself, or the C library has no ``mallopt`` (musl, macOS, Windows). Returns whether the settings are in effect.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "1") == "0" or _user_settings():
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, _ = libc.mallopt, libc.gnu_get_libc_version  # glibc has both; musl has no version call
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


__all__ = ["tune_allocator"]
