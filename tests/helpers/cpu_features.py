"""What the test machine's CPU has, read without building the kernel (pytest marks are made at collection), and
running a computation on each of several thread counts (the kernels' same-bits-on-any-threads tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

T = TypeVar("T")


def cpu_has_avx512() -> bool:
    """Whether the CPU has what the kernel's own fp32 code needs (f32_gemm::available): AVX-512 F and VL, and FMA."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return False
    return {"avx512f", "avx512vl", "fma"} <= flags


needs_avx512 = pytest.mark.skipif(not cpu_has_avx512(), reason="this CPU has no AVX-512: fp32 runs on ATen's code")


def on_thread_counts(fn: Callable[[], T], counts: tuple[int, ...] = (1, 2)) -> list[T]:
    """``fn()`` with ``torch.set_num_threads(n)`` for each n in ``counts``, in order; the thread count is restored."""
    before = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(before)
    return results
