"""Classifier-free guidance (Ho & Salimans 2022) restricted to a guidance interval
(Kynkäänniemi et al. 2024).

    out = u + s · (c − u),     c = model(x, t, y),  u = model(x, t, null class),

applied only while the noise level τ lies in [low, high]; elsewhere the conditional output is used
alone (and the unconditional pass is skipped). τ uses the package's time convention: **τ = 0 is
data, τ = 1 is pure noise** — SiT's t directly, and t / T for DiT's step index t of T. The
SoftVQ paper (supp. C.2, following REPA) guides SiT on [0, 0.7], i.e. guidance is off for the
noisiest 30% of the trajectory, where Kynkäänniemi et al. show it harms diversity. Scales:
SiT 1.75 / 2.25 and DiT 1.35 / 1.45 for 64 / 32 tokens (supp. C.2).

For a learned-sigma DiT only the ε channels are guided; the variance channels are the
conditional model's (as in DiT's ``forward_with_cfg``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, y) -> output


@dataclass(frozen=True)
class Guidance:
    """Guidance scale and the interval [low, high] of noise levels τ where it applies."""

    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):  # NaN passes a plain comparison
            raise ValueError(f"guidance scale must be a finite number of 0 or more (1 = off), got {self.scale}")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1, got [{self.low}, {self.high}]")

    def active(self, tau: Tensor) -> Tensor:
        """Boolean (B,) mask: where guidance changes the output."""
        on = (tau >= self.low) & (tau <= self.high)
        return on & (self.scale != 1.0)


def guided(model: ModelFn, x: Tensor, t: Tensor, y: Tensor, guidance: Guidance, null_class: int,
           tau: Tensor | None = None, guided_channels: tuple[int, int] | None = None) -> Tensor:
    """The guided output for a batch. ``t`` (B,) is passed to the model as is; ``tau`` (B,) is
    the noise level in [0, 1] the interval is tested on (defaults to ``t``: SiT).
    ``guided_channels=(dim, n)`` guides only the first ``n`` entries along ``dim`` (DiT's ε)."""
    t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
    tau = t if tau is None else (tau.reshape(-1).expand(x.shape[0]) if tau.numel() == 1 else tau)
    active = guidance.active(tau.to(torch.float64))
    if not bool(active.any()):
        return model(x, t, y)  # one pass: guidance is off for every sample
    idx = active.nonzero().squeeze(1)
    # one batched pass over [conditional | unconditional], as DiT's forward_with_cfg does
    both = model(torch.cat([x, x[idx]]), torch.cat([t, t[idx]]),
                 torch.cat([y, torch.full_like(y[idx], null_class)]))
    cond, uncond = both[: x.shape[0]], both[x.shape[0]:]
    mixed = uncond + guidance.scale * (cond[idx] - uncond)
    if guided_channels is not None:
        dim, n = guided_channels
        keep = cond[idx].narrow(dim, n, cond.shape[dim] - n)
        mixed = torch.cat([mixed.narrow(dim, 0, n), keep], dim=dim)
    out = cond.clone()
    out[idx] = mixed.to(out.dtype)
    return out
