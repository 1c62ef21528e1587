"""trainer.cpu_malloc=cached: glibc keeps a freed large block in its heap instead of unmapping it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import torch
from moetrain.kernels.cpu.runtime import cache_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "cached":
    assert cache_freed_memory()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest mmap threshold
del x
info = libc.mallinfo2()
print(info.fordblks, info.hblkhd)  # free bytes kept in the heap, bytes still mmapped
"""


def probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    free_in_heap, mmapped = map(int, out.split())
    return free_in_heap, mmapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_cached_keeps_freed_blocks_for_reuse_default_unmaps_them():
    cached_free, _ = probe("cached")
    default_free, _ = probe("default")
    assert cached_free >= 64 * 2**20, "the freed 64 MiB block stays in the heap for the next step"
    assert default_free < 64 * 2**20, "glibc's default unmaps it (the probe would not show a difference)"


HUGE_PROBE = """
import sys
import torch
from moetrain.kernels.cpu.runtime import use_huge_pages

if sys.argv[1] == "late":
    early = torch.ones(4)  # any tensor first: PyTorch reads its huge-page setting at its first allocation
print(use_huge_pages())
"""


def thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text.split("[")[1].split("]")[0]


def huge_probe(when: str) -> bool:
    out = subprocess.run([sys.executable, "-c", HUGE_PROBE, when], capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


@pytest.mark.skipif(thp_mode() != "madvise", reason="needs Linux transparent huge pages in madvise mode")
def test_the_probe_sees_no_huge_pages_unless_pytorch_asks_for_them():
    """huge_pages_in_use (what the benchmark's Machine line reports) in a fresh process without the setting: in
    madvise mode Linux gives a 4 MiB tensor small pages."""
    probe = "from moetrain.kernels.cpu.runtime import huge_pages_in_use\nprint(huge_pages_in_use())"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="Linux transparent huge pages are off here")
def test_huge_pages_take_effect_before_the_first_tensor_only():
    assert huge_probe("first"), "a fresh 4 MiB tensor sits on a huge page"
    if thp_mode() == "madvise":  # with "always" the kernel gives huge pages without PyTorch asking
        assert not huge_probe("late"), "PyTorch read the setting at its first tensor: too late to change"


CONFIGURE_PROBE = """
import os, sys
from moetrain.kernels.cpu.runtime import anon_huge_pages_kib, configure
import torch

configure(None, 1, "cached", huge_pages=sys.argv[1] == "on")
before = anon_huge_pages_kib()
x = torch.ones(2**21)  # 8 MiB, as a model's weights
print(os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"), anon_huge_pages_kib() > before)
"""


@pytest.mark.skipif(thp_mode() != "madvise", reason="needs Linux transparent huge pages in madvise mode")
@pytest.mark.parametrize(("setting", "expected"), [("on", "1 True"), ("off", "unset False")])
def test_trainer_configure_follows_cpu_huge_pages(setting, expected):
    """trainer.cpu_huge_pages reaches the allocator through configure: large tensors on huge pages, or not."""
    out = subprocess.run([sys.executable, "-c", CONFIGURE_PROBE, setting], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
