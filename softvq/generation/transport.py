"""SiT: stochastic interpolants, the velocity-matching loss, and ODE / SDE samplers.

Time convention (used everywhere in ``softvq.generation``): **t = 0 is data, t = 1 is noise**,

    x_t = α_t · x + σ_t · ε,        ε ~ N(0, I),        α_0 = σ_1 = 1,  α_1 = σ_0 = 0,

which is the convention of the SoftVQ release and REPA (the samplers run t from 1 down to 0).
The SiT paper writes the same paths with t reversed (t = 1 data); its time s maps to ours as
t = 1 − s. Paths (SiT Sec. 2, Tab. 1):

* ``linear``: α_t = 1 − t, σ_t = t  (rectified flow; SiT's default),
* ``cosine``: α_t = cos(πt/2), σ_t = sin(πt/2)  (SiT's "GVP": α² + σ² = 1; the SoftVQ paper's
  supp. C.2 says it trains SiT with this "cosine" schedule).

The network learns the velocity v(x_t, t) = E[α'_t x + σ'_t ε | x_t] by plain MSE (SiT Eq. 4 /
the paper's Sec. 2.2). Sampling integrates the probability-flow ODE dx = v dt from t = 1 to 0
(Euler or Heun), or the reverse SDE

    dx = [v − ½ w_t · s(x, t)] dt + √w_t dW̄,     s = score, recovered from v in closed form,

with Euler–Maruyama (SiT Eq. 6; the last step takes the mean, no noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from softvq.randomness import standard_normal

PathKind = Literal["linear", "cosine"]
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t of shape (B,)) -> v


@dataclass(frozen=True)
class Interpolant:
    """α_t, σ_t and their time derivatives for one path (t = 0 data, t = 1 noise)."""

    kind: PathKind = "linear"

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine"):
            raise ValueError(f"unknown interpolant {self.kind!r}; choose 'linear' or 'cosine' (GVP)")

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α_t, σ_t, dα/dt, dσ/dt), each shaped like ``t``."""
        if self.kind == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))

    def sample(self, x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, velocity target α'_t x + σ'_t ε) for data ``x``, noise ``ε`` and per-sample t (B,)."""
        alpha, sigma, d_alpha, d_sigma = (c.view(-1, *[1] * (x.dim() - 1)) for c in self.coefficients(t))
        return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise

    def score_from_velocity(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """∇ log p_t(x_t) implied by a velocity. With x_t = αx + σε, v = α'x + σ'ε and score
        s = −ε/σ, eliminating x gives s = (r·v − x_t) / (σ² − r·σ'σ) with r = α/α'. This form
        stays finite at t = 1 (r = 0, s = −x_t) for both paths; it is undefined at t = 0."""
        alpha, sigma, d_alpha, d_sigma = (c.view(-1, *[1] * (x_t.dim() - 1)) for c in self.coefficients(t))
        ratio = alpha / d_alpha
        return (ratio * v - x_t) / (sigma**2 - ratio * d_sigma * sigma)


def velocity_loss(model_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, path: Interpolant,
                  t_range: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """Per-sample velocity-matching loss ‖v_θ(x_t, t) − (α'_t x + σ'_t ε)‖² averaged over
    token/channel dims (SiT Eq. 4 with t ~ U(t_range)). Returns a (B,) tensor."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    lo, hi = t_range
    t = lo + (hi - lo) * torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    x_t, target = path.sample(x, noise, t)
    error = (model_fn(x_t, t) - target) ** 2
    return error.flatten(1).mean(dim=1)


def time_grid(steps: int, t_end: float = 0.0, device: torch.device | str = "cpu") -> Tensor:
    """``steps + 1`` equally spaced times from 1 (noise) down to ``t_end`` (float64)."""
    if steps < 1:
        raise ValueError(f"the sampler needs at least one step, got {steps}")
    return torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64, device=device)


def _velocity(fn: VelocityFn, x: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Evaluate the model at a scalar time, in the model's dtype; the sampler state stays float64."""
    t_batch = t.to(dtype).expand(x.shape[0])
    return fn(x.to(dtype), t_batch).to(torch.float64)


@torch.inference_mode()
def sample_ode(velocity: VelocityFn, noise: Tensor, steps: int = 50, method: Literal["euler", "heun"] = "euler",
               progress: bool = False) -> Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (``noise``) to t = 0 (data).

    ``euler``: one evaluation per step. ``heun``: Heun's 2nd-order method (SiT's ODE sampler),
    two evaluations per step except the last, which would evaluate at t = 0 and is left Euler
    as in the SiT/REPA samplers. The state is kept in float64.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose 'euler' or 'heun'")
    times = time_grid(steps, device=noise.device)
    x = noise.to(torch.float64)
    for i in _steps(steps, progress, "ODE"):
        t, t_next = times[i], times[i + 1]
        d = _velocity(velocity, x, t, noise.dtype)
        x_euler = x + (t_next - t) * d
        if method == "heun" and i < steps - 1:
            d_next = _velocity(velocity, x_euler, t_next, noise.dtype)
            x = x + (t_next - t) * 0.5 * (d + d_next)
        else:
            x = x_euler
    return x.to(noise.dtype)


def diffusion_coefficient(kind: Literal["sigma", "2t"], path: Interpolant, t: Tensor) -> Tensor:
    """w_t of the reverse SDE. ``sigma``: w_t = σ_t (SiT's default); ``2t``: w_t = 2t, what the
    SoftVQ / REPA release samples with. Any w_t ≥ 0 gives the same marginals."""
    if kind == "2t":
        return 2 * t
    if kind == "sigma":
        return path.coefficients(t)[1]
    raise ValueError(f"unknown SDE diffusion {kind!r}; choose 'sigma' or '2t'")


@torch.inference_mode()
def sample_sde(velocity: VelocityFn, noise: Tensor, path: Interpolant, steps: int = 250,
               diffusion: Literal["sigma", "2t"] = "2t", t_last: float = 0.04,
               generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Euler–Maruyama on dx = [v − ½ w_t s] dt + √w_t dW̄ from t = 1 to ``t_last``, then one
    deterministic step of the drift to t = 0 (the score is singular at t = 0). The release uses
    ``steps`` points linearly from 1 to 0.04 followed by that final mean step."""
    if steps < 2:
        raise ValueError(f"the SDE sampler needs at least 2 steps, got {steps}")
    times = torch.cat([torch.linspace(1.0, t_last, steps, dtype=torch.float64, device=noise.device),
                       torch.zeros(1, dtype=torch.float64, device=noise.device)])
    x = noise.to(torch.float64)
    for i in _steps(steps, progress, "SDE"):
        t, t_next = times[i], times[i + 1]
        dt = t_next - t
        v = _velocity(velocity, x, t, noise.dtype)
        w = diffusion_coefficient(diffusion, path, t)
        drift = v - 0.5 * w * path.score_from_velocity(v, x, t.expand(x.shape[0]))
        x = x + drift * dt
        if i < steps - 1:
            z = standard_normal(x.shape, generator, x.device, torch.float64)
            x = x + torch.sqrt(w * dt.abs()) * z
    return x.to(noise.dtype)


def _steps(n: int, progress: bool, name: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=f"{name} sampling", leave=False)
