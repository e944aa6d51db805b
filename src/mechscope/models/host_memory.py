"""Keep freed host memory for reuse instead of handing it back to the OS (glibc only).

glibc gives every allocation above its mmap threshold (dynamic, at most 32 MiB) a mapping of its own
and returns free heap above its trim threshold to the OS, so on the CPU each forward pays the kernel
to map and zero its large tensors again. On smollm2-135m at batch 8 x 128 that is ~190k page
faults, ~10% of a plain forward; caching activations pays it again for every byte it holds (holding
them stops any reuse), which made ``run_with_cache`` of every hook point cost ~2x a plain forward
instead of ~1.06x (benchmarks/README.md, "Host memory"). PyTorch's CUDA allocator keeps freed blocks
for reuse; on the CPU it leaves that to malloc, and this tells malloc to do it.

The price: the process' resident memory stays at its peak instead of shrinking when tensors are
freed (it is reused by the next allocations, not leaked). :func:`~mechscope.load_model` calls
:func:`keep_freed_memory`; set ``MECHSCOPE_KEEP_FREED_MEMORY=0`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "MECHSCOPE_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds so freed blocks stay in the heap for reuse.

    Process-wide and idempotent. Returns whether it took effect: False when ``$MECHSCOPE_KEEP_FREED_MEMORY``
    is ``0`` or the C library is not glibc (macOS, musl), where nothing is changed.
    """
    if os.environ.get(ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 1 GiB: tensors below it come from (and return to) the heap. Older glibc caps the value at
    # 32 MiB, which still keeps the per-layer activations of a small model in the heap.
    mmap = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap and mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
