"""The one output contract every bottleneck honours.

Style anchor: one contract for soft, hard, Gaussian, identity and lookup-free bottlenecks, so the
tokenizer, the objective and the evaluation never special-case a quantizer. Loss *weights* live in
the training objective (paper Eq. 7), never here: ``losses`` are unweighted.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class BottleneckOutput:
    """What a bottleneck returns.

    latents: (B, L, D) the tokens the decoder reads (z in the paper).
    losses:  named *unweighted* scalar losses, e.g. ``{"kl": ...}`` for SoftVQ (Eq. 4),
             ``{"codebook": ..., "commit": ...}`` for VQ (Eq. 2), ``{"kl": ...}`` for KL-VAE (Eq. 1).
    metrics: named detached scalars for logging (perplexity, codebook usage, temperature, ...).
    indices: (B, L) or (B, L, P) hard code indices where they exist (argmax for soft posteriors);
             P counts the codes of one token under composition (groups, levels).
    probs:   (B, L, K) or (B, L, P, K) posterior probabilities where they exist. The memory-lean
             SoftVQ path does not materialise them while gradients are recorded (see
             :mod:`softvq.bottlenecks.soft_assign`); they are always there under ``no_grad``.
    entropy_terms: the differentiable pieces of a categorical regulariser H(q) - H(E q), for
             compositions that pool the batch posterior across parts (the release's segments).
    """

    latents: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    indices: Tensor | None = None
    probs: Tensor | None = None
    entropy_terms: "EntropyTerms | None" = None


@dataclass
class EntropyTerms:
    """Mean per-token entropy H(q) (scalar) and the batch posterior E q (K,), both differentiable,
    so that ``token_entropy - entropy(mean_posterior)`` is the regulariser of Eq. 4 / B.1."""

    token_entropy: Tensor
    mean_posterior: Tensor


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy H(p) = −Σ p log p in nats along ``dim``, with 0·log 0 = 0 exactly.

    The one entropy of the categorical regularisers (SoftVQ's H(q) − H(E q), Eq. 4 / B.1; WeTok's
    codebook entropy, Eq. 9) and of the codebook perplexity metrics. The log is taken of 1 where
    p = 0, so that zeros add exactly 0 and get a finite gradient (d/dp p·log p → −∞ there; an
    upstream softmax multiplies it by p = 0, and 0·∞ would be NaN), while every p > 0, however
    small, keeps its exact term and gradient: no eps floor, in float32 or float64.
    """
    safe = torch.where(probs > 0, probs, torch.ones_like(probs))
    return -(probs * safe.log()).sum(dim)


class Bottleneck(nn.Module):
    """Base class. Subclasses set ``input_dim`` (channels they read from the encoder projection)
    and ``latent_dim`` (channels of the latents they emit), and implement ``forward``.

    Input layout, shared by every bottleneck so that compositions can route channels: the first
    ``latent_dim`` channels are the signal ẑ, the remaining ``side_dim = input_dim - latent_dim``
    are side information (GMMVQ's weight ω, the Gaussian's log-variance).

    Quantizer arithmetic must run in float32 even under bf16 autocast: use :func:`float32_region`.
    """

    input_dim: int
    latent_dim: int

    def forward(self, z: Tensor) -> BottleneckOutput:  # pragma: no cover - interface
        """Encoder projection z (..., input_dim) -> :class:`BottleneckOutput` (latents (..., latent_dim))."""
        raise NotImplementedError

    def latents(self, z: Tensor) -> Tensor:
        """``forward(z).latents`` alone. Subclasses whose losses, metrics or posterior cost real
        time (SoftVQ) skip them here when no gradient is recorded; the values are the same."""
        return self(z).latents

    @property
    def side_dim(self) -> int:
        """Channels of side information after the signal (0 for most quantizers)."""
        return self.input_dim - self.latent_dim

    def check_input(self, z: Tensor) -> None:
        """Fail with a clear message when the encoder projection is no tensor or has the wrong width."""
        if not isinstance(z, Tensor):
            raise TypeError(f"{type(self).__name__} takes a torch.Tensor (..., {self.input_dim}), got "
                            f"{type(z).__name__}; convert it with torch.as_tensor(z, dtype=torch.float32)")
        if z.dim() < 2 or z.shape[-1] != self.input_dim:
            raise ValueError(
                f"{type(self).__name__} expects inputs (..., {self.input_dim}) "
                f"({self.latent_dim} signal + {self.side_dim} side channels), got {tuple(z.shape)}"
            )

    @property
    def codebook_size(self) -> int | None:
        """Codewords per codebook, or None for continuous bottlenecks."""
        return None


def full_precision(x: Tensor, *alongside: Tensor) -> Tensor:
    """``x`` in float32, or float64 when it or a tensor it meets (``alongside``: the codebook for the
    inputs, the inputs for the codebook) is: quantizer math never runs in half precision (autocast,
    bf16 weights), nor below a float64 model's or input's own precision (gradient checks), and a
    float64 input meets a float32 codebook in float64 rather than in a dtype-mismatch error."""
    wide = any(t.dtype == torch.float64 for t in (x, *alongside))
    return x.to(torch.float64 if wide else torch.float32)


def float32_region(device: torch.device) -> torch.autocast:
    """Disable autocast so quantizer math stays float32 under bf16 mixed precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def check_count(name: str, value: Any) -> None:
    """``value`` must be a whole number of at least 1 (a width, a codebook size, a group count)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def check_positive(name: str, value: Any) -> None:
    """``value`` must be a finite number above 0 (a temperature)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):  # type: ignore[operator]  # typeshed's numbers.Real has no __gt__
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def check_chunk_size(name: str, value: Any) -> None:
    """The memory-lean path's chunk: ``None`` (automatic), 0 (straightforward) or a positive count."""
    if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{name} must be None (auto), 0 (straightforward) or positive, got {value!r}")

