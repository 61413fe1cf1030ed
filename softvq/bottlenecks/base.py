"""The one output contract every bottleneck honours.

Style anchor: one contract for soft, hard, Gaussian, identity and lookup-free bottlenecks, so the
tokenizer, the objective and the evaluation never special-case a quantizer. Loss *weights* live in
the training objective (paper Eq. 7), never here: ``losses`` are unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class BottleneckOutput:
    """What a bottleneck returns.

    latents: (B, L, D) the tokens the decoder reads (z in the paper).
    losses:  named *unweighted* scalar losses, e.g. ``{"kl": ...}`` for SoftVQ (Eq. 4),
             ``{"codebook": ..., "commit": ...}`` for VQ (Eq. 2), ``{"kl": ...}`` for KL-VAE (Eq. 1).
    metrics: named detached scalars for logging (perplexity, codebook usage, temperature, ...).
    indices: (B, L) or (B, L, P) hard code indices where they exist (argmax for soft posteriors).
    probs:   (B, L, K) or (B, L, P, K) posterior probabilities where they exist.
    """

    latents: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    indices: Tensor | None = None
    probs: Tensor | None = None


class Bottleneck(nn.Module):
    """Base class. Subclasses set ``input_dim`` (channels they read from the encoder projection)
    and ``latent_dim`` (channels of the latents they emit), and implement ``forward``.

    Quantizer arithmetic must run in float32 even under bf16 autocast: use :func:`float32_region`.
    """

    input_dim: int
    latent_dim: int

    def forward(self, z: Tensor) -> BottleneckOutput:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def codebook_size(self) -> int | None:
        """Codewords per codebook, or None for continuous bottlenecks."""
        return None


def float32_region(device: torch.device):
    """Disable autocast so quantizer math stays float32 under bf16 mixed precision."""
    return torch.autocast(device_type=device.type, enabled=False)
