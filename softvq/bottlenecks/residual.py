"""Residual quantization over R levels (supplementary B.3, Eq. 13; Lee et al. 2022, RQ-VAE).

Each level quantizes what the previous levels left over:

    r_0 = ẑ,  z_0 = 0
    z_l = z_{l−1} + Q_l(r_{l−1})
    r_l = r_{l−1} − Q_l(r_{l−1})

Eq. 13 as printed has r_l = r_{l−1} − z_l; with z_l the running sum that would subtract earlier
levels twice from l = 2 on, so it is a typo for r_{l−1} − Q_l(r_{l−1}) (equivalently r_l = ẑ − z_l).

Each level Q_l is any bottleneck (its own codebook); a level that is a
:class:`~softvq.bottlenecks.product.ProductQuantizer` gives R-PQ (supplementary Tab. 6 "R-PQ").
Input layout: [signal (D), side (R × s)] with s the level's side channels (e.g. one ω per level
for GMMVQ); level l receives [r_{l−1}, side_l]. Losses of the same name are summed over levels
(RQ-VAE sums its per-depth losses), metrics averaged; indices (B, L, R) or (B, L, R·P) in level-major
order, probs (B, L, R[·P], K).

With a hard, straight-through level (VQ) the residual it passes on, r − (r + sg[c − r]), carries no
gradient; the encoder still receives the decoder's gradient unchanged through the first level.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput
from softvq.bottlenecks.merge import codes_per_token, mean_metrics, parts_latents, shared_widths, stack_codes, sum_losses


class ResidualQuantizer(Bottleneck):
    """R bottlenecks applied to successive residuals; children in ``levels``."""

    def __init__(self, levels: list[Bottleneck]) -> None:
        super().__init__()
        self.latent_dim, self.level_side = shared_widths(levels, ("latent_dim", "side_dim"), "ResidualQuantizer",
                                                         "level")
        self.levels = nn.ModuleList(levels)
        self.input_dim = self.latent_dim + self.level_side * len(levels)

    @property
    def codebook_size(self) -> int | None:
        """Codewords per level's codebook."""
        return cast(Bottleneck, self.levels[0]).codebook_size  # ModuleList items are typed Module

    @property
    def codes_per_token(self) -> int | None:
        """The levels' index columns together (None unless every level is a hard quantizer)."""
        return codes_per_token(cast(Iterable[Bottleneck], self.levels))

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        """The sum over levels of each level's codewords, from its columns of ``indices``."""
        return torch.stack(parts_latents(self, cast(Iterable[Bottleneck], self.levels), indices)).sum(0)

    def forward(self, z: Tensor) -> BottleneckOutput:
        """Each level quantizes what the previous ones left; latents summed, losses summed (Eq. 13)."""
        self.check_input(z)
        residual = z[..., : self.latent_dim]
        side = z[..., self.latent_dim:].split(self.level_side, dim=-1) if self.level_side else None
        total = None
        outputs = []
        for l, level in enumerate(self.levels):
            inp = residual if side is None else torch.cat([residual, side[l]], dim=-1)
            out = level(inp)
            outputs.append(out)
            total = out.latents if total is None else total + out.latents
            residual = residual - out.latents
        indices, probs = stack_codes(outputs, token_dims=z.dim() - 1)
        assert total is not None  # shared_widths refused an empty list of levels
        return BottleneckOutput(
            latents=total,
            losses=sum_losses(outputs),
            metrics=mean_metrics(outputs),
            indices=indices,
            probs=probs,
        )
