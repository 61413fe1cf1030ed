"""What the package's DataLoader worker processes do: ignore stop signals, hand over stacks.

A scheduler's preemption (SLURM, Kubernetes) sends SIGTERM to every process of the job, and
Ctrl-C sends SIGINT to the terminal's whole process group: the DataLoader workers get the signal
along with the main process. A worker that dies of it makes the main process raise "DataLoader
worker ... is killed by signal" from its SIGCHLD handler, in the middle of the clean stop the
signal asked for (the trainers' last checkpoint, eval's saved sums). So workers ignore both
signals and stop when the main process shuts them down; PyTorch's workers also exit by
themselves when the main process is gone.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from torch import Tensor


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
