"""Seeding: the global random generators, and Gaussian noise that a seeded generator reproduces
on any device.

A ``torch.Generator`` draws only on its own device, so a CPU generator cannot feed a sampler
running on a GPU directly. Drawing on the generator's device and copying keeps one seed giving
the same samples on the CPU and the GPU, and the same samples on every call: the copy is a few
kilobytes per sampling step, small next to a network evaluation. Without a generator the noise
is drawn where it is used, from the global RNG.
"""

from __future__ import annotations

import numbers
import random

import numpy as np
import torch
from torch import Tensor

SEED_LIMIT = 2**63  # seeds are 0 .. 2**63 - 1: torch takes 64 bits, NumPy no negatives, a run seeds seed + 1 + rank


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as a whole number from 0 to 2**63 - 1, or an error naming ``name``: a seed past 64
    bits gave the same streams as another (only its low bits are used), and 1.5 a bare TypeError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, got {seed!r}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"{name} must be 0 or more and below 2**63, got {seed}")
    return int(seed)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators (NumPy takes ``seed`` mod 2**32)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, *indices: int) -> int:
    """A torch seed (63 bits) that is a fixed function of a run ``seed`` and non-negative ``indices``,
    such as (step, rank): NumPy's ``SeedSequence`` over the seed's two 32-bit words and the indices,
    so nearby keys give independent streams and the value does not change between Python versions
    (``hash()`` of a tuple is not guaranteed to stay the same). Each use passes a fixed number of
    indices: SeedSequence pads with zeros, so ``(s, i)`` and ``(s, i, 0)`` give the same seed. Batches of the generator trainer and
    of :func:`softvq.generation.samples.batch_seed` are seeded with it."""
    high, low = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, *indices]).generate_state(2)
    return int(high) << 31 | int(low) >> 1


def standard_normal(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
                    device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, I) of ``shape`` on ``device``, drawn from ``generator`` wherever that generator lives."""
    device = torch.device(device)
    if generator is None or generator.device.type == device.type:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
