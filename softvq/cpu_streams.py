"""CPU inference as one piece of the batch per core, each piece on its own thread.

A ViT forward is a chain of a few hundred short ATen calls. Run on all cores, each call ends at an
OpenMP barrier where the threads wait for the slowest, and a thread the host preempts stalls every
core. Cut into pieces of the batch, one per core and each a chain of its own on one thread, no core
waits for another until the pieces are joined. Intel's extension for PyTorch calls these CPU
"streams". On the project's 2-core CPUs the S encode and decode ran 0.99-1.06x as fast this way on
a quiet host, and 1.4-1.8x as fast with other work on the cores (docs/performance.md).

Only inference is split (autograd stays on the caller's thread), and only where the pieces cannot
differ from one call: the images of a batch are independent in the tokenizer's ViTs, and a batch
statistic such as SoftVQ's regulariser stays outside (:meth:`softvq.Tokenizer.encode` splits the
encoder alone). The worker threads set their own thread count once (torch's count and OpenMP's
and MKL's are per thread), so the caller's stays as it was. ``SOFTVQ_CPU_STREAMS=0`` turns the
splitting off for a process, :func:`whole_batch` for a block of code.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

SWITCH_VARIABLE = "SOFTVQ_CPU_STREAMS"  # "0" turns the splitting off for the process

_local = threading.local()  # whole_batch's switch, per thread
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


@contextlib.contextmanager
def whole_batch() -> Iterator[None]:
    """Run the block's inference on the whole batch at once, as plain PyTorch does (the speed
    baseline of ``benchmarks/``, and profiles that attribute time per ATen call)."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before


def pieces_for(x: Tensor) -> int:
    """Into how many pieces ``x``'s batch is split: one per thread of the caller, at most one per
    image; 1 (no split) where anything would see the difference: autograd, a dispatch or function
    mode (``FlopCounterMode`` counts only the thread it was entered on), torch.compile or
    TorchScript tracing, an autocast of the caller's own (autocast is per thread), or a switch."""
    threads = torch.get_num_threads()
    if (x.device.type != "cpu" or threads < 2 or x.dim() == 0 or x.shape[0] < 2 or torch.is_grad_enabled()
            or getattr(_local, "off", False) or os.environ.get(SWITCH_VARIABLE, "1") == "0"):
        return 1
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or _get_current_dispatch_mode_stack() or torch._C._is_torch_function_mode_enabled()
            or torch.is_autocast_enabled("cpu")):
        return 1
    return min(threads, x.shape[0])


def split_over_cores(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` for a function of each image alone, computed as :func:`pieces_for` pieces of the
    batch on as many threads, each with an equal share of the caller's threads, and concatenated."""
    pieces = pieces_for(x)
    if pieces == 1:
        return fn(x)
    pool = _pool(pieces, torch.get_num_threads() // pieces)
    inference = torch.is_inference_mode_enabled()

    def run(piece: Tensor) -> Tensor:  # grad and inference mode are per thread too
        with torch.inference_mode() if inference else torch.no_grad():
            return fn(piece)

    # tensor_split, not chunk: 5 images in 4 pieces are 2+1+1+1, where chunk would make 2+2+1 and idle a core
    return torch.cat([future.result() for future in [pool.submit(run, part) for part in x.tensor_split(pieces)]])


def _pool(workers: int, threads_each: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads that each compute on ``threads_each`` threads, made once."""
    key = (workers, threads_each)
    with _pools_lock:
        if key not in _pools:
            caller = torch.get_num_threads()
            started = threading.Barrier(workers + 1)

            def set_up() -> None:
                # torch takes a thread's count from the process's at the thread's first parallel call
                # unless the thread has made one: so make one first, then set the thread's own count
                torch.get_num_threads()
                torch.set_num_threads(threads_each)
                started.wait()

            pool = ThreadPoolExecutor(workers, thread_name_prefix="softvq-cpu-stream", initializer=set_up)
            for _ in range(workers):  # every worker starts now, blocked in set_up until all have
                pool.submit(lambda: None)
            started.wait()
            # set_num_threads also wrote the count that threads started later begin with: put back
            # the caller's (its own count never changed)
            torch.set_num_threads(caller)
            _pools[key] = pool
        return _pools[key]


def _forget_pools_in_child() -> None:
    """A forked child has none of its parent's threads: its first split starts pools of its own."""
    _pools.clear()
    global _pools_lock
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)
