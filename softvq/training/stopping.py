"""Ctrl-C and a scheduler's SIGTERM as a request to stop cleanly, for training loops.

The first SIGINT or SIGTERM only sets a flag: the loop finishes the step it is in, writes a
checkpoint and returns, so the run continues later from exactly there. A later Ctrl-C (SIGINT),
at least :data:`REPEAT_AFTER_SECONDS` after the first signal, raises ``KeyboardInterrupt`` at
once. Handlers are installed only in the main thread (Python allows no other) and the previous
ones are restored on exit.

Under torchrun or ``accelerate launch`` every process gets the signal, but not at the same step;
a loop with several processes must agree (an all-reduce of the flag) before it stops, or the
processes that go on would wait forever in the next collective. Each process may also get the
same request twice within milliseconds: Slurm signals every process of a job and torchrun
forwards its own signal to its workers, as it forwards a terminal's Ctrl-C that the workers
already got. So a repeated SIGTERM never stops at once (a scheduler that insists sends SIGKILL),
nor does a SIGINT soon after the first signal: with several processes, stopping at once can
write no checkpoint, and the steps since the last one would be lost.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch

class NonFiniteLossError(RuntimeError):
    """Training stopped after too many non-finite losses or gradients (both trainers); the message
    names the last good checkpoint and what to try."""


REPEAT_AFTER_SECONDS = 2.0  # a SIGINT sooner than this after the first signal is the same request, relayed


class StopRequests:
    """``requested`` turns True at the first SIGINT / SIGTERM between ``install()`` and ``restore()``
    (or inside ``with StopRequests():``); a SIGINT from :data:`REPEAT_AFTER_SECONDS` later on
    raises ``KeyboardInterrupt`` (see the module docstring).

    ``announce(signal_name)`` is called at the first signal (to tell the user what will happen).
    ``clock`` gives the seconds that tell a repeated Ctrl-C from a relayed one (tests fake it).
    """

    def __init__(self, announce: Callable[[str], None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.announce = announce
        self.clock = clock
        self.count = 0
        self._first_at = 0.0
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.count > 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count == 1:
            self._first_at = self.clock()
            if self.announce is not None:
                self.announce(signal.Signals(signum).name)
        elif signum == signal.SIGINT and self.clock() - self._first_at >= REPEAT_AFTER_SECONDS:
            raise KeyboardInterrupt

    def install(self) -> "StopRequests":
        """Catch SIGINT and SIGTERM (from the main thread only; elsewhere nothing is installed)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        """Put back the signal handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequests":
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def on_any_process(flags: Sequence[bool], device: torch.device | str) -> list[bool]:
    """Each flag, True where it is True on any process: an all-reduce (MAX) that every process
    must call, so all stop at the same step. A single process gets its flags back as they are."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite: one read back from the device for the whole set.
    Both trainers check their weights with it before they save them."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
