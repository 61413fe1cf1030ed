"""The modes a helper borrows from its caller and gives back.

``evaluating(module)``: inference helpers (pretokenize, evaluation, held-out reconstructions, MAR
sampling) receive the caller's model; switching it to eval mode for good would silently change the
caller's next training step (dropout, the lean SoftVQ's posterior), so each one borrows eval mode
and restores it. ``with_gradients``: a training entry point called inside the caller's
``torch.no_grad()`` or ``torch.inference_mode()`` trains all the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)
P = ParamSpec("P")
R = TypeVar("R")


def with_gradients(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with autograd on, whatever grad mode its caller is in (a notebook cell under
    ``torch.no_grad()`` ended a training run in a torch error after its run folder was made)."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)
    return wrapper


@contextmanager
def evaluating(module: M) -> Iterator[M]:
    """Put ``module`` in eval mode for the block; restore the train/eval mode of it and of each of its
    submodules afterwards, even on error (``module.train(flag)`` would set one flag for all, and
    undo a caller's frozen block in eval mode inside a training model)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, training in modes:
            m.training = training
