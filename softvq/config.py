"""Typed configuration of a tokenizer and its named presets.

Every constructor argument of :class:`softvq.Tokenizer` lives here, so ``config.json`` written next
to the weights rebuilds exactly the same model. Preset shapes follow the released SoftVQ-VAE
checkpoints (their layout: :mod:`softvq.checkpoint.official`; paper Sec. 4.1 sizes S/B/BL/L).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from softvq.typed_config import UnknownNameError, check_field_types, strict_fields

BottleneckKind = Literal["softvq", "gmmvq", "vq", "kl", "ae", "lfq"]
SOFT_KINDS: tuple[BottleneckKind, ...] = ("softvq", "gmmvq")  # a softmax over a codebook: τ, entropy terms, chunks
CODEBOOK_KINDS: tuple[BottleneckKind, ...] = (*SOFT_KINDS, "vq")  # a learned codebook of K codewords; the rest have no weights


@dataclass
class ViTConfig:
    """Width/depth/heads of one ViT stack (DINOv2 block layout)."""

    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    layerscale_init: float = 1e-5
    norm_eps: float = 1e-6


@dataclass
class BottleneckConfig:
    """What sits between encoder and decoder (paper Sec. 2.1, 3.2; supplementary B).

    kind:
        ``softvq`` (Eq. 4), ``gmmvq`` (B.2), ``vq`` (Eq. 2), ``kl`` (Eq. 1), ``ae`` (identity),
        ``lfq`` (WeTok group-wise lookup-free quantization).
    latent_dim:
        D, channels of one latent token (the release: 32 with 64 tokens, 64 with 32 tokens).
    codebook_size:
        K codewords per codebook (paper: 8192).
    temperature / learnable_temperature:
        τ of the softmax posterior (paper: 0.07, Tab. 6 ablates it and a learnable τ).
    distance:
        ``l2``: the paper's softmax(−‖ẑ − c‖₂ / τ). ``cosine``: the release's logits ẑ·c / τ on
        L2-normalised vectors (equivalently softmax(−‖ẑ − c‖² / (2τ)) on the unit sphere).
    detach_codebook_in_logits:
        the release computes logits against a detached codebook, so the codebook learns only
        through z = q·C. The paper is silent; off by default.
    entropy_temperature:
        the release computes the entropy regulariser from logits re-scaled to this temperature
        (0.01) instead of the posterior's own τ. ``None`` uses the posterior (paper Eq. 4).
        For ``lfq`` it is the temperature of the soft code assignment in the entropy loss
        (``None`` = 0.01, MAGVIT-v2's LFQ).
    groups:
        product quantization over G channel groups, each with its own codebook (B.3, Eq. 12).
    residual_levels:
        residual quantization with R levels (B.3, Eq. 13). groups>1 and levels>1 give R-PQ.
    segments:
        the release's per-sequence-segment codebooks: the L tokens are split into this many
        contiguous segments, each with its own codebook (NOT channel groups; see ``groups``).
    segment_entropy:
        with segments > 1, how the entropy regulariser treats them: ``pooled`` (the release:
        one batch posterior averaged over the tokens of all segments) or ``per_segment`` (each
        codebook's own H(q) − H(E q), averaged).
    codebook_loss / commit_loss:
        ``softvq`` / ``gmmvq`` only: also return VQ's codebook loss ‖sg[ẑ] − z‖² / commit loss
        ‖ẑ − sg[z]‖² (Eq. 2) with z the soft output q·C, as in supplementary Tab. 5's
        "SoftVQ-S-64 + codebook loss" / "+ commit loss" rows (``supp-tab5-*``). Off: the paper's
        SoftVQ has neither (Eq. 7). See ``SoftVQ.vq_losses``.
    commitment_weight:
        β of the commit loss relative to the codebook loss (VQ-VAE uses 0.25). Read by the
        training objective, which weights the bottleneck's unweighted ``commit`` loss by it.
    chunk_size:
        tokens processed at a time by the memory-lean soft assignment
        (``softvq.bottlenecks.soft_assign``); ``None`` picks automatically (about 8 MiB per
        working tensor), ``0`` forces the straightforward implementation.
    lfq_groups:
        WeTok GLFQ: the latent_dim binary channels are split into this many groups, each with
        an implicit codebook of size 2^(latent_dim / lfq_groups).
    lfq_entropy:
        how WeTok's entropy loss treats the groups: ``per_group`` (the paper, Eqs. 7 and 9: each
        group's token entropy and codebook entropy, summed over groups) or ``pooled`` (WeTok's
        released GFQ: the token entropy averaged over tokens and groups, and one codebook entropy
        of the code distribution averaged over tokens and groups together).
    """

    kind: BottleneckKind = "softvq"
    latent_dim: int = 32
    codebook_size: int = 8192
    temperature: float = 0.07
    learnable_temperature: bool = False
    distance: Literal["l2", "cosine"] = "l2"
    detach_codebook_in_logits: bool = False
    entropy_temperature: float | None = None
    groups: int = 1
    residual_levels: int = 1
    segments: int = 1
    segment_entropy: Literal["pooled", "per_segment"] = "pooled"
    codebook_loss: bool = False
    commit_loss: bool = False
    commitment_weight: float = 0.25
    chunk_size: int | None = None
    lfq_groups: int = 1
    lfq_entropy: Literal["per_group", "pooled"] = "per_group"


@dataclass
class TokenizerConfig:
    """A whole SoftVQ-VAE style tokenizer: ViT encoder, bottleneck, ViT decoder (paper Fig. 2)."""

    image_size: int = 256
    patch_size: int = 16
    num_tokens: int = 64
    in_channels: int = 3
    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: ViTConfig = field(default_factory=ViTConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    # WeTok's generative decoder (WeTok Sec. 3.3): Gaussian noise channels concatenated to each
    # latent token before the decoder; 0 is SoftVQ-VAE's deterministic decoder.
    decoder_noise_dim: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of image patches at the trained size."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        """N, image tokens at the trained size."""
        return self.grid[0] * self.grid[1]

    def validate(self) -> "TokenizerConfig":
        """Check every field (types, ranges, divisibility) and return ``self``; errors name the fix."""
        for name, kind in (("encoder", ViTConfig), ("decoder", ViTConfig), ("bottleneck", BottleneckConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}; "
                                f"build nested settings from dicts with TokenizerConfig.from_dict")
        check_field_types(self)
        for name in ("image_size", "patch_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be positive, got {self.num_tokens}")
        if self.decoder_noise_dim < 0:
            raise ValueError(f"decoder_noise_dim must be 0 (deterministic decoder) or positive, "
                             f"got {self.decoder_noise_dim}")
        for name, vit in (("encoder", self.encoder), ("decoder", self.decoder)):
            if vit.width < 1 or vit.heads < 1:
                raise ValueError(f"{name}.width and {name}.heads must be positive, got {vit.width} and {vit.heads}")
            if vit.width % vit.heads:
                raise ValueError(f"{name}.width {vit.width} is not divisible by {name}.heads {vit.heads}")
            if vit.depth < 1:
                raise ValueError(f"{name}.depth must be at least 1, got {vit.depth}")
            if not (vit.mlp_ratio > 0 and vit.norm_eps > 0 and math.isfinite(vit.mlp_ratio)):
                raise ValueError(f"{name}.mlp_ratio and {name}.norm_eps must be positive, got {vit.mlp_ratio} "
                                 f"and {vit.norm_eps}")
        from softvq.bottlenecks.factory import check_config  # the bottleneck's own rules live with it

        check_config(self.bottleneck)
        if self.bottleneck.segments > 1 and self.num_tokens % self.bottleneck.segments:
            raise ValueError(f"num_tokens {self.num_tokens} is not divisible by bottleneck.segments "
                             f"{self.bottleneck.segments}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as a nested dict of plain values (what ``config.json`` stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        """Build from a (possibly nested) dict; unknown keys are an error naming the key."""
        return strict_fields(cls, data).validate()


# --- presets ---------------------------------------------------------------------------------

_SIZES: dict[str, tuple[ViTConfig, ViTConfig]] = {
    "s": (ViTConfig(384, 12, 6), ViTConfig(384, 12, 6)),
    "b": (ViTConfig(768, 12, 12), ViTConfig(768, 12, 12)),
    "bl": (ViTConfig(768, 12, 12), ViTConfig(1024, 24, 16)),
    "l": (ViTConfig(1024, 24, 16), ViTConfig(1024, 24, 16)),
}


def _released_bottleneck(num_tokens: int) -> BottleneckConfig:
    """The released bottleneck: cosine SoftVQ, τ=0.07, K=8192, 4 sequence-segment codebooks,
    D=32 for 64 tokens and D=64 for 32 tokens, detached codebook in the logits, entropy at 0.01."""
    return BottleneckConfig(
        kind="softvq",
        latent_dim=32 if num_tokens == 64 else 64,
        codebook_size=8192,
        temperature=0.07,
        distance="cosine",
        detach_codebook_in_logits=True,
        entropy_temperature=0.01,
        segments=4,
    )


def _build_presets() -> dict[str, TokenizerConfig]:
    presets: dict[str, TokenizerConfig] = {}
    for size, (enc, dec) in _SIZES.items():
        for tokens in (32, 64):
            presets[f"softvq-{size}-{tokens}"] = TokenizerConfig(
                image_size=256, patch_size=16, num_tokens=tokens,
                encoder=dataclasses.replace(enc), decoder=dataclasses.replace(dec),
                bottleneck=_released_bottleneck(tokens),
            )
    # The 512 px releases: same networks at patch 16, so N = 1024 image tokens (a 32x32 grid of
    # position embeddings). Patch 16 is what the release's ViT configs use; the hub files'
    # sizes (1.57 GB in float32 for softvq-bl-64-512) fit patch 16 and rule out patch 32 (1.59 GB).
    for name, size, tokens in (("softvq-bl-64-512", "bl", 64), ("softvq-l-32-512", "l", 32)):
        enc, dec = _SIZES[size]
        presets[name] = TokenizerConfig(
            image_size=512, patch_size=16, num_tokens=tokens,
            encoder=dataclasses.replace(enc), decoder=dataclasses.replace(dec),
            bottleneck=_released_bottleneck(tokens),
        )
    # CPU-sized model for tests and demos: 64 px, 8 px patches, 16 tokens of 8 channels.
    presets["softvq-tiny"] = TokenizerConfig(
        image_size=64, patch_size=8, num_tokens=16,
        encoder=ViTConfig(96, 4, 3), decoder=ViTConfig(96, 4, 3),
        bottleneck=BottleneckConfig(kind="softvq", latent_dim=8, codebook_size=256, distance="l2"),
    )
    return presets


PRESETS: dict[str, TokenizerConfig] = _build_presets()


def preset(name: str) -> TokenizerConfig:
    """A fresh copy of a named preset; an unknown name lists the known ones."""
    key = name.lower()
    if key not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return TokenizerConfig.from_dict(PRESETS[key].to_dict())
