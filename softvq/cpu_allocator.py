"""Keep freed CPU memory in the process, so a forward reuses pages instead of faulting in new ones.

Every block of a CPU forward allocates and frees activations of a few MiB (a SoftVQ-S MLP's
hidden activation at batch 8 is 16 MiB). Under glibc's default policy such blocks often come
from fresh ``mmap`` calls, or are handed back to the kernel when freed (the heap is trimmed
once enough is free at its top). The next forward then writes to new pages and pays a minor
page fault for each 4 KiB. On our 2-core CI machine that was 16,000-37,000 faults per SoftVQ-S
encode of 8 images at 256 px, and the encode ran 4-8% slower than with no faults.

:func:`retain_freed_memory` sets two glibc options through ``mallopt``. Blocks of every size are
served from the heap: ``mmap`` is switched off, so large blocks too are reused after a free instead
of being mapped afresh on every call (glibc's mmap threshold alone cannot be raised past 32 MiB,
and a SoftVQ-S MLP's hidden activation passes that from batch 18 on). Up to ``keep_bytes`` of
free heap at its top stay mapped for reuse. The pages kept are the ones the last peak used, so the
resident set just does not shrink after a peak. Should the heap ever fail to grow, glibc still
falls back to ``mmap``.

At batch 32 (``softvq pretokenize``'s default), in three pairs of fresh processes on the same
machine, a SoftVQ-S encode with blocks kept only up to 32 MiB (this function before mmap was
switched off) took 30,800-154,000 faults per call and 3018-3266 ms; with every size kept, 0-1
faults and 2978-3053 ms (peak resident set 690-758 against 761-807 MiB).

It pays off for inference, not for training: a SoftVQ-S training step at batch 8 on the same CPU
measured 49.5 s with it against 47.8 s without (within the host's noise) and a peak resident set
of 6957 against 6719 MiB, as blocks that autograd keeps alive now come from the fragmenting heap.

The setting is process-wide, so importing ``softvq`` never applies it. The ``softvq`` inference
commands (reconstruct, encode, decode, eval, pretokenize, generate) and the CPU inference
benchmarks (``bench_tokenizer.py``, ``bench_breakdown.py``) call it. Call it yourself at the top
of a CPU inference script. Where the C library is not glibc (macOS, Windows, musl) it does
nothing and returns False.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory(keep_bytes: int = 512 << 20) -> bool:
    """Serve blocks of every size from the heap and keep up to ``keep_bytes`` of freed heap mapped.

    Returns True when glibc accepted both settings, and False on other C libraries, where
    nothing changes. Calling it again is harmless. Raises ValueError for a negative
    ``keep_bytes``.
    """
    if keep_bytes < 0:
        raise ValueError(f"keep_bytes must be non-negative, got {keep_bytes}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # glibc's int parameter: clamp so a huge keep_bytes stays a valid C int.
    keep = min(keep_bytes, 2**31 - 1)
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))
