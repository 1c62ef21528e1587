"""What the test machine's CPU has, read without building the kernel (pytest marks are made at collection)."""

from __future__ import annotations

import pytest


def cpu_has_avx512() -> bool:
    """Whether the CPU has what the kernel's own fp32 code needs (f32_gemm::available): AVX-512 F and VL, and FMA."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return False
    return {"avx512f", "avx512vl", "fma"} <= flags


needs_avx512 = pytest.mark.skipif(not cpu_has_avx512(), reason="this CPU has no AVX-512: fp32 runs on ATen's code")
