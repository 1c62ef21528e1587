"""What the test machine's CPU has, read without building the kernel (pytest marks are made at collection)."""

from __future__ import annotations

import pytest


def cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


needs_avx512 = pytest.mark.skipif(not cpu_has_avx512(), reason="this CPU has no AVX-512: fp32 runs on ATen's code")
