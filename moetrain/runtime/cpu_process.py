"""Process settings for training on CPU: intra-op threads per rank and glibc's allocator.

Why the threads: every rank of a CPU launch otherwise starts one thread per core, so two ranks on a 2-core
machine run four threads on two cores. The default is the node's cores shared by its local ranks;
``trainer.num_threads`` overrides.

Why the allocator: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on free, so each such tensor is page-faulted and zero-filled by the
kernel again on every step. PyTorch has no caching allocator on CPU, and an MoE layer allocates large tensors
every step (the (E, D, F) expert weight gradients are 32 MiB each at E = 64, D = 256, F = 512).
``MOETRAIN_CPU_MALLOC=cached`` (the default) turns mmap off (``M_MMAP_MAX = 0``) and raises the trim threshold,
so freed blocks stay in the heap and are reused: the CUDA caching allocator's trade, more resident memory (up
to 2 GiB of free heap per rank after its peak) for no page faults. ``default`` leaves glibc as it is. What it
buys on ATen is in docs/benchmarks.md ("CPU process settings").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)
CPU_MALLOC = ("cached", "default")  # MOETRAIN_CPU_MALLOC, the first is the default
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter ids from glibc's malloc.h
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): keep up to 2 GiB of free heap


@functools.cache
def cache_freed_memory() -> bool:
    """Make glibc keep and reuse freed large blocks (see the module docstring); False where libc is not
    glibc (then nothing changes)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        log.info("MOETRAIN_CPU_MALLOC=cached: no glibc mallopt here; the allocator is left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    no_mmap = mallopt(_M_MMAP_MAX, 0) == 1  # mallopt returns 1 on success
    keep_free = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not (no_mmap and keep_free):
        log.warning(
            "MOETRAIN_CPU_MALLOC=cached: mallopt refused (mmap off: %s, trim threshold: %s)", no_mmap, keep_free
        )
    return no_mmap and keep_free


def cpu_malloc_setting() -> str:
    """``MOETRAIN_CPU_MALLOC`` (cached | default): a process setting of the machine a run lands on, not a recipe
    key; a ``ValueError`` naming the variable for any other value."""
    value = os.environ.get("MOETRAIN_CPU_MALLOC", CPU_MALLOC[0])
    if value not in CPU_MALLOC:
        raise ValueError(f"MOETRAIN_CPU_MALLOC={value} is not supported; allowed: {', '.join(CPU_MALLOC)}")
    return value


def configure_cpu_process(num_threads: int | None, local_world_size: int) -> None:
    """Threads per rank and the allocator policy, before the run's first large tensor; nothing on CUDA."""
    if torch.cuda.is_available():
        return
    torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // local_world_size))
    if cpu_malloc_setting() == "cached":
        cache_freed_memory()
