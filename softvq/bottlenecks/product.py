"""Product quantization over channel groups (supplementary B.3, Eq. 12; Jégou et al. 2010).

    z = [z^(1), …, z^(G)],   q(z^(g)|x) = Softmax(−‖ẑ^(g) − C^(g)‖₂ / τ)

The D signal channels are split into G contiguous groups of D/G channels; group g has its own
bottleneck (its own codebook) over its channels, and the latents are concatenated back. Any
bottleneck kind can be the inner one (SoftVQ, GMMVQ, VQ, Gaussian, LFQ, AE).

Input layout follows :class:`~softvq.bottlenecks.base.Bottleneck`: [signal (D), side (G × s)],
where s is the inner kind's side channels (1 for GMMVQ's ω, D/G for the Gaussian's log σ²);
group g receives [signal group g, side group g].

Losses of the same name are summed over groups (Eq. 12 does not say; the sum makes SoftVQ's H(q)
the entropy of the joint, factorised posterior over the K^G product codes, so λ4 weighs at G = 4
what it weighs at G = 1 over the same code space), metrics averaged (see :mod:`.merge`); indices
are (B, L, G) (or (B, L, G·P) for inner kinds with P codes per token), probs (B, L, G, K).
This is *channel* grouping; the release's four codebooks split the token *sequence* instead
(:class:`~softvq.bottlenecks.segments.SegmentCodebooks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput
from softvq.bottlenecks.merge import codes_per_token, mean_metrics, parts_latents, shared_widths, stack_codes, sum_losses


class ProductQuantizer(Bottleneck):
    """G inner bottlenecks, one per channel group; children in ``parts``."""

    def __init__(self, parts: list[Bottleneck]) -> None:
        super().__init__()
        self.group_dim, self.group_side = shared_widths(parts, ("latent_dim", "side_dim"), "ProductQuantizer", "group")
        self.parts = nn.ModuleList(parts)
        self.latent_dim = self.group_dim * len(parts)
        self.input_dim = self.latent_dim + self.group_side * len(parts)

    @property
    def groups(self) -> int:
        """G, the channel groups (one codebook each)."""
        return len(self.parts)

    @property
    def codebook_size(self) -> int | None:
        """Codewords per group's codebook."""
        return cast(Bottleneck, self.parts[0]).codebook_size  # ModuleList items are typed Module

    @property
    def codes_per_token(self) -> int | None:
        """The groups' index columns together (None unless every group is a hard quantizer)."""
        return codes_per_token(cast(Iterable[Bottleneck], self.parts))

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        """Each group's codewords from its columns of ``indices``, concatenated over channels."""
        return torch.cat(parts_latents(self, cast(Iterable[Bottleneck], self.parts), indices), dim=-1)

    def forward(self, z: Tensor) -> BottleneckOutput:
        """Each channel group through its own quantizer, latents concatenated, losses summed (Eq. 12)."""
        self.check_input(z)
        signal = z[..., : self.latent_dim].split(self.group_dim, dim=-1)
        side = z[..., self.latent_dim:].split(self.group_side, dim=-1) if self.group_side else None
        outputs = []
        for g, part in enumerate(self.parts):
            inp = signal[g] if side is None else torch.cat([signal[g], side[g]], dim=-1)
            outputs.append(part(inp))
        indices, probs = stack_codes(outputs, token_dims=z.dim() - 1)
        return BottleneckOutput(
            latents=torch.cat([o.latents for o in outputs], dim=-1),
            losses=sum_losses(outputs),
            metrics=mean_metrics(outputs),
            indices=indices,
            probs=probs,
        )
