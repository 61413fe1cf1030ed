"""The KL-VAE baseline: a diagonal Gaussian posterior (paper Sec. 2.1, Eq. 1; supplementary A, Eq. 8).

    posterior  q(z|x) = N(μ(x), σ²(x))
    latent     z = μ + σ ⊙ ε, ε ~ N(0, I)     (re-parametrisation; training mode)
               z = μ                          (evaluation mode: the posterior mean)
    kl         KL(q ‖ N(0, I)) = ½ Σ_{j=1..D} (μ_j² + σ_j² − 1 − log σ_j²)

Input layout: the encoder projection has 2D channels, [μ (D), log σ² (D)]. log σ² is clamped to
[−30, 20] before use, as latent-diffusion's DiagonalGaussianDistribution does, so exp() stays finite.

``kl`` is summed over the D channels (Eq. 8 sums j = 1..D) and averaged over tokens and batch, and
returned unweighted. The released KLModel instead sums over tokens and channels and averages over
the batch only (L times ours). Note the sign: Eq. 1 writes −½(1 + log σ² − μ² − σ²), the KL;
supplementary Eq. 8's last line drops the minus sign (a typo: as printed it is the negative KL).
"""

from __future__ import annotations

import torch
from torch import Tensor

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput, check_count, float32_region, full_precision

LOGVAR_RANGE = (-30.0, 20.0)


class GaussianPosterior(Bottleneck):
    """Diagonal Gaussian bottleneck of KL-VAE (Eq. 1): ``kind="kl"``."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        check_count("latent_dim", latent_dim)
        self.latent_dim = latent_dim
        self.input_dim = 2 * latent_dim

    def forward(self, z: Tensor) -> BottleneckOutput:
        """Mean / log-variance channels -> a reparametrised sample in training, the mean in eval mode; loss ``kl``."""
        self.check_input(z)
        with float32_region(z.device):
            z = full_precision(z)
            mean, logvar = z[..., : self.latent_dim], z[..., self.latent_dim:]
            logvar = logvar.clamp(*LOGVAR_RANGE)
            var = logvar.exp()
            if self.training:
                latents = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
            else:
                latents = mean
            kl = 0.5 * (mean.pow(2) + var - 1.0 - logvar).sum(-1).mean()
            metrics = {
                "posterior_std": var.detach().sqrt().mean(),
                "mean_abs": mean.detach().abs().mean(),
            }
            return BottleneckOutput(latents=latents, losses={"kl": kl}, metrics=metrics)
