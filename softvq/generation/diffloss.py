"""MAR's diffusion loss: a small per-token denoiser that models p(x | z) for one continuous token.

Li et al. 2024 ("Autoregressive Image Generation without Vector Quantization", Sec. 3) replace a
categorical head over a codebook with a diffusion model of each token x ∈ R^D, conditioned on the
vector z the autoregressive transformer produced at that token's position:

    L(z, x) = E_{ε, t} ‖ε − ε_θ(x_t | t, z)‖²        (their Eq. 2)

The denoiser is an MLP of residual blocks whose LayerNorms are modulated by t + z (adaLN, as in
DiT), with a zero-initialised output head, and — as in the released MAR — it predicts [ε, v] and
is trained with DiT's hybrid loss (MSE + L_vlb for the learned variance, cosine schedule, T = 1000);
sampling is DDPM on 100 respaced steps with a temperature τ on the noise (their Sec. 3.3).
The Gaussian diffusion itself is :mod:`softvq.generation.diffusion`, shared with DiT.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from softvq.generation.diffusion import GaussianDiffusion, ScheduleKind
from softvq.generation.embeddings import TimestepEmbedder
from softvq.randomness import standard_normal


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLNResidualBlock(nn.Module):
    """x + gate · MLP(adaLN(x; shift, scale)), with (shift, scale, gate) = Linear(SiLU(cond)); the
    modulation starts at zero, so the block starts as the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class DenoisingMLP(nn.Module):
    """ε_θ(x_t | t, z): (N, D) noisy tokens, (N,) step indices, (N, C) conditions -> (N, 2D) = [ε, v]."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNResidualBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, 2 * token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialisation (as MAR's head uses): Xavier-uniform linears with zero bias,
        N(0, 0.02) timestep MLP, zero adaLN modulations and a zero output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in self.time_embed.linears():
            nn.init.normal_(layer.weight, std=0.02)
        # Sequential / ModuleList items are typed Module: these are the blocks' and the head's Linears
        blocks = cast(Iterable[AdaLNResidualBlock], self.blocks)
        modulations = cast(list[nn.Linear], [b.modulation[-1] for b in blocks] + [self.final_modulation[-1]])
        for layer in modulations + [self.output]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        h = self.input_proj(x)
        c = self.time_embed(t) + self.cond_embed(cond)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.output(_modulate(self.final_norm(h), shift, scale))


class DiffusionLoss(nn.Module):
    """The per-token diffusion head: ``head(target, cond)`` gives the training loss and
    ``sample(cond, ...)`` for generation. ``target`` (N, D) are the true tokens, ``cond`` (N, C)
    the transformer's outputs at their positions."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int,
                 schedule: str = "cosine", diffusion_steps: int = 1000) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.net = DenoisingMLP(token_dim, cond_dim, width, depth)
        kind = cast(ScheduleKind, schedule)  # a plain string from MARConfig; make_betas rejects other names
        self.diffusion = GaussianDiffusion.from_schedule(kind, diffusion_steps, variance="learned", channel_dim=-1)

    def forward(self, target: Tensor, cond: Tensor) -> dict[str, Tensor]:
        """Hybrid loss of each token at one random step, averaged: {"loss", "mse", "vb"}."""
        t = torch.randint(0, self.diffusion.num_timesteps, (target.shape[0],), device=target.device)
        terms = self.diffusion.training_losses(lambda x_t, step: self.net(x_t, step, cond), target, t)
        return {k: v.mean() for k, v in terms.items()}

    @torch.inference_mode()
    def sample(self, cond: Tensor, steps: int = 100, temperature: float = 1.0,
               uncond: Tensor | None = None, cfg: float = 1.0, generator: torch.Generator | None = None,
               clip_x0: float | None = None) -> Tensor:
        """Draw one token per row of ``cond`` by DDPM on ``steps`` respaced steps.

        With ``uncond`` (the transformer's outputs for the null class) and ``cfg`` ≠ 1, ε is
        guided as ε_u + cfg·(ε_c − ε_u) from one shared noise draw per token, and the variance
        is the conditional one (MAR's ``forward_with_cfg``). ``clip_x0`` (off in MAR) clamps the
        predicted clean token to [−c, c] at every step: with the cosine schedule ᾱ_999 ≈ 2.4e-9, so
        the first step multiplies an ε error by ~300, which an under-trained head cannot afford."""
        diffusion = self.diffusion.respaced(steps)
        noise = standard_normal((cond.shape[0], self.token_dim), generator, cond.device, cond.dtype)
        guided = uncond is not None and cfg != 1.0
        d = self.token_dim

        def model(x: Tensor, t: Tensor) -> Tensor:
            if not guided:
                return self.net(x, t, cond)
            assert uncond is not None  # guided
            both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
            c, u = both.chunk(2)
            eps = u[:, :d] + cfg * (c[:, :d] - u[:, :d])
            return torch.cat([eps, c[:, d:]], dim=-1)

        return diffusion.p_sample_loop(model, noise, generator=generator, temperature=temperature, clip_x0=clip_x0)
