"""WeTok's group-wise lookup-free quantization, GQ / GLFQ (WeTok Sec. 3.1-3.2, Eq. 2, 4-9).

The D channels of a token u are split into g groups of d' = D/g channels. Each group has an
implicit, non-learnable codebook {−1, 1}^{d'} (2^{d'} codes), and quantization is the sign:

    Q[k] = sign(u[k])                                   (Eq. 4; u > 0 → +1, otherwise −1)
    latent = u + sg[Q − u]                              (Eq. 2, straight-through)

The entropy loss of LFQ (Eq. 5) is rewritten group-wise under the factorisation of Eq. 6,
q(c|u) = Π_k q_G(c_k|u_k):

    token entropy     (1/T) Σ_t Σ_k H(q_G(c_k|u_{t,k}))          (Eq. 7, exact by additivity)
    codebook entropy  Σ_k H((1/T) Σ_t q_G(c_k|u_{t,k}))           (Eq. 9, under assumption Eq. 8)
    entropy loss      token entropy − codebook entropy            (Eq. 5 with ζ = 1)

Eq. 5 as printed subtracts ζ·(mean of q) where H(mean of q) is meant (the "Codebook Entropy
Loss" label and Eq. 9); we implement H(mean q). ζ = 1, the same balance as SoftVQ's
H(q) − H(E q); the overall weight lives in the training objective.

WeTok does not spell out q_G; we use LFQ's distance-based soft assignment (MAGVIT-v2, Yu et al.
2024a, on which WeTok builds): q_G(c|u) ∝ exp(−‖u − c‖² / τ) = softmax_c(2 u·c / τ), with
τ = ``entropy_temperature`` (default 0.01). g = 1 is LFQ, g = D is BSQ-like (WeTok Sec. 3.2).

WeTok's released GFQ computes the same two terms pooled over the groups instead of summed
(``entropy_form="pooled"``): the token entropy is averaged over tokens and groups, (1/(T g))
Σ_t Σ_k H(q_G(c_k|u_{t,k})), and the codebook entropy is one entropy of the code distribution
averaged over tokens and groups together, H((1/(T g)) Σ_t Σ_k q_G(c_k|u_{t,k})). At g = 1 the two
forms agree. The default, ``per_group``, is the paper's.

Code indices are big-endian (the group's first channel is the most significant bit); the release
numbers codes little-endian. Both name the same 2^{d'} codes.

losses: ``entropy`` (Eq. 5 group-wise) and ``commit`` = ‖u − sg[Q]‖² (the commitment term of
Eq. 3, which LFQ keeps; per-token squared norm, mean over tokens). No codebook loss: the codebook
is fixed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softvq.bottlenecks.base import (Bottleneck, BottleneckOutput, check_count, check_positive, entropy,
                                     float32_region, full_precision)

MAX_GROUP_BITS = 16  # 2^16 codes per group: the LFQ baseline of WeTok Tab. 7 (d' = 16)
ENTROPY_FORMS = ("per_group", "pooled")  # the paper's Eqs. 7 and 9; the released GFQ's


def binary_codes(bits: int) -> Tensor:
    """All 2^bits codes in {−1, 1}^bits; row i has bit j = +1 iff bit (bits−1−j) of i is set."""
    idx = torch.arange(2**bits).unsqueeze(-1)
    powers = 2 ** torch.arange(bits - 1, -1, -1)
    return torch.where((idx & powers) > 0, 1.0, -1.0)


class GroupedLookupFree(Bottleneck):
    """WeTok GQ with ``groups`` groups over ``latent_dim`` channels: ``kind="lfq"``; ``entropy_form``
    ``per_group`` (the paper) or ``pooled`` (the release), see the module docstring."""

    codes: Tensor  # buffers registered in __init__
    bit_values: Tensor

    def __init__(self, latent_dim: int, *, groups: int = 1, entropy_temperature: float | None = None,
                 entropy_form: str = "per_group") -> None:
        super().__init__()
        check_count("latent_dim", latent_dim)
        check_count("lfq_groups", groups)
        if entropy_form not in ENTROPY_FORMS:
            raise ValueError(f"entropy_form must be 'per_group' (WeTok Eqs. 7, 9) or 'pooled' (its released GFQ), "
                             f"got {entropy_form!r}")
        self.entropy_form = entropy_form
        if entropy_temperature is not None:
            check_positive("entropy_temperature", entropy_temperature)
        if latent_dim % groups:
            raise ValueError(
                f"lfq_groups={groups} must divide the quantized channels ({latent_dim}); "
                f"choose a divisor of {latent_dim}"
            )
        bits = latent_dim // groups
        if bits > MAX_GROUP_BITS:
            raise ValueError(
                f"{bits} channels per LFQ group means 2^{bits} codes per group, too many to enumerate "
                f"for the entropy loss; raise lfq_groups so that latent_dim / lfq_groups <= {MAX_GROUP_BITS}"
            )
        self.input_dim = self.latent_dim = latent_dim
        self.groups = groups
        self.group_bits = bits
        self.entropy_temperature = 0.01 if entropy_temperature is None else entropy_temperature
        self.register_buffer("codes", binary_codes(bits), persistent=False)
        self.register_buffer("bit_values", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)

    @property
    def codebook_size(self) -> int:
        """Codes per group, 2^{d'}."""
        return 2**self.group_bits

    @property
    def codes_per_token(self) -> int:
        """One code per group."""
        return self.groups

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        """The ±1 codes that ``indices`` (tokens..., groups) name: (tokens..., D)."""
        indices = self.check_indices(indices)
        return self.codes[indices.to(self.codes.device)].flatten(-2)

    def forward(self, z: Tensor) -> BottleneckOutput:
        """sign(u) with a straight-through gradient; losses ``entropy`` (Eq. 7 − Eq. 9) and ``commit``."""
        self.check_input(z)
        with float32_region(z.device):
            u = full_precision(z)
            lead = u.shape[:-1]
            quantized = torch.where(u > 0, 1.0, -1.0)
            latents = u + (quantized - u).detach()
            commit = (u - quantized).pow(2).sum(-1).mean()

            grouped = u.reshape(-1, self.groups, self.group_bits)
            logits = 2.0 * grouped @ self.codes.to(u.dtype).t() / self.entropy_temperature  # (T, g, 2^d')
            log_q = torch.log_softmax(logits, dim=-1)
            q = log_q.exp()
            # log_softmax gives log q straight from the logits (exact where q underflows), so this
            # is not entropy(q), which would take the log of q again.
            group_mean = q.mean(0)  # (g, 2^d')
            if self.entropy_form == "per_group":
                token_entropy = -(q * log_q).sum(-1).sum(-1).mean()  # Eq. 7
                codebook_entropy = entropy(group_mean).sum()  # Eq. 9
            else:  # the release: means over tokens and groups
                token_entropy = -(q * log_q).sum(-1).mean()
                codebook_entropy = entropy(group_mean.mean(0))

            bits = quantized.reshape(-1, self.groups, self.group_bits) > 0
            indices = (bits.long() * self.bit_values).sum(-1)  # (T, g)
            used = torch.zeros(self.groups, self.codebook_size, device=u.device, dtype=torch.bool)
            used.scatter_(1, indices.t(), True)
            metrics = {
                "token_entropy": token_entropy.detach(),
                "codebook_entropy": codebook_entropy.detach(),
                "soft_perplexity": torch.exp(entropy(group_mean.detach())).mean(),
                "usage": used.float().mean(),
            }
            return BottleneckOutput(
                latents=latents,
                losses={"entropy": token_entropy - codebook_entropy, "commit": commit},
                metrics=metrics,
                indices=indices.reshape(*lead, self.groups),
                probs=q.detach().reshape(*lead, self.groups, self.codebook_size),
            )
