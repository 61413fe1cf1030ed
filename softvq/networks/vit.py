"""DINOv2-style ViT building blocks shared by the tokenizer's encoder and decoder.

Paper Sec. 3.1 uses ViT encoders/decoders; the released checkpoints use DINOv2 blocks
(pre-LayerNorm with eps 1e-6, fused qkv with bias, MLP ratio 4 with GELU, LayerScale on both
residual branches initialised to 1e-5), so these modules are laid out to map one to one onto
them (see ``softvq.checkpoint.official``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from softvq.config import ViTConfig


class Attention(nn.Module):
    """Full bidirectional multi-head self-attention through ``scaled_dot_product_attention``.

    ``explicit=True`` computes softmax(QK^T/sqrt(d))V by hand in float32: the plain research
    baseline the benchmarks compare against, numerically the same operation.
    ``dropout`` drops attention weights in training mode (0 for the tokenizer; MAR uses 0.1).
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.explicit = False

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.mix(x))

    def mix(self, x: Tensor, rows: slice | None = None) -> Tensor:
        """Attention before the output projection: (B, N, C) heads concatenated. With ``rows``
        only the tokens ``x[:, rows]`` attend (every token is still a key and a value), giving
        (B, len(rows), C): the rows a caller would throw away are never computed."""
        b, n, c = x.shape
        heads, d = self.heads, c // self.heads
        if rows is None:
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, rows], w[:c], None if bias is None else bias[:c])
            q = q.reshape(b, q.shape[1], heads, d).transpose(1, 2)
            k, v = F.linear(x, w[c:], None if bias is None else bias[c:]).reshape(b, n, 2, heads, d).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if self.explicit:
            scale = 1.0 / math.sqrt(q.shape[-1])
            weights = F.dropout((q.float() @ k.float().transpose(-2, -1) * scale).softmax(dim=-1), p)
            out = (weights @ v.float()).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return out.transpose(1, 2).reshape(b, q.shape[2], c)


class Mlp(nn.Module):
    """Two-layer GELU MLP (ViT, ratio 4)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.fused = True  # in-place GELU without autograd; reference_math() turns it off

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(x))

    def hidden(self, x: Tensor) -> Tensor:
        """The MLP before its output layer."""
        u = self.fc1(x)
        if self.fused and not torch.is_grad_enabled() and type(self.act) is nn.GELU:
            # In place when nothing is recorded for backward: the hidden activation is the largest
            # tensor of a block, and a fresh buffer for it costs ~10% of a CPU forward (page faults).
            return torch.ops.aten.gelu_(u, approximate=self.act.approximate)
        return self.act(u)


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT / DINOv2), initialised small so blocks start near identity."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def residual(self, x: Tensor, branch: Tensor) -> Tensor:
        """x + gamma * branch in one fused kernel (one memory pass instead of two)."""
        return torch.addcmul(x, branch, self.gamma)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        layerscale_init: float = 1e-5,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias)
        # DinoViT swaps in Identity scales (DINO v1) and a SwiGLU MLP (DINOv2 ViT-g)
        self.ls1: nn.Module = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp: nn.Module = Mlp(dim, int(dim * mlp_ratio))
        self.ls2: nn.Module = LayerScale(dim, layerscale_init)
        self.fused = True  # see _residual; reference_math() turns it off

    def forward(self, x: Tensor, rows: slice | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C); with ``rows``, only the tokens ``x[:, rows]`` are updated and
        returned (a stack's last block, when the caller keeps only those tokens)."""
        h = self.norm1(x)
        if rows is not None:
            x = x[:, rows]
        x = _residual(x, h, lambda t: self.attn.mix(t, rows), self.attn.proj, self.ls1, self.fused)
        if not isinstance(self.mlp, Mlp):  # SwiGLU (DINOv2 ViT-g): no hidden / output-layer split to fold
            return _residual(x, self.norm2(x), self.mlp, None, self.ls2, fused=False)
        return _residual(x, self.norm2(x), self.mlp.hidden, self.mlp.fc2, self.ls2, self.fused)


def _residual(x: Tensor, h: Tensor, inner: Callable[[Tensor], Tensor], out_layer: nn.Linear | None, scale: nn.Module,
              fused: bool = True) -> Tensor:
    """x + scale(out_layer(inner(h))), the residual update of a pre-norm block (``out_layer`` None:
    ``inner`` is the whole branch).

    With LayerScale γ and a linear output layer (W, b) the update is folded into one GEMM that
    accumulates onto the residual stream:  x + γ⊙(uWᵀ + b) = (x + γ⊙b) + u(γ⊙W)ᵀ.  That removes
    the bias broadcast, the LayerScale multiply and the residual add as separate memory passes
    (~7% of a CPU forward). Under autocast the plain form is kept, so the residual stream stays
    float32 while the GEMMs run in low precision.
    """
    if not (fused and isinstance(scale, LayerScale) and out_layer is not None and out_layer.bias is not None
            and not torch.is_autocast_enabled(x.device.type)):
        update = inner(h) if out_layer is None else out_layer(inner(h))
        return scale.residual(x, update) if isinstance(scale, LayerScale) else x + scale(update)
    u = inner(h)
    gamma = scale.gamma
    # A fresh tensor, so the GEMM may accumulate into it in place (addmm_ needs no copy of it,
    # and autograd needs neither its old nor its new value).
    out = x + gamma * out_layer.bias
    out.view(-1, x.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), (out_layer.weight * gamma[:, None]).t())
    return out


def run_blocks(blocks: nn.ModuleList, x: Tensor, keep: slice) -> Tensor:
    """Run a block stack on (B, N, C) tokens and return only ``out[:, keep]``.

    The last block updates just the kept tokens (the others still serve as its keys and values),
    so the rows a caller would discard are never computed; the values are the same as slicing
    the full output.
    """
    *body, last = blocks
    for block in body:
        x = block(x)
    return last(x, rows=keep)


def stack_blocks(vit: "ViTConfig") -> nn.ModuleList:
    """The ``vit.depth`` blocks of one ViT stack (encoder or decoder)."""
    return nn.ModuleList(
        Block(vit.width, vit.heads, mlp_ratio=vit.mlp_ratio, layerscale_init=vit.layerscale_init,
              norm_eps=vit.norm_eps)
        for _ in range(vit.depth)
    )


def init_vit_weights(module: nn.Module, params: list[nn.Parameter]) -> None:
    """ViT initialisation: truncated-normal (std 0.02) linears and embeddings, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for p in params:
        nn.init.trunc_normal_(p, std=0.02)


@contextlib.contextmanager
def reference_math(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model``'s ViT blocks as the plain research implementation: explicit float32 softmax
    attention, each residual update as the linear layer and then its own ``addcmul`` (not one GEMM
    onto ``x + γ⊙b``), and an out-of-place GELU. Same arithmetic; used as the speed baseline and for
    FLOP counting (``FlopCounterMode`` has no formula for the CPU fused SDPA kernel or for
    in-place GEMMs, and would leave those FLOPs out)."""
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    fusable = [m for m in model.modules() if isinstance(m, (Block, Mlp))]
    saved = [m.explicit for m in attention], [m.fused for m in fusable]
    try:
        for m in attention:
            m.explicit = True
        for f in fusable:
            f.fused = False
        yield model
    finally:
        for m, flag in zip(attention, saved[0]):
            m.explicit = flag
        for f, flag in zip(fusable, saved[1]):
            f.fused = flag


def resize_grid_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubically resize a (1, h*w, C) square grid of position embeddings to ``grid``.

    Used when the image size differs from the size the embeddings were trained at
    (the same resizing DINOv2 and timm apply).
    """
    n, c = pos_embed.shape[1], pos_embed.shape[2]
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"position embedding with {n} entries is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    square = pos_embed.reshape(1, side, side, c).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c).to(pos_embed.dtype)


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C) in (h, w, p, q, c) order, row-major patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, grid: tuple[int, int], patch: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`: (n, h, w, p, q, c) -> (n, c, h*p, w*q), as the release does."""
    b = patches.shape[0]
    h, w = grid
    x = patches.reshape(b, h, w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * patch, w * patch)
