"""The 1D ViT encoder (paper Sec. 3.1): image patches plus L learnable latent tokens.

Sequence: [cls, N patch tokens, L latent tokens]. cls and patches take the 2D absolute position
embedding (its first row is the cls position, as in the release); latent tokens take their own
1D position embedding. Only the last L outputs are kept: ẑ = E([x_p; z_l]).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from softvq.config import ViTConfig
from softvq.networks.vit import init_vit_weights, resize_grid_embed, run_blocks, stack_blocks


class TokenEncoder(nn.Module):
    """ViT encoder returning (B, L, width) latent-token features."""

    def __init__(
        self,
        vit: ViTConfig,
        *,
        image_size: int,
        patch_size: int,
        num_tokens: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.patch_size = patch_size
        self.grid = (grid, grid)
        self.patch_embed = nn.Conv2d(in_channels, vit.width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vit.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, vit.width))
        self.latent_tokens = nn.Parameter(torch.zeros(1, num_tokens, vit.width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, num_tokens, vit.width))
        self.blocks = stack_blocks(vit)
        self.norm = nn.LayerNorm(vit.width, eps=vit.norm_eps)
        self.num_tokens = num_tokens
        init_vit_weights(self, [self.cls_token, self.pos_embed, self.latent_tokens, self.latent_pos_embed])

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        grid_pos = resize_grid_embed(self.pos_embed[:, 1:], (h // p, w // p))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        latents = (self.latent_tokens + self.latent_pos_embed).expand(b, -1, -1)
        x = torch.cat([cls, x + grid_pos, latents], dim=1)
        # Only the latent tokens leave the encoder: ~5% of an S encoder's work saved.
        return self.norm(run_blocks(self.blocks, x, keep=slice(-self.num_tokens, None)))

