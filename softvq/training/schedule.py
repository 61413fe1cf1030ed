"""Learning-rate schedule of the paper's recipe (supplementary C.1): linear warm-up to the peak,
then cosine annealing; the peak is the base lr scaled linearly with the global batch (base at 256)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

REFERENCE_BATCH = 256


def scaled_lr(base_lr: float, global_batch: int, scale: bool = True) -> float:
    """Peak lr = base_lr x global_batch / 256 (the linear scaling rule; paper: 1e-4 at 256)."""
    return base_lr * global_batch / REFERENCE_BATCH if scale else base_lr


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str = "cosine",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warm-up: (step + 1) / warmup_steps, reaching 1 at the last warm-up step.
    Cosine: min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2 with t the fraction of the
    post-warm-up steps done; ``constant`` stays at 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown lr schedule {kind!r}; use 'cosine' or 'constant'")
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: Optimizer, *, total_steps: int, warmup_steps: int, kind: str = "cosine",
                    min_ratio: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step (its state saves with the checkpoint)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps,
                                                      kind=kind, min_ratio=min_ratio))
