"""DiT's Gaussian diffusion: noise schedules, the learned-sigma hybrid loss, respaced sampling.

Discrete-time DDPM (Ho et al. 2020) as improved by Nichol & Dhariwal 2021 (IDDPM) and used by
DiT (Peebles & Xie 2023):

* forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), T = 1000 steps, t = 0 nearly data;
* schedules: ``cosine`` ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), s = 0.008,
  β clipped at 0.999 (IDDPM Eq. 17; the SoftVQ paper uses it for DiT, supp. C.2), or DiT's
  ``linear`` β from 1e-4 to 0.02;
* the network predicts ε and, with a learned sigma, v ∈ [−1, 1] per channel that interpolates the
  log variance between β̃_t (posterior) and β_t (IDDPM Eq. 15);
* loss L_hybrid = L_simple + λ·L_vlb (IDDPM Sec. 3.1): the per-timestep term L_t is computed
  with a stop-gradient on the mean so it trains only the variance. With L_vlb = Σ_t L_t and
  λ = 0.001 at T = 1000 this is MSE + ``vlb_weight``·L_t with vlb_weight = 1, which is what DiT
  optimises (its default loss type "MSE");
* sampling: ancestral DDPM on a respaced schedule of K ≤ T evenly spaced steps (IDDPM Sec. 4;
  DiT samples with 250), whose β are recomputed so the kept ᾱ are unchanged.

All schedule arithmetic is float64 on the CPU (also when a model is built on ``meta``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from softvq.randomness import standard_normal

ScheduleKind = Literal["cosine", "linear"]
VarianceKind = Literal["learned", "fixed-small", "fixed-large"]
ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, original step index (B,)) -> output


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """IDDPM Eq. 17: β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) with ᾱ(t) ∝ cos²((t/T + s)/(1 + s) · π/2)."""
    t = torch.arange(steps + 1, dtype=torch.float64, device="cpu") / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def linear_betas(steps: int) -> Tensor:
    """DDPM / DiT: β linear from 1e-4 to 0.02 at T = 1000 (scaled by 1000/T for other T)."""
    scale = 1000 / steps
    return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64, device="cpu")


def make_betas(kind: ScheduleKind, steps: int = 1000) -> Tensor:
    """The β schedule named ``kind`` over ``steps`` steps, in float64: ``cosine`` (improved DDPM) or
    ``linear`` (DDPM, scaled to the step count)."""
    if kind == "cosine":
        return cosine_betas(steps)
    if kind == "linear":
        return linear_betas(steps)
    raise ValueError(f"unknown noise schedule {kind!r}; choose 'cosine' or 'linear'")


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` original steps spread evenly over [0, T−1], both ends included (IDDPM's
    ``space_timesteps`` with one section: round(i · (T−1)/(count−1)))."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} steps to {count}; choose 1..{num_timesteps}")
    if count == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x: Tensor, mean: Tensor, log_scale: Tensor, bin_width: float = 2 / 255) -> Tensor:
    """−log P(x) of a Gaussian integrated over a bin of ``bin_width`` around x, with open outer bins
    at ±1 (the decoder term L_0 of DDPM/IDDPM/DiT, which all keep it also for latents)."""
    inv_std = torch.exp(-log_scale)
    upper = torch.special.ndtr(inv_std * (x - mean + bin_width / 2))
    lower = torch.special.ndtr(inv_std * (x - mean - bin_width / 2))
    tiny = 1e-12
    log_probs = torch.where(
        x < -0.999, torch.log(upper.clamp(min=tiny)),
        torch.where(x > 0.999, torch.log((1 - lower).clamp(min=tiny)), torch.log((upper - lower).clamp(min=tiny))),
    )
    return -log_probs


def _take(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] broadcast to ``like``'s shape, in ``like``'s dtype."""
    out = values.to(t.device)[t].to(like.dtype)
    return out.view(-1, *[1] * (like.dim() - 1))


def _mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


class GaussianDiffusion:
    """A discrete Gaussian diffusion defined by its β (float64).

    ``timestep_map[i]`` is the original step index the network is conditioned on at this
    process's step i (identity unless respaced). ``channel_dim`` is where a learned-sigma output
    stacks [ε, v]: −1 for (B, L, D) tokens, 1 for (B, C, H, W) grids.
    """

    def __init__(self, betas: Tensor, variance: VarianceKind = "learned", channel_dim: int = -1,
                 timestep_map: list[int] | None = None, original_steps: int | None = None) -> None:
        betas = betas.to("cpu", torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1D tensor in (0, 1]")
        if variance not in ("learned", "fixed-small", "fixed-large"):
            raise ValueError(f"unknown variance {variance!r}; choose learned, fixed-small or fixed-large")
        self.betas = betas
        self.variance = variance
        self.channel_dim = channel_dim
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(betas)), device="cpu")
        self.original_steps = original_steps or self.num_timesteps
        alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t)   (DDPM Eq. 6-7)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # β̃_0 = 0: clip its log to β̃_1 as IDDPM does; a one-step process has no β̃_1 and takes β_0
        # (its only step adds no noise when sampling, so the value only bounds a learned σ's range)
        later = self.posterior_variance[1:]
        self.posterior_log_variance_clipped = torch.log(torch.cat([later[:1] if len(later) else betas[:1], later]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * alphas.sqrt() / (1 - self.alphas_cumprod)

    @classmethod
    def from_schedule(cls, schedule: ScheduleKind = "cosine", steps: int = 1000, **kwargs) -> "GaussianDiffusion":
        """A diffusion on the named β schedule; ``kwargs`` go to the constructor."""
        return cls(make_betas(schedule, steps), **kwargs)

    # --- forward process ----------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        return _take(self.sqrt_alphas_cumprod, t, x0) * x0 + _take(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, variance, clipped log variance) of q(x_{t−1} | x_t, x_0)."""
        mean = _take(self.posterior_mean_coef1, t, x_t) * x0 + _take(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _take(self.posterior_variance, t, x_t), _take(self.posterior_log_variance_clipped, t, x_t)

    # --- reverse process ----------------------------------------------------------------------

    def split(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """The network output as (ε, v): v, the variance interpolation, only for a learned variance."""
        if self.variance != "learned":
            return out, None
        eps, v = out.chunk(2, dim=self.channel_dim)
        return eps, v

    def p_mean_variance(self, out: Tensor, x_t: Tensor, t: Tensor, clip_x0: float | None = None) -> dict[str, Tensor]:
        """Mean, log variance and x̂_0 of p(x_{t−1} | x_t) from the network output (ε [, v]);
        ``clip_x0`` clamps x̂_0 to [−c, c] before the mean is formed (IDDPM's ``clip_denoised``
        with c = 1 for images; off in DiT's and MAR's latent samplers)."""
        eps, v = self.split(out)
        if self.variance == "learned":
            assert v is not None  # split gives v for a learned variance
            min_log = _take(self.posterior_log_variance_clipped, t, x_t)
            max_log = _take(torch.log(self.betas), t, x_t)
            frac = (v + 1) / 2  # IDDPM Eq. 15: v in [-1, 1] interpolates log β̃_t .. log β_t
            log_var = frac * max_log + (1 - frac) * min_log
        elif self.variance == "fixed-large":
            # σ² = β_t, with β̃_1 at t = 0 as IDDPM does (a one-step process has no β̃_1: β_0, as above)
            large = torch.cat([self.posterior_variance[1:2] if self.num_timesteps > 1 else self.betas[:1],
                               self.betas[1:]])
            log_var = _take(torch.log(large), t, x_t).expand_as(x_t)
        else:
            log_var = _take(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        pred_x0 = _take(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _take(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        if clip_x0 is not None:
            pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    # --- training -----------------------------------------------------------------------------

    def training_losses(self, model: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                        vlb_weight: float = 1.0) -> dict[str, Tensor]:
        """Per-sample L_simple = ‖ε − ε_θ‖² (mean over dims) and, with a learned variance,
        L_t (bits/dim) with the mean frozen; ``loss`` = mse + vlb_weight · vb."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.timestep_map.to(t.device)[t])
        eps, v = self.split(out)
        terms = {"mse": _mean_flat((noise - eps) ** 2)}
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=self.channel_dim)
            terms["vb"] = self.vlb_term(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + vlb_weight * terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def vlb_term(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_t in bits/dim: KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(out, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = _mean_flat(discretized_gaussian_nll(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # --- respacing and sampling ---------------------------------------------------------------

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """A diffusion over ``steps`` evenly spaced original steps with β_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}},
        so its cumulative alphas equal the original ones at the kept steps (IDDPM Sec. 4)."""
        keep = space_timesteps(self.num_timesteps, steps)
        kept = self.alphas_cumprod[keep]
        prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), kept[:-1]])
        original = [int(self.timestep_map[k]) for k in keep]
        return GaussianDiffusion(1 - kept / prev, self.variance, self.channel_dim, original, self.original_steps)

    def noise_level(self, t: Tensor) -> Tensor:
        """τ ∈ [0, 1] (float64) for the original step indices ``t`` the model is called with
        (original index / original T), for guidance intervals."""
        return t.to(torch.float64) / self.original_steps

    @torch.inference_mode()
    def p_sample_loop(self, model: ModelFn, noise: Tensor, generator: torch.Generator | None = None,
                      progress: bool = False, temperature: float = 1.0, clip_x0: float | None = None) -> Tensor:
        """Ancestral sampling from x_T = ``noise`` down to x_0; the model sees original step indices.
        ``temperature`` scales the noise added at each step (MAR's sampling temperature τ, Li et al.
        2024 Sec. 3.3; 1 is plain DDPM); ``clip_x0`` see :meth:`p_mean_variance`."""
        x = noise
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="DDPM sampling", leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = model(x, self.timestep_map.to(x.device)[t])
            p = self.p_mean_variance(out, x, t, clip_x0)
            x = p["mean"]
            if i > 0:
                z = standard_normal(x.shape, generator, x.device, x.dtype)
                x = x + torch.exp(0.5 * p["log_variance"]) * z * temperature
        return x
