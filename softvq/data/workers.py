"""What every DataLoader worker process of the package does first.

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


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoaders: SIGINT and SIGTERM are the main process's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
