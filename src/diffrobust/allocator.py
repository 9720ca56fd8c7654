"""Freed memory kept for reuse: glibc malloc settings that every `diffrobust` command applies at start.

PyTorch's CPU tensors come from malloc and go back to it when freed. With glibc's defaults, a large block is
mapped fresh from the kernel (above `M_MMAP_THRESHOLD`) or returned to it once free (above `M_TRIM_THRESHOLD` at the
top of the heap), so the next tensor of that size starts on pages the kernel must fault in and zero again: in a
UNet forward, whose activations are megabytes each, that is 10^5-10^6 page faults per call (the CIFAR-10 ADM UNet
at batch 64: 516,000 faults and 0.74 s of kernel time per forward; with these settings 33,000 and 0.03 s).
`keep_freed_memory()` raises both thresholds, so freed blocks stay in the process for the next tensors. The cost:
the process keeps its peak heap (up to 2 GiB of free memory) instead of shrinking after it; its peak does not grow.

Set `DIFFROBUST_MALLOC=system` to keep glibc's defaults (to measure the difference). No effect on other C
libraries (musl, macOS, Windows): `keep_freed_memory()` then returns False. Imports nothing heavy (no torch).
"""

import ctypes
import os
import platform
import sys

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap (the largest a UNet batch here needs is ~0.1 GiB)
TRIM_THRESHOLD = 2**31 - 1  # the largest value of mallopt's int argument: up to 2 GiB free at the heap top kept

_state = {"kept": False}


def keep_freed_memory():
    """Apply the settings above once per process; True when glibc took them (also on later calls)."""
    if _state["kept"]:
        return True
    if os.environ.get("DIFFROBUST_MALLOC") == "system":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Each call returns 1 on success; glibc refuses thresholds above its limit, and then keeps its defaults.
    _state["kept"] = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                      TRIM_THRESHOLD))
    return _state["kept"]


def freed_memory_kept():
    """Whether `keep_freed_memory()` has taken effect in this process."""
    return _state["kept"]
