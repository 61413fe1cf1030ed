"""The DiT / SiT backbone on 1D latent tokens (and, for comparison, on 2D latent grids).

DiT (Peebles & Xie 2023) and SiT (Ma et al. 2024) share this transformer: a patch embedding,
fixed sin-cos positions, N blocks with adaLN-Zero conditioning on c = embed(t) + embed(y), and a
final adaLN layer with a zero-initialised linear head. They differ only in the output: DiT with a
learned variance predicts [ε, v] (2·C channels, "learned sigma"), SiT predicts the velocity (C).

SoftVQ (paper Sec. 4.1, supp. C.2) feeds the L latent tokens (B, L, D) directly: patch size 1 and
1D sin-cos positions. ``layout="2d"`` is the original latent-grid model (B, C, H, W) with
non-overlapping p x p patches and 2D sin-cos positions (DiT-XL/2 = patch 2).

Sizes are those of DiT Tab. 1: S/B/L/XL = depth 12/12/24/28, width 384/768/1024/1152,
heads 6/12/16/16, MLP ratio 4. XL has about 675M parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, overload

import torch
from torch import Tensor, nn

from softvq.typed_config import UnknownNameError, check_field_types, strict_fields
from softvq.generation.embeddings import (LabelEmbedder, TimestepEmbedder, class_indices, sincos_grid,
                                         sincos_sequence)
from softvq.generation.latent_generator import LatentGenerator
from softvq.generation.mar import MARConfig, MaskedAutoregressive
from softvq.networks.vit import Attention, Mlp, patchify, unpatchify

GeneratorKind = Literal["sit", "dit"]

# name -> (width, depth, heads), DiT Tab. 1.
GENERATOR_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@dataclass
class GeneratorConfig:
    """Every constructor argument of :class:`LatentTransformer` (written to ``config.json``).

    kind:         ``sit`` (velocity output) or ``dit`` (ε output, plus variance if learn_sigma).
    layout:       ``1d``: input (B, num_tokens, latent_dim), patch size 1, 1D positions (SoftVQ);
                  ``2d``: input (B, latent_dim, grid, grid), patch ``patch_size``, 2D positions.
    latent_dim:   D channels per token (2d: C channels of the grid).
    num_classes:  real classes; the null class for guidance is index ``num_classes``.
    class_dropout: label dropout probability for classifier-free guidance (DiT/SiT: 0.1).
    learn_sigma:  DiT's learned-range variance head; ``None`` means "True for dit, False for sit".
    """

    kind: GeneratorKind = "sit"
    layout: Literal["1d", "2d"] = "1d"
    num_tokens: int = 64
    grid: int = 32
    patch_size: int = 1
    latent_dim: int = 32
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout: float = 0.1
    learn_sigma: bool | None = None

    t_embed_frequencies = 256  # sinusoidal features of the timestep embedder (DiT)

    @property
    def out_channels(self) -> int:
        """Output width per token: the latent width, doubled for a learned variance."""
        return self.latent_dim * (2 if self.sigma_learned else 1)

    @property
    def sigma_learned(self) -> bool:
        """Whether the model also predicts the variance (``learn_sigma``; by default DiT does and SiT does not)."""
        return (self.kind == "dit") if self.learn_sigma is None else bool(self.learn_sigma)

    @property
    def sequence_length(self) -> int:
        """Transformer tokens per image: L (1d) or (grid / patch)^2 (2d)."""
        if self.layout == "1d":
            return self.num_tokens
        return (self.grid // self.patch_size) ** 2

    def validate(self) -> "GeneratorConfig":
        """Check every field's type and range; returns the config, so it chains."""
        check_field_types(self)  # for a config built in Python ("32" for width failed in a comparison)
        if self.kind not in ("sit", "dit"):
            raise ValueError(f"generator kind must be 'sit' or 'dit', got {self.kind!r}")
        if self.layout not in ("1d", "2d"):
            raise ValueError(f"layout must be '1d' or '2d', got {self.layout!r}")
        sizes = {"num_tokens": self.num_tokens, "grid": self.grid, "patch_size": self.patch_size,
                 "latent_dim": self.latent_dim, "width": self.width, "depth": self.depth, "heads": self.heads}
        if (bad := [f"{k}={v}" for k, v in sizes.items() if v < 1]) or self.mlp_ratio <= 0:  # NaN: the type check
            raise ValueError(f"generator sizes must be positive, got {', '.join(bad) or f'mlp_ratio={self.mlp_ratio}'}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout is a probability in [0, 1), got {self.class_dropout}")
        if self.layout == "1d" and self.patch_size != 1:
            raise ValueError("1D latent tokens use patch size 1 (paper supp. C.2); set patch_size=1")
        if self.layout == "2d" and self.grid % self.patch_size:
            raise ValueError(f"grid {self.grid} is not divisible by patch size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if self.width % (4 if self.layout == "2d" else 2):
            raise ValueError(f"width {self.width} does not fit the sin-cos position embedding")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every field, for ``config.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GeneratorConfig":
        """A validated config from ``config.json``'s fields; an unknown field is refused by name."""
        return strict_fields(cls, data, what="generator config").validate()


def generator_config(kind: GeneratorKind, size: str, **fields: Any) -> GeneratorConfig:
    """A named size (S, B, L, XL) of DiT or SiT; ``fields`` set the latent layout, e.g.
    ``generator_config("sit", "XL", num_tokens=64, latent_dim=32)``."""
    key = size.upper()
    if key not in GENERATOR_SIZES:
        raise UnknownNameError(f"unknown generator size {size!r}; choose one of {', '.join(GENERATOR_SIZES)}")
    width, depth, heads = GENERATOR_SIZES[key]
    base = {"kind": kind, "width": width, "depth": depth, "heads": heads}
    if fields.get("layout") == "2d":
        base["patch_size"] = 2
    base.update(fields)
    return GeneratorConfig.from_dict(base)  # an unknown field is named, with the known ones


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x · (1 + scale) + shift, with per-image (B, 1, W) shift and scale."""
    return x * (1 + scale) + shift


class AdaLNZeroBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by c and whose residual branches are
    gated by c (DiT Sec. 3.2, "adaLN-Zero"). The modulation is zero at init, so every gate is 0
    and the block starts as the identity."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.mlp.act = nn.GELU(approximate="tanh")  # DiT uses the tanh approximation
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised linear head to patch·patch·out channels."""

    def __init__(self, width: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_features)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LatentTransformer(LatentGenerator):
    """DiT / SiT backbone: ``model(x, t, y) -> output`` with the shape of ``x`` (2x the channels
    for a learned-sigma DiT). ``t`` is (B,) (DiT: step index 0..T−1; SiT: time in [0, 1]),
    ``y`` is (B,) class indices, ``num_classes`` meaning "unconditional"."""

    pos_embed: Tensor  # buffer registered in __init__

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = c = config.validate()
        p = c.patch_size
        self.x_embed = nn.Linear(p * p * c.latent_dim, c.width)  # patch embedding as a linear map
        self.t_embed = TimestepEmbedder(c.width, c.t_embed_frequencies)
        self.y_embed = LabelEmbedder(c.num_classes, c.width, c.class_dropout)
        if c.layout == "1d":
            positions = sincos_sequence(c.width, c.num_tokens)
        else:
            side = c.grid // p
            positions = sincos_grid(c.width, (side, side))
        self.register_buffer("pos_embed", positions.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.final = FinalLayer(c.width, p * p * c.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) label and time
        embeddings, and zeros for every adaLN modulation and for the output head (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for layer in self.t_embed.linears():
            nn.init.normal_(layer.weight, std=0.02)
        for block in cast(Iterable[AdaLNZeroBlock], self.blocks):  # ModuleList / Sequential items are typed Module
            modulation = cast(nn.Linear, block.modulation[-1])
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)
        for layer in (cast(nn.Linear, self.final.modulation[-1]), self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --- shapes -------------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch dimension)."""
        c = self.config
        if c.layout == "1d":
            return (c.num_tokens, c.latent_dim)
        return (c.latent_dim, c.grid, c.grid)

    @property
    def label_embedder(self) -> LabelEmbedder:
        """The class-label table y_embed."""
        return self.y_embed

    @property
    def input_layer(self) -> nn.Linear:
        """The token embedding x_embed."""
        return self.x_embed

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | Sequence[int] | int,
                force_drop: Tensor | None = None) -> Tensor:
        """x (B, L, D) noisy latents (or (B, C, H, W) in the 2D layout); t (B,) or a scalar (a number
        or a 0-dim tensor): DiT's integer step 0..T−1 or SiT's time in [0, 1] (0 = data); y (B,)
        integer class indices (a tensor, a list or one int for the whole batch), ``num_classes`` =
        unconditional; ``force_drop`` (B,) bool replaces chosen labels by the null class
        (classifier-free guidance's training dropout). Returns the output with x's shape (2x the
        channels for a learned-sigma DiT). Outside autocast, x must have the weights' dtype."""
        self.check_input(x)
        if isinstance(t, (int, float)) and not isinstance(t, bool):  # a number: checked without a device sync
            kind = self.config.kind
            if kind == "dit" and not (float(t).is_integer() and t >= 0):
                raise ValueError(f"a DiT's t is a diffusion step index 0..T-1, got {t}; SiT takes a time in [0, 1]")
            if kind == "sit" and not 0 <= t <= 1:
                raise ValueError(f"a SiT's t is a time in [0, 1] (0 = data), got {t}; DiT takes a step index")
        t, y = _per_sample(t, x, "t"), class_indices(y, x.shape[0], x.device)
        c = self.config
        tokens = x if c.layout == "1d" else patchify(x, c.patch_size)
        h = self.x_embed(tokens) + self.pos_embed.to(tokens.dtype)
        cond = self.t_embed(t) + self.y_embed(y, force_drop)
        for block in self.blocks:
            h = block(h, cond)
        out = self.final(h, cond)
        if c.layout == "1d":
            return out
        side = c.grid // c.patch_size
        return unpatchify(out, (side, side), c.patch_size, c.out_channels)


def _per_sample(value: Tensor | float | Sequence[int], x: Tensor, name: str) -> Tensor:
    """``value`` (a tensor, a number or a list) as a tensor on x's device, one value repeated for
    each of x's samples when a single one is given; any other count than one per sample is
    refused (it broadcast the whole batch to its length)."""
    value = value.to(x.device) if isinstance(value, Tensor) else torch.as_tensor(value, device=x.device)
    if value.numel() == 1:
        return value.reshape(-1).expand(x.shape[0])
    if tuple(value.shape) != (x.shape[0],):
        raise ValueError(f"{name} has shape {tuple(value.shape)} for a batch of {x.shape[0]}: pass one value per "
                         f"sample, ({x.shape[0]},), or a single value for all")
    return value


@overload
def build_generator(config: GeneratorConfig, device: str | torch.device | None = None) -> LatentTransformer: ...
@overload
def build_generator(config: MARConfig, device: str | torch.device | None = None) -> MaskedAutoregressive: ...
@overload
def build_generator(config: GeneratorConfig | MARConfig | dict[str, Any],
                    device: str | torch.device | None = None) -> LatentTransformer | MaskedAutoregressive: ...
def build_generator(config: GeneratorConfig | MARConfig | dict[str, Any],
                    device: str | torch.device | None = None) -> LatentTransformer | MaskedAutoregressive:
    """Construct a DiT / SiT, or a MAR for a MAR config (a dict with ``kind: mar``); use
    ``device="meta"`` to count parameters or FLOPs for free."""
    if isinstance(config, dict):
        config = MARConfig.from_dict(config) if config.get("kind") == "mar" else GeneratorConfig.from_dict(config)
    if device is not None:  # torch's own refusal of a missing CUDA is a bare AssertionError
        from softvq.checkpoint.pretrained import usable_device

        device = usable_device(device, named_by="device", fix="build on the CPU (device='cpu')",
                               choices="cpu, cuda, cuda:N, mps or meta")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return MaskedAutoregressive(config) if isinstance(config, MARConfig) else LatentTransformer(config)
