"""Importing torchvision for peer checks (pytorch-fid, the lpips package), on any machine.

On the development machine torchvision's C ops do not load, so its import fails unless the two
op schemas it registers at import time are defined first (nothing in the peer checks calls
them). Where its ops do load (a GPU box), pre-defining them makes the real registration abort
the whole process, so the stubs go in only after a child process has shown that a plain import
fails."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import torch

_LIBS: list = []


@functools.cache
def _imports_by_itself() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return probe.returncode == 0


def prepare_torchvision_import() -> bool:
    """Make ``import torchvision`` work in this process if it can; False where it is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    if "torchvision" in sys.modules or _imports_by_itself():
        return True
    for op in ("nms", "qnms"):
        try:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBS.append(lib)
        except RuntimeError:  # already defined by an earlier call
            pass
    return True
