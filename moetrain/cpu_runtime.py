"""Process settings for training on CPU: intra-op threads and glibc's allocator.

Why the allocator: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on free, so each such tensor is page-faulted and zero-filled by the
kernel again on every step. PyTorch has no caching allocator on CPU, and an MoE layer allocates large
tensors every step (the (E, D, F) expert weight gradients are 32 MiB each at E = 64, D = 256, F = 512).
Measured on the 2-core machine (forward + backward of that layer, top-1, 4096 tokens): 76 ms with glibc's
defaults, 66 ms cached; no difference at E = 8, whose blocks stay under the threshold (docs/benchmarks.md).

``cached`` turns mmap off (``M_MMAP_MAX = 0``) and raises the trim threshold, so freed blocks stay in the
heap and are reused: the CUDA caching allocator's trade, more resident memory for no page faults (the heap
keeps up to 2 GiB of free memory after its peak, e.g. after a validation or a checkpoint load, per rank).
``trainer.cpu_malloc=default`` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter ids from glibc's malloc.h
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): keep up to 2 GiB of free heap


@functools.cache
def cache_freed_memory() -> bool:
    """Make glibc keep and reuse freed large blocks (see the module docstring); False where libc is not
    glibc (then nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("trainer.cpu_malloc=cached: no glibc mallopt here; the allocator is left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    no_mmap = mallopt(_M_MMAP_MAX, 0) == 1  # mallopt returns 1 on success
    keep_free = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not (no_mmap and keep_free):
        log.warning("trainer.cpu_malloc=cached: mallopt refused (mmap off: %s, trim threshold: %s)", no_mmap, keep_free)
    return no_mmap and keep_free


def configure(num_threads: int | None, local_world_size: int, cpu_malloc: str) -> None:
    """Threads per rank (default: this node's cores shared by its ranks) and the allocator policy."""
    torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // local_world_size))
    if cpu_malloc == "cached":
        cache_freed_memory()
