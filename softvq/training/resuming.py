"""Continuing a training run's random streams from a checkpoint (both trainers).

A checkpoint holds the RNG states of every process (:func:`softvq.training.checkpointing.capture_rng`,
gathered in rank order). Resumed with the same process count, each process takes its own back and
the run continues exactly; with another count there is no way to replay the same streams, so each
process is re-seeded from (seed, step, rank) instead and the user is told.
"""

from __future__ import annotations

from typing import Any

from softvq.randomness import seed_everything
from softvq.training.checkpointing import restore_rng

# The step's weight in a re-seed, seed + RESEED_STRIDE * step + rank: resumes at different steps get
# different streams (the value both trainers have always used; changing it changes resumed runs).
RESEED_STRIDE = 7919


def restore_or_reseed_rng(saved: list[dict[str, Any]] | dict[str, Any], *, rank: int, world: int, seed: int,
                          step: int) -> str | None:
    """Restore this process's RNG states from a checkpoint's ``saved`` ones, or re-seed Python,
    NumPy and torch from ``seed + RESEED_STRIDE * step + rank`` when the checkpoint was written by
    another number of processes.

    ``saved`` is the list of every process's states, or one dict (a single process's, as older
    generator checkpoints stored it). Returns None, or the note to show the user when it re-seeded.
    """
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world:
        restore_rng(states[rank])
        return None
    seed_everything(seed + RESEED_STRIDE * step + rank)
    return (f"resumed with {world} process{'es' if world != 1 else ''} instead of {len(states)}: random streams "
            f"are re-seeded, so losses will not match an uninterrupted run")
