"""Host (CPU) memory allocator settings for training on CPU.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it
back with ``munmap`` on free. Training allocates and frees such blocks all the time: a PPO minibatch's
``(16, 54, 49152)`` float32 logits are 170 MB, and each of the copies that the temperature scaling, ``log_softmax`` and
their backward make is another. The kernel then faults in and zeroes every 4 KiB page of each at first touch, which on
the development machines costs more than the arithmetic itself. :func:`reuse_freed_memory` makes ``malloc`` serve
large blocks from its heap and keep freed memory for reuse instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Any

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc ``malloc.h``)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

#: set to ``0`` to leave the allocator as it is
ENV_SWITCH = "LIT_RLHF_REUSE_FREED_MEMORY"


def trains_on_one_cpu(trainer: Any) -> bool:
    """Whether ``trainer`` trains on the CPU in a single process: where :func:`reuse_freed_memory` was measured to
    help. On a GPU, or with several ranks (whose CPU state-dict gathers would then keep their host memory for good),
    the allocator is left as it is."""
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(trainer.accelerator, CPUAccelerator) and trainer.world_size == 1


def reuse_freed_memory(trim_threshold: int = 2**31 - 1) -> bool:
    """Make glibc's ``malloc`` reuse freed memory for large blocks instead of mapping fresh pages each time.

    ``mallopt(M_MMAP_MAX, 0)`` serves every block from the heap and ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` keeps
    up to ``trim_threshold`` bytes of free memory at its top rather than returning them to the operating system. The
    same effect as the environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``, applied from inside
    the process. The stages call it at the start of ``fit`` where :func:`trains_on_one_cpu` (no other command does).

    Measured on the development machine (2 cores, bf16 autocast), in one process each way: forward and backward of
    the temperature-scaled logprobs of ``(16, 54, 49152)`` bf16 logits 403 -> 123 ms; one quickstart PPO update
    (16 rollouts, 4 PPO epochs) 55-61 s -> 46-49 s. The price: memory freed by the process stays with it, so its peak
    resident size can be higher (that PPO run: 7.2 -> 8.0 GB).

    Args:
        trim_threshold: bytes of free memory at the top of the heap kept before ``malloc`` returns any (glibc's
            ``int``; at most ``2**31 - 1``).

    Returns:
        ``True`` if the settings were applied; ``False`` where the C library is not glibc (macOS, musl), where
        ``mallopt`` refused them, or where the environment variable ``LIT_RLHF_REUSE_FREED_MEMORY=0`` opts out.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # the trim threshold first: were M_MMAP_MAX=0 applied alone, heap blocks freed at the top would be returned
        # (and faulted in again) at glibc's default 128 KiB threshold
        applied = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and libc.mallopt(M_MMAP_MAX, 0) == 1
    except (OSError, AttributeError):
        return False
    if not applied:
        log.warning("glibc mallopt refused M_TRIM_THRESHOLD=%d or M_MMAP_MAX=0: large blocks stay mmap-ed", trim_threshold)
    return applied
