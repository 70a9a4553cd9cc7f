"""reuse_freed_memory: large tensors come from malloc's heap, not a fresh mmap each (glibc only); applied by CPU fits in
one process only, never by the command line itself. Each allocator check runs in a process of its own, so that the test
session's malloc stays as it is."""

import os
import platform
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from conftest import ROOT
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from lit_rlhf.host_memory import trains_on_one_cpu

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

#: prints whether a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) came from the heap and its memory
#: stayed there after the free, after the code it is prefixed with
PROBE = textwrap.dedent("""
    import ctypes, torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        print("NO-MALLINFO2")
        raise SystemExit
    libc.mallinfo2.restype = MallInfo2
    size, before = 64 * 2**20, libc.mallinfo2()
    block = torch.ones(size, dtype=torch.uint8)
    from_heap = libc.mallinfo2().hblkhd == before.hblkhd
    del block
    print("HEAP" if from_heap and libc.mallinfo2().fordblks >= size else "MMAP")
""")


def probe(prefix: str, **env: str) -> str:
    environment = {key: value for key, value in os.environ.items() if key != "LIT_RLHF_REUSE_FREED_MEMORY"}
    process = subprocess.run([sys.executable, "-c", textwrap.dedent(prefix) + PROBE], cwd=ROOT, env={**environment, **env},
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    verdict = process.stdout.strip().splitlines()[-1]
    if verdict == "NO-MALLINFO2":
        pytest.skip("glibc < 2.33 has no mallinfo2")
    return verdict


@glibc
def test_large_tensors_come_from_the_heap_and_freed_memory_is_kept():
    assert probe("from lit_rlhf.host_memory import reuse_freed_memory\nassert reuse_freed_memory()\n") == "HEAP"


@glibc
def test_opt_out():
    prefix = "from lit_rlhf.host_memory import reuse_freed_memory\nassert not reuse_freed_memory()\n"
    assert probe(prefix, LIT_RLHF_REUSE_FREED_MEMORY="0") == "MMAP"


@glibc
def test_the_command_line_leaves_the_allocator_alone():
    """``lit-rlhf`` itself (here: its usage error) changes nothing: the old entry point retuned malloc for every
    command, GPU and multi-rank runs included."""
    prefix = """
        from lit_rlhf.cli import main
        try:
            main([])
        except SystemExit:
            pass
    """
    assert probe(prefix) == "MMAP"


def test_only_a_single_process_cpu_fit_retunes_the_allocator():
    assert trains_on_one_cpu(SimpleNamespace(accelerator=CPUAccelerator(), world_size=1))
    assert not trains_on_one_cpu(SimpleNamespace(accelerator=CPUAccelerator(), world_size=2))
    assert not trains_on_one_cpu(SimpleNamespace(accelerator=CUDAAccelerator(), world_size=1))
