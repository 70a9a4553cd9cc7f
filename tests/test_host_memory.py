"""reuse_freed_memory: large tensors come from malloc's heap, not a fresh mmap each (glibc only)."""

import ctypes
import platform

import pytest
import torch

from lit_rlhf.host_memory import reuse_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> MallInfo2:
    """glibc's allocation counts: ``hblkhd`` bytes in mmap-ed blocks, ``fordblks`` free bytes kept in the heap."""
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def test_large_tensors_come_from_the_heap_and_freed_memory_is_kept(monkeypatch):
    monkeypatch.delenv("LIT_RLHF_REUSE_FREED_MEMORY", raising=False)
    assert reuse_freed_memory()
    size, before = 64 * 2**20, mallinfo()  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    block = torch.ones(size, dtype=torch.uint8)
    assert mallinfo().hblkhd == before.hblkhd  # served from the heap, not by a new mapping
    del block
    assert mallinfo().fordblks >= size  # freed, and kept in the heap for the next large tensor


def test_opt_out(monkeypatch):
    monkeypatch.setenv("LIT_RLHF_REUSE_FREED_MEMORY", "0")
    assert not reuse_freed_memory()
