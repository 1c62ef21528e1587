"""MOETRAIN_CPU_MALLOC=cached: glibc keeps a freed large block in its heap instead of unmapping it; a bad value
is named in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.configs import assert_config_error

PROBE = """
import ctypes, sys
import torch
from moetrain.runtime.cpu_process import cache_freed_memory

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


def test_a_bad_cpu_malloc_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("MOETRAIN_CPU_MALLOC", "jemalloc")
    assert_config_error([], "MOETRAIN_CPU_MALLOC=jemalloc is not supported", "allowed: cached, default")
