"""Keep freed host memory for reuse in a CPU benchmark: a caching allocator's behaviour from glibc's malloc.

torch's CPU allocator is plain ``malloc``. glibc serves blocks above its mmap threshold (at most 32 MiB) with
fresh ``mmap`` calls and unmaps them on ``free``, so every training step maps its large tensors anew (the
``[tokens, vocab]`` logits and their gradient, expert activations, weight gradients) and pays a page fault per
4 KiB page the first time it writes them: about 10 ms per 64 MiB on the project's CPU machine (README, bf16
section). GPU allocators cache freed blocks; jemalloc or tcmalloc, which
torch's ``torch.backends.xeon.run_cpu`` launcher preloads, do the same on CPU. :func:`retain_freed_host_memory`
gets that from glibc with two ``mallopt`` calls: every block comes from the heap, and freed memory stays
there for the next step. Not for long runs: glibc's aligned blocks fragment its heap, and the resident size of a
training benchmark kept growing (1.97 to 2.56 GiB over 200 steps, against a 2.2 GiB peak with the default).
Used by ``moe_layer.py`` and ``train_throughput.py`` (``--retain-freed-memory``), for every contender alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_host_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
"""Blocks up to 1 GiB come from the heap; larger ones are still mapped."""
_TRIM_THRESHOLD = (1 << 31) - 1
"""Never give the heap's free top back to the OS (the largest value ``mallopt`` accepts)."""


def retain_freed_host_memory() -> bool:
    """Make this process's ``malloc`` keep freed memory for reuse; True if it now does.

    False, and nothing changed, where the C library is not glibc (musl, macOS, Windows). Affects this process
    and the processes it forks afterwards; not reversible short of a restart.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
