"""What the package's DataLoader worker processes do: ignore stop signals, hand over stacks.

A scheduler's preemption (SLURM, Kubernetes) sends SIGTERM to every process of the job, and
Ctrl-C sends SIGINT to the terminal's whole process group: the DataLoader workers get the signal
along with the main process. A worker that dies of it makes the main process raise "DataLoader
worker ... is killed by signal" from its SIGCHLD handler, in the middle of the clean stop the
signal asked for (the trainers' last checkpoint, eval's saved sums). So workers ignore both
signals and stop when the main process shuts them down; PyTorch's workers also exit by
themselves when the main process is gone.

So the main process must shut them down: :func:`worker_batches`. Ignoring SIGTERM also makes them
deaf to ``multiprocessing``'s exit handler, which terminates (SIGTERM) leftover daemon processes
and then joins them: a loader iterator still alive when the interpreter exits hangs it for good.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoaders: SIGINT and SIGTERM are the main process's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stack_readable(items: list[Tensor | str]) -> tuple[Tensor | None, list[str | None]]:
    """``collate_fn`` for datasets that return an image tensor, or a string naming why an image
    could not be read: the images stacked (one shared-memory tensor per batch, not one per image)
    and, in order, None for an image or the string."""
    images = [x for x in items if isinstance(x, Tensor)]
    return (torch.stack(images) if images else None), [None if isinstance(x, Tensor) else x for x in items]


def unstack_readable(images: Tensor | None, order: list[str | None]) -> Iterator[Tensor | str]:
    """The items :func:`stack_readable` collated, one by one in their order."""
    rows = iter(images) if images is not None else iter(())
    for marker in order:
        yield next(rows) if marker is None else marker


@contextlib.contextmanager
def worker_batches(loader: Iterable[T]) -> Iterator[Iterator[T]]:
    """``iter(loader)`` for the ``with`` block; its worker processes are shut down when the block
    ends, however it ends, and an error a worker raised comes out as that worker raised it.

    Leaving the shutdown to the iterator's ``__del__`` is not enough: an error from a worker is
    re-raised by a frame that keeps the new exception in a local (``ExceptionWrapper.reraise``),
    a reference cycle through the traceback that holds the DataLoader's frames, and with them the
    iterator, until the garbage collector runs. At the interpreter's exit it has not, PyTorch's
    own shutdown has turned itself off, and ``multiprocessing`` waits forever for workers that
    ignore its SIGTERM (:func:`ignore_stop_signals`).
    """
    batches = iter(loader)
    try:
        yield batches
    except Exception as exc:
        original = worker_error(exc)
        if original is None:
            raise
        raise original from None
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # absent without workers
        if shutdown is not None:
            shutdown()  # idempotent: an iterator that ran out has done it already


def worker_error(exc: BaseException) -> BaseException | None:
    """The error a DataLoader worker raised, rebuilt from ``exc`` (PyTorch's copy of it in the main
    process, whose message is "Caught X in DataLoader worker process N." and the worker's whole
    traceback) with the worker's own message, as the same code raises it without workers; the
    worker's traceback becomes a note, shown where a traceback is. None when ``exc`` is not such a
    copy or its message cannot be found."""
    text = str(exc)
    kind = type(exc)
    if issubclass(kind, (KeyError, OSError)):  # their str() is not their argument (quotes; errno, filename)
        return None
    if not text.startswith(f"Caught {kind.__name__} in DataLoader worker process "):
        return None
    # traceback.format_exception's last line names the type so, then gives the message
    name = kind.__qualname__
    if kind.__module__ not in ("__main__", "builtins"):
        name = f"{kind.__module__}.{name}"
    head = f"\n{name}: "
    start = text.rfind(head)
    if start < 0:  # an error without a message, or one PyTorch could not rebuild as its type
        return None
    try:
        original = kind(text[start + len(head):].rstrip("\n"))
    except Exception:
        return None
    original.add_note("in a DataLoader worker process:\n" + text.split("\n", 1)[1].removeprefix("Original "))
    return original
