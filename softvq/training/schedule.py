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


# Settings of a param group that come from the config, not from training so far.
CONFIG_SETTINGS = ("initial_lr", "betas", "weight_decay", "eps", "momentum")


def load_training_state(optimizer: Optimizer, scheduler: LambdaLR, optimizer_state: dict,
                        scheduler_state: dict) -> None:
    """Restore the optimizer's moments and the schedule's position from a checkpoint, keeping the
    *current* config's learning rate, betas, weight decay and eps.

    ``load_state_dict`` alone would put back the saved hyper-parameters (and the scheduler its saved
    base lrs), so a resumed run given a lower ``optim.lr`` after a divergence silently kept the old
    one. With unchanged settings the result is bit for bit what ``load_state_dict`` gives.
    """
    current = [{k: group[k] for k in CONFIG_SETTINGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # what the schedule's next get_lr() gives
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
