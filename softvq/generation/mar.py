"""MAR: masked autoregressive generation of continuous latent tokens with a diffusion loss.

The third generator of the SoftVQ paper (Sec. 2 and 4.1, Tabs. 1 and 2 "MAR-H"; supp. C.2), from Li et
al. 2024, "Autoregressive Image Generation without Vector Quantization". Here it models the L
latent tokens (B, L, D) of a tokenizer directly (the paper feeds SoftVQ's 32 / 64 tokens):

* **Masking (training).** Each image gets a random order of its L tokens; a mask ratio
  r ~ N(1, 0.25²) truncated to [0.7, 1] (one per batch) masks the first ⌈r·L⌉ tokens of the order.
* **Encoder.** Tokens are projected to the width and ``buffer_size`` = 64 "buffer" tokens holding
  the class embedding are prepended; learned positions and a LayerNorm follow; then the masked
  tokens are *dropped* and the rest runs through ``depth`` bidirectional ViT blocks (MAE-style).
* **Decoder.** Masked positions are refilled with a learned mask token, learned positions are
  added, ``depth`` more blocks run over all L + buffer tokens, and the buffer is removed; a third
  learned position embedding gives z_i, the condition of token i.
* **Diffusion loss.** A small MLP models p(x_i | z_i) by diffusion (:mod:`softvq.generation.diffloss`);
  the loss is taken on the masked tokens only, with ``diffusion_batch_mul`` = 4 independent
  (t, ε) draws per token.
* **Sampling.** Start fully masked and, over K steps, reveal tokens in a random order following
  MaskGIT's cosine schedule (masked count ⌊L·cos(π/2 · (k+1)/K)⌋, at least one token per step);
  each step runs the transformer once and samples the newly revealed tokens with the diffusion head
  (100 DDPM steps, temperature τ). Classifier-free guidance uses a learned null class, with the
  scale ramped linearly in the fraction of revealed tokens (``cfg_schedule="linear"``, from Muse).

Sizes (MAR Tab. 1 / release): B, L, H = width 768 / 1024 / 1280, depth 12 / 16 / 20 per side,
heads 12 / 16 / 16, with a 6 / 8 / 12-block head of width 1024 / 1280 / 1536. Attention and
projection dropout 0.1, label dropout 0.1.

Differences from the release (same model, same loss): the null class is a row of the class table
rather than a separate ``fake_latent`` vector; the head is evaluated only on masked tokens (the
release evaluates all tokens and gives the visible ones weight 0); random draws come from torch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from softvq.typed_config import UnknownNameError, check_field_types, check_ranges, strict_fields
from softvq.eval_mode import evaluating
from softvq.generation.diffloss import DiffusionLoss
from softvq.generation.embeddings import LabelEmbedder, class_indices
from softvq.generation.latent_generator import LatentGenerator
from softvq.networks.vit import Attention, Mlp

# name -> (width, depth per side, heads, head depth, head width): MAR's mar_base / large / huge.
MAR_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "B": (768, 12, 12, 6, 1024),
    "L": (1024, 16, 16, 8, 1280),
    "H": (1280, 20, 16, 12, 1536),
}

MASK_RATIO_STD = 0.25  # MAR: the mask ratio's truncated normal is centred at 1 with std 0.25


@dataclass
class MARConfig:
    """Every constructor argument of :class:`MaskedAutoregressive` (written to ``config.json``).

    depth:        blocks in the encoder and again in the decoder (MAR-H: 20 + 20).
    buffer_size:  class-embedding tokens prepended to the sequence (MAR: 64).
    mask_ratio_min: lower end of the training mask ratio's truncated normal (MAR: 0.7).
    head_width / head_depth: the diffusion MLP (MAR-H: 1536 wide, 12 blocks).
    diffusion_batch_mul: (t, ε) draws per token in the loss (MAR: 4).
    schedule / diffusion_steps: the head's diffusion (cosine, T = 1000).
    grad_checkpointing: recompute the transformer blocks in backward (saves memory).
    """

    kind: Literal["mar"] = "mar"
    num_tokens: int = 64
    latent_dim: int = 32
    width: int = 1280
    depth: int = 20
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout: float = 0.1
    buffer_size: int = 64
    mask_ratio_min: float = 0.7
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    head_width: int = 1536
    head_depth: int = 12
    diffusion_batch_mul: int = 4
    schedule: str = "cosine"
    diffusion_steps: int = 1000
    grad_checkpointing: bool = False

    def validate(self) -> "MARConfig":
        """Check every field's type and range; returns the config, so it chains."""
        check_field_types(self)  # for a config built in Python ("32" for width failed as a % format)
        if self.kind != "mar":
            raise ValueError(f"a MAR config has kind 'mar', got {self.kind!r}")
        positive = ("num_tokens", "latent_dim", "width", "depth", "heads", "head_width", "head_depth",
                    "diffusion_steps")
        check_ranges([
            *((key, getattr(self, key), getattr(self, key) >= 1, "a whole number of 1 or more") for key in positive),
            ("buffer_size", self.buffer_size, self.buffer_size >= 1, "at least 1: the buffer carries the class "
                                                                     "embedding"),
            ("mlp_ratio", self.mlp_ratio, self.mlp_ratio > 0, "positive"),  # NaN: check_field_types
            ("mask_ratio_min", self.mask_ratio_min, 0.0 < self.mask_ratio_min <= 1.0, "in (0, 1]"),
            ("diffusion_batch_mul", self.diffusion_batch_mul, self.diffusion_batch_mul >= 1, "at least 1"),
            ("attn_dropout", self.attn_dropout, 0.0 <= self.attn_dropout < 1.0, "a probability in [0, 1)"),
            ("proj_dropout", self.proj_dropout, 0.0 <= self.proj_dropout < 1.0, "a probability in [0, 1)"),
            ("class_dropout", self.class_dropout, 0.0 <= self.class_dropout < 1.0, "a probability in [0, 1)"),
        ])
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        return self

    @property
    def sequence_length(self) -> int:
        """Tokens the transformer runs: the latent tokens plus the class buffer."""
        return self.num_tokens + self.buffer_size

    def to_dict(self) -> dict[str, Any]:
        """Every field, for ``config.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MARConfig":
        """A validated config from ``config.json``'s fields; an unknown field is refused by name."""
        return strict_fields(cls, data, what="MAR config").validate()


def mar_config(size: str, **fields: Any) -> MARConfig:
    """A named MAR size (B, L, H); ``fields`` set the latent layout and any override, e.g.
    ``mar_config("H", num_tokens=64, latent_dim=32)``."""
    key = size.upper()
    if key not in MAR_SIZES:
        raise UnknownNameError(f"unknown MAR size {size!r}; choose one of {', '.join(MAR_SIZES)}")
    width, depth, heads, head_depth, head_width = MAR_SIZES[key]
    base: dict[str, Any] = {"width": width, "depth": depth, "heads": heads, "head_depth": head_depth,
                            "head_width": head_width}
    base.update(fields)
    return MARConfig.from_dict(base)  # unknown or mistyped fields named, as generator_config does


# --- masking --------------------------------------------------------------------------------


def draw_mask_ratio(min_ratio: float = 0.7, generator: torch.Generator | None = None) -> float:
    """r ~ N(1, 0.25²) truncated to [min_ratio, 1], by inverting the normal CDF (MAR Sec. 3.3)."""
    lower = torch.special.ndtr(torch.tensor((min_ratio - 1.0) / MASK_RATIO_STD, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return float(1.0 + MASK_RATIO_STD * torch.special.ndtri(lower + u * (0.5 - lower)))


def random_orders(batch: int, length: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    """(batch, length) independent random permutations of 0..length−1."""
    return torch.rand(batch, length, generator=generator).argsort(dim=1).to(device)


def masking_schedule(length: int, steps: int) -> list[int]:
    """The masked count after each of ``steps`` sampling steps by MaskGIT's cosine rule,
    ⌊L·cos(π/2 · (k+1)/K)⌋ kept in [1, previous − 1] so every step reveals a token.
    The last step reveals everything left; its entry (≥ 1) is what the release's linear
    guidance ramp reads, so it is kept as computed."""
    if not 1 <= steps <= length:
        raise ValueError(f"MAR samples {length} tokens in 1..{length} steps, got {steps}")
    left, out = length, []
    for k in range(steps):
        left = max(1, min(left - 1, math.floor(length * math.cos(math.pi / 2 * (k + 1) / steps))))
        out.append(left)
    return out


# --- network --------------------------------------------------------------------------------


class MARBlock(nn.Module):
    """timm's pre-norm ViT block with attention and projection dropout (no LayerScale)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, attn_dropout: float, proj_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True, dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.drop = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp.fc2(self.drop(self.mlp.hidden(self.norm2(x)))))


class MaskedAutoregressive(LatentGenerator):
    """MAR on 1D latent tokens. ``model(x, y)`` returns the training loss terms for tokens
    x (B, L, D) and labels y (B,); ``model.sample(labels)`` generates tokens."""

    model_name = "MAR"

    def __init__(self, config: MARConfig) -> None:
        super().__init__()
        self.config = c = config.validate()
        n = c.sequence_length
        self.token_proj = nn.Linear(c.latent_dim, c.width)
        self.token_norm = nn.LayerNorm(c.width, eps=1e-6)
        self.class_embed = LabelEmbedder(c.num_classes, c.width, c.class_dropout, with_null=True)
        self.encoder_pos = nn.Parameter(torch.zeros(1, n, c.width))
        self.encoder_blocks = nn.ModuleList(self._block() for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.width, eps=1e-6)
        self.decoder_embed = nn.Linear(c.width, c.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n, c.width))
        self.decoder_blocks = nn.ModuleList(self._block() for _ in range(c.depth))
        self.decoder_norm = nn.LayerNorm(c.width, eps=1e-6)
        self.condition_pos = nn.Parameter(torch.zeros(1, c.num_tokens, c.width))
        self.reset_parameters()
        # built after the reset: the head keeps its own (DiT) initialisation, as in the release
        self.head = DiffusionLoss(c.latent_dim, c.width, c.head_width, c.head_depth, c.schedule, c.diffusion_steps)

    def _block(self) -> MARBlock:
        c = self.config
        return MARBlock(c.width, c.heads, c.mlp_ratio, c.attn_dropout, c.proj_dropout)

    def reset_parameters(self) -> None:
        """MAR's initialisation: Xavier-uniform linears with zero bias, unit LayerNorms, and
        N(0, 0.02) class table, mask token and position embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for p in (self.class_embed.table.weight, self.mask_token, self.encoder_pos, self.decoder_pos,
                  self.condition_pos):
            nn.init.normal_(p, std=0.02)

    # --- shapes -------------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int]:
        """The (L, D) of the latent tokens this model takes."""
        return (self.config.num_tokens, self.config.latent_dim)

    @property
    def label_embedder(self) -> LabelEmbedder:
        """The class-label table class_embed."""
        return self.class_embed

    @property
    def input_layer(self) -> nn.Linear:
        """The token projection token_proj."""
        return self.token_proj

    # --- transformer --------------------------------------------------------------------------

    def _run(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        recompute = self.config.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x

    def _visible_positions(self, orders: Tensor, masked: int) -> Tensor:
        """Sequence positions (B, buffer + L − masked) the encoder sees: the buffer, then the
        tokens after the first ``masked`` of each order, in sequence order."""
        buffer = torch.arange(self.config.buffer_size, device=orders.device).expand(orders.shape[0], -1)
        return torch.cat([buffer, orders[:, masked:].sort(dim=1).values + self.config.buffer_size], dim=1)

    def encode(self, tokens: Tensor, orders: Tensor, masked: int, labels: Tensor) -> Tensor:
        """Encoder over the buffer and the visible tokens -> (B, buffer + L − masked, W).

        The masked tokens are the first ``masked`` of each image's order (MAR masks every image of
        a batch with one ratio), so the visible ones are gathered without a data-dependent shape."""
        b, w = tokens.shape[0], self.config.width
        x = self.token_proj(tokens)
        classes = self.class_embed(labels).to(x.dtype)  # label dropout in training mode
        x = torch.cat([classes.unsqueeze(1).expand(b, self.config.buffer_size, w), x], dim=1)
        x = self.token_norm(x + self.encoder_pos.to(x.dtype))
        keep = self._visible_positions(orders, masked)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, w))
        return self.encoder_norm(self._run(self.encoder_blocks, x))

    def condition(self, encoded: Tensor, orders: Tensor, masked: int) -> Tensor:
        """Decoder: mask tokens back in, all positions through the blocks -> z (B, L, W)."""
        b, w = orders.shape[0], self.config.width
        h = self.decoder_embed(encoded)
        keep = self._visible_positions(orders, masked)
        x = self.mask_token.to(h.dtype).expand(b, self.config.sequence_length, w)
        x = x.scatter(1, keep.unsqueeze(-1).expand(-1, -1, w), h)
        x = self._run(self.decoder_blocks, x + self.decoder_pos.to(h.dtype))
        x = self.decoder_norm(x)[:, self.config.buffer_size:]
        return x + self.condition_pos.to(x.dtype)

    # --- training -----------------------------------------------------------------------------

    def forward(self, x: Tensor, labels: Tensor | Sequence[int] | int) -> dict[str, Tensor]:
        """Loss terms {"loss", "mse", "vb"} for tokens x (B, L, D) and class ``labels`` (B,) (a
        tensor, a list or one int for the whole batch), averaged over masked tokens."""
        self.check_input(x)
        labels = class_indices(labels, x.shape[0], x.device, "labels")
        b, length, d = x.shape
        masked = math.ceil(length * draw_mask_ratio(self.config.mask_ratio_min))
        orders = random_orders(b, length, device=x.device)
        z = self.condition(self.encode(x, orders, masked, labels), orders, masked)
        at = orders[:, :masked].unsqueeze(-1)
        k = self.config.diffusion_batch_mul
        target = x.gather(1, at.expand(-1, -1, d)).detach().reshape(-1, d).repeat(k, 1)
        cond = z.gather(1, at.expand(-1, -1, z.shape[-1])).reshape(-1, z.shape[-1]).repeat(k, 1)
        return self.head(target, cond)

    # --- sampling -----------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, labels: Tensor | Sequence[int] | int, ar_steps: int | None = None, diffusion_steps: int = 100,
               cfg: float = 1.0, cfg_schedule: Literal["linear", "constant"] = "linear", temperature: float = 1.0,
               generator: torch.Generator | None = None, progress: bool = False,
               clip_x0: float | None = None) -> Tensor:
        """Generate (B, L, D) tokens for class ``labels`` (B,) (a tensor, a list or one int) in
        ``ar_steps`` steps (default L: MAR's evaluation setting of one step per token at most; the
        masking schedule decides how many tokens each step reveals). ``clip_x0``: see
        :meth:`DiffusionLoss.sample` (off in MAR). Runs in eval mode whatever the module's mode,
        under ``torch.inference_mode``: ``.clone()`` the tokens before changing them in place or
        using them where gradients are recorded."""
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        if not (cfg >= 0 and temperature >= 0 and math.isfinite(cfg) and math.isfinite(temperature)):  # NaN too
            raise ValueError(f"cfg and temperature must be finite and non-negative, got {cfg} and {temperature}")
        for name, count in (("ar_steps", ar_steps), ("diffusion_steps", diffusion_steps)):
            if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1):
                raise ValueError(f"{name} must be a whole number of 1 or more, got {count!r}")
        c = self.config
        device, dtype = self.condition_pos.device, self.condition_pos.dtype
        labels = class_indices(labels, None, device, "labels")
        if labels.numel() == 0:
            raise ValueError("no labels to sample: pass one class index per sample")
        top = c.num_classes + int(self.class_embed.has_null)  # the null class samples unconditionally
        if int(labels.min()) < 0 or int(labels.max()) >= top:
            raise ValueError(f"labels must be class indices in [0, {top}) ({c.num_classes}: unconditional), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        b, length = labels.shape[0], c.num_tokens
        schedule = masking_schedule(length, ar_steps or length)
        guided = cfg != 1.0
        null = torch.full_like(labels, self.null_class) if guided else None
        orders = random_orders(b, length, generator, device)
        tokens = torch.zeros(b, length, c.latent_dim, device=device, dtype=dtype)
        steps = range(len(schedule))
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="MAR sampling", leave=False)
        masked = length
        with evaluating(self):
            for k in steps:
                if null is not None:  # guided
                    both = torch.cat([orders, orders])
                    z = self.condition(self.encode(torch.cat([tokens, tokens]), both, masked,
                                                   torch.cat([labels, null])), both, masked)
                    z_cond, z_uncond = z.chunk(2)
                else:
                    z_cond, z_uncond = self.condition(self.encode(tokens, orders, masked, labels), orders, masked), None
                # guidance ramps with the revealed fraction after this step (Muse / MAR)
                scale = 1 + (cfg - 1) * (length - schedule[k]) / length if cfg_schedule == "linear" else cfg
                left = 0 if k == len(schedule) - 1 else schedule[k]
                at = orders[:, left:masked].unsqueeze(-1)  # the tokens this step reveals
                pick = at.expand(-1, -1, c.width)
                new = self.head.sample(
                    z_cond.gather(1, pick).reshape(-1, c.width), diffusion_steps, temperature,
                    uncond=z_uncond.gather(1, pick).reshape(-1, c.width) if z_uncond is not None else None, cfg=scale,
                    generator=generator, clip_x0=clip_x0)
                tokens = tokens.scatter(1, at.expand(-1, -1, c.latent_dim), new.reshape(b, -1, c.latent_dim).to(dtype))
                masked = left
        return tokens

