"""How the tests start several CPU processes the way a user does: ``torchrun`` (gloo)."""

from __future__ import annotations

import os
import socket
import sys

# One thread per process (two share this host's cores) and no GPU, so a GPU machine runs gloo too.
CPU_PROCESS_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun(processes: int) -> list[str]:
    """The command prefix that launches what follows in ``processes`` processes, on a free port."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(port)]


def cpu_process_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **CPU_PROCESS_ENV, **extra}
