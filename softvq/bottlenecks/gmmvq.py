"""GMMVQ: SoftVQ whose temperature is predicted per token (paper Sec. 3.2 "Interpretation",
supplementary B.2, Eq. 11).

    posterior  q(z|x) = Softmax(−ω(ẑ) ‖ẑ − C‖₂)      ω(ẑ) > 0 replaces 1/τ
    latent     z = q · C
    kl         L_kl = H(q) − H(E_x q)

The encoder projection carries one extra channel per token (``input_dim = latent_dim + 1``):
channels [0, D) are ẑ, channel D is the raw weight w, and ω = softplus(w + b) with the constant
b = softplus⁻¹(1/τ₀) so that a fresh model (w ≈ 0) starts at SoftVQ's temperature τ₀ (0.07 by
default). The paper states only that the encoder predicts ω; softplus (for positivity) and the
offset are our choices. One ω per token follows B.2's "data-dependent temperature parameters"; "the
weights of the Gaussian component" could also be read as one ω per codeword (a K-vector per token),
which is not built. The codebook still feeds the decoder directly (B.2: no reparametrisation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from softvq.bottlenecks.softvq import SoftVQ


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y, for y > 0."""
    return y + math.log(-math.expm1(-y))


class GMMVQ(SoftVQ):
    """Gaussian-mixture soft VQ (B.2): per-token weights ω(ẑ) from an extra encoder channel.

    Takes the same arguments as :class:`SoftVQ`; ``temperature`` sets the initial 1/ω and
    ``learnable_temperature`` is not used (ω is predicted, not a parameter).
    """

    def __init__(self, latent_dim: int, codebook_size: int, **kwargs: Any) -> None:
        if kwargs.pop("learnable_temperature", False):
            raise ValueError("GMMVQ predicts its weights ω(ẑ) per token; learnable_temperature does not apply")
        super().__init__(latent_dim, codebook_size, **kwargs)
        self.input_dim = latent_dim + 1
        # τ as the buffer holds it (rounded as log τ is stored), computed on the CPU: a model built on
        # the meta device has no values to read
        tau = float(torch.tensor(math.log(kwargs.get("temperature", 0.07)), device="cpu").exp())
        self.weight_offset = inverse_softplus(1.0 / tau)

    def split_input(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(ẑ, ω) with ω = softplus(w + b) read from the last channel."""
        signal, raw = z[..., : self.latent_dim], z[..., self.latent_dim]
        return signal, F.softplus(raw + self.weight_offset)
