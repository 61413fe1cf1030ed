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
        """Fail with a clear message when the encoder projection is no tensor, has the wrong width or
        holds no tokens."""
        if not isinstance(z, Tensor):
            raise TypeError(f"{type(self).__name__} takes a torch.Tensor (..., {self.input_dim}), got "
                            f"{type(z).__name__}; convert it with torch.as_tensor(z, dtype=torch.float32)")
        if z.dim() < 2 or z.shape[-1] != self.input_dim:
            raise ValueError(
                f"{type(self).__name__} expects inputs (..., {self.input_dim}) "
                f"({self.latent_dim} signal + {self.side_dim} side channels), got {tuple(z.shape)}"
            )
        if z.numel() == 0:  # the losses would be means over nothing: NaN
            raise ValueError(f"{type(self).__name__} got no tokens, inputs {tuple(z.shape)}; pass at least one")

    @property
    def codebook_size(self) -> int | None:
        """Codewords per codebook, or None for continuous bottlenecks."""
        return None

    # Hard quantizers' indices determine their latents: VQ's are (tokens), every other hard kind's
    # (tokens, P), P = codes_per_token. Read only where codes_per_token is set (soft and continuous
    # kinds keep the defaults below and refuse indices_to_latents).
    indices_have_code_axis = True

    @property
    def codes_per_token(self) -> int | None:
        """P, the indices one token has under a hard quantizer (1 for VQ, the groups for LFQ, summed
        over a product's groups or a residual's levels), or None where indices do not determine the
        latents (SoftVQ's are an argmax of a weighted sum; continuous kinds have none)."""
        return None

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        """A hard quantizer's latents from its ``forward(z).indices``: the codewords they name,
        float32. Equal to ``forward(z).latents`` up to the straight-through sum's rounding (a few
        ulp). Kinds whose indices do not determine their latents refuse, naming why."""
        raise TypeError(f"{type(self).__name__}'s indices do not determine its latents (SoftVQ and GMMVQ latents "
                        f"are softmax-weighted sums of codewords, of which the index is only the argmax; KL and AE "
                        f"latents are continuous): keep and decode the latents instead")

    def check_indices(self, indices: Tensor) -> Tensor:
        """``indices`` as long, after checking the dtype, the code axis's width and the range."""
        if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex() or \
                indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer torch.Tensor, as forward(z).indices returns; got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        width = self.codes_per_token
        if self.indices_have_code_axis and (indices.dim() < 2 or indices.shape[-1] != width):
            raise ValueError(f"{type(self).__name__} indices are (tokens..., {width}), got {tuple(indices.shape)}")
        size = self.codebook_size
        if indices.numel() and size is not None and (int(indices.min()) < 0 or int(indices.max()) >= size):
            raise ValueError(f"indices must lie in [0, {size}) (the codebook size), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return indices.long()


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

