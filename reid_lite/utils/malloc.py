"""glibc malloc settings for CPU inference: keep freed tensor buffers in the process.

PyTorch's CPU allocator asks malloc for every tensor. glibc serves large requests (above its mmap threshold,
at most 32 MiB, and every MLP activation of ViT-B at batch 16 is larger) with fresh `mmap`s and returns them
to the OS when they are freed, and it shrinks the heap whenever its free top passes the trim threshold. Each
forward pass then faults its activation buffers back in page by page: about 220,000 minor page faults per
ViT-B forward at batch 16 (0.9 GB), a few percent of the forward's time on a 2-core AMD EPYC VM (measured in
docs/deploy.md, "Speed and memory"). Serving every request from the heap and never trimming it removes them; the process
keeps its peak heap instead of returning it between passes, which a long-running extraction reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse: no mmap-backed blocks, no heap trimming.

    Process-wide and not undone; call it once at the start of a CPU inference or training process. Returns
    True when applied, False where the C library is not glibc (musl, macOS, Windows), which is left as it is.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success. M_MMAP_MAX = 0: large blocks come from the heap (a huge request that the
    # heap of a thread's arena cannot hold still falls back to mmap inside glibc).
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) & bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
