"""``evaluating(module)``: run a block in eval mode and give the module back in the mode it came in.

Inference helpers (pretokenize, evaluation, held-out reconstructions, MAR sampling) receive the
caller's model; switching it to eval mode for good would silently change the caller's next training
step (dropout, the lean SoftVQ's posterior), so each one borrows eval mode and restores it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


@contextmanager
def evaluating(module: M) -> Iterator[M]:
    """Put ``module`` in eval mode for the block; restore its train/eval mode afterwards, even on error."""
    was_training = module.training
    try:
        yield module.eval()
    finally:
        module.train(was_training)
