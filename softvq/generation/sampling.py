"""From class labels to normalised latents with a trained generator: one entry point for every sampler.

Methods: SiT ``euler`` / ``heun`` (probability-flow ODE) and ``sde`` (Euler–Maruyama);
DiT ``ddpm`` (ancestral sampling on a respaced schedule). Defaults follow the DiT / SiT / REPA
evaluations: 250 steps, SDE for SiT, DDPM for DiT. Guidance (scale and interval) is applied in the
package's time convention (τ = 0 data, τ = 1 noise; see :mod:`softvq.generation.guidance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from softvq.generation.checkpoint import GeneratorMeta
from softvq.generation.diffusion import GaussianDiffusion
from softvq.generation.guidance import Guidance, guided
from softvq.generation.models import LatentTransformer
from softvq.generation.transport import Interpolant, sample_ode, sample_sde

Method = Literal["euler", "heun", "sde", "ddpm"]
SIT_METHODS = ("euler", "heun", "sde")


@dataclass(frozen=True)
class SamplerSpec:
    """Which sampler, how many steps, and the guidance to apply."""

    method: Method | None = None  # None: sde for SiT, ddpm for DiT
    steps: int = 250
    guidance: Guidance = Guidance()
    sde_diffusion: Literal["sigma", "2t"] = "2t"

    def resolved(self, objective: str) -> Method:
        method = self.method or ("sde" if objective == "sit" else "ddpm")
        if objective == "sit" and method not in SIT_METHODS:
            raise ValueError(f"a SiT generator samples with {', '.join(SIT_METHODS)}, not {method!r}")
        if objective == "dit" and method != "ddpm":
            raise ValueError(f"a DiT generator samples with 'ddpm', not {method!r}")
        return method

    def evaluations(self, objective: str) -> int:
        """Network evaluations per image without guidance (for throughput extrapolation)."""
        method = self.resolved(objective)
        return 2 * self.steps - 1 if method == "heun" else self.steps


def sample_latents(model: LatentTransformer, meta: GeneratorMeta, labels: Tensor, spec: SamplerSpec = SamplerSpec(),
                   generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Sample normalised latents ((z − mean)/std space) for ``labels`` (B,) on the model's device."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    labels = labels.to(device)
    method = spec.resolved(meta.objective)
    noise = torch.randn((labels.shape[0], *model.input_shape), generator=generator, device="cpu").to(device, dtype)
    # a CPU generator cannot draw on another device: later noise then follows the global seed
    generator = generator if device.type == "cpu" else None
    null = model.null_class if spec.guidance.scale != 1.0 else 0

    if meta.objective == "sit":
        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return guided(model, x, t, labels, spec.guidance, null)

        if method == "sde":
            return sample_sde(velocity, noise, Interpolant(meta.path), steps=spec.steps,
                              diffusion=spec.sde_diffusion, generator=generator, progress=progress)
        return sample_ode(velocity, noise, steps=spec.steps, method=method, progress=progress)

    diffusion = GaussianDiffusion.from_schedule(
        meta.schedule, meta.diffusion_steps,
        variance="learned" if model.config.sigma_learned else "fixed-large",
        channel_dim=-1 if model.config.layout == "1d" else 1,
    ).respaced(spec.steps)
    channel_dim = 2 if model.config.layout == "1d" else 1
    channels = (channel_dim, model.config.latent_dim) if model.config.sigma_learned else None

    def eps_model(x: Tensor, t: Tensor) -> Tensor:
        tau = t.to(torch.float64) / diffusion.original_steps
        return guided(model, x, t, labels, spec.guidance, null, tau=tau, guided_channels=channels)

    return diffusion.p_sample_loop(eps_model, noise, generator=generator, progress=progress)


def denormalize(latents: Tensor, meta: GeneratorMeta) -> Tensor:
    """Generator space -> tokenizer latents: z = x · std + mean."""
    return latents * meta.latent_std + meta.latent_mean
