"""Giving freed memory back to the operating system after a network is released.

glibc's allocator keeps freed pages of its heaps for reuse, so a process that frees a network's weights can
stay at its peak resident size; ``malloc_trim(0)`` returns what it can. Called after a stage of a memory plan
frees its networks. Elsewhere (another C library, another system) it only collects Python's garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # no C library by that name: nothing to trim
        return None


def return_freed_memory() -> bool:
    """Collect unreachable Python objects (engine handles among them), then hand glibc's free pages back to
    the system. Returns whether ``malloc_trim`` ran."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
