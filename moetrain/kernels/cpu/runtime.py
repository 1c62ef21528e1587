"""Process settings for training on CPU: intra-op threads, glibc's allocator and huge pages.

Why the allocator: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on free, so each such tensor is page-faulted and zero-filled by the
kernel again on every step. PyTorch has no caching allocator on CPU, and an MoE layer allocates large
tensors every step (the (E, D, F) expert weight gradients are 32 MiB each at E = 64, D = 256, F = 512).
What it buys is measured in docs/benchmarks.md ("CPU process settings").

``cached`` turns mmap off (``M_MMAP_MAX = 0``) and raises the trim threshold, so freed blocks stay in the
heap and are reused: the CUDA caching allocator's trade, more resident memory for no page faults (the heap
keeps up to 2 GiB of free memory after its peak, e.g. after a validation or a checkpoint load, per rank).
``MOETRAIN_CPU_MALLOC=default`` leaves glibc as it is.

Why huge pages (``MOETRAIN_CPU_HUGE_PAGES``, on by default): with 4 KiB pages every row of a weight's column block
that the expert kernel reads is on a page of its own (a row of an (F, D) or (D, F) weight is 1-4 KiB), and the
32-64 experts' weights (96-192 MiB) are far beyond what the TLB maps, so the reads that stream the weights from
memory also wait on page walks. PyTorch's CPU allocator asks the kernel for transparent huge pages (2 MiB) for
every tensor of 2 MiB or more when ``THP_MEM_ALLOC_ENABLE=1``, which it reads once, at its first CPU allocation
of any size: so this must be set before the process allocates any tensor (measured in docs/benchmarks.md,
"CPU process settings"). It needs Linux with transparent huge pages in ``madvise`` or ``always`` mode
(``/sys/kernel/mm/transparent_hugepage/enabled``); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)
CPU_MALLOC = ("cached", "default")  # MOETRAIN_CPU_MALLOC
HUGE_PAGES = ("on", "off")  # MOETRAIN_CPU_HUGE_PAGES
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


def anon_huge_pages_kib() -> int | None:
    """This process's anonymous memory on transparent huge pages (KiB), or None where Linux does not say."""
    try:
        rollup = open("/proc/self/smaps_rollup").read()
    except OSError:
        return None
    for line in rollup.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def huge_pages_in_use() -> bool:
    """Whether a fresh 4 MiB tensor sits on a transparent huge page: PyTorch asked for one
    (``THP_MEM_ALLOC_ENABLE``), or Linux gives them to every large allocation (THP mode ``always``)."""
    before = anon_huge_pages_kib()
    if before is None:
        return False
    probe = torch.ones(2**20)  # 4 MiB: beyond PyTorch's 2 MiB threshold for madvising huge pages
    in_use = (anon_huge_pages_kib() or 0) > before
    del probe
    return in_use


def use_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages for tensors of 2 MiB or more (see the module
    docstring); returns ``huge_pages_in_use()``. PyTorch reads the setting at its first CPU allocation of any size:
    after one, nothing changes (and this returns False, unless THP mode is ``always``)."""
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return huge_pages_in_use()


def configure(num_threads: int | None, local_world_size: int, cpu_malloc: str, huge_pages: bool = True) -> None:
    """Threads per rank (default: this node's cores shared by its ranks), the allocator policy and huge pages;
    before the first tensor (PyTorch reads the huge-page setting once, at its first CPU allocation)."""
    torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // local_world_size))
    if cpu_malloc == "cached":
        cache_freed_memory()
    if huge_pages and not use_huge_pages():
        log.info(
            "MOETRAIN_CPU_HUGE_PAGES=on: tensors are not on transparent huge pages here (Linux THP off, or a tensor "
            "was allocated before the setting)"
        )


def _setting(name: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, allowed[0])
    if value not in allowed:
        raise ValueError(f"{name}={value} is not supported; allowed: {', '.join(allowed)}")
    return value


def settings_from_environment() -> tuple[str, bool]:
    """``(cpu_malloc, huge_pages)`` from ``MOETRAIN_CPU_MALLOC`` (cached | default) and
    ``MOETRAIN_CPU_HUGE_PAGES`` (on | off); the first of each is the default. Process settings, not recipe
    keys: they belong to the machine a run lands on, not to the model."""
    return _setting("MOETRAIN_CPU_MALLOC", CPU_MALLOC), _setting("MOETRAIN_CPU_HUGE_PAGES", HUGE_PAGES) == "on"


def configure_from_environment(num_threads: int | None, local_world_size: int) -> None:
    """:func:`configure` with the allocator and huge-page settings of the environment."""
    cpu_malloc, huge_pages = settings_from_environment()
    configure(num_threads, local_world_size, cpu_malloc, huge_pages)
