"""Build a bottleneck from its :class:`~softvq.config.BottleneckConfig`.

Composition, innermost first (each optional):

    kind (softvq | gmmvq | vq | kl | lfq | ae) over D/G channels
    → ProductQuantizer over G = ``groups`` channel groups              (B.3, Eq. 12)
    → ResidualQuantizer over R = ``residual_levels`` levels             (B.3, Eq. 13; R-PQ when G > 1)
    → SegmentCodebooks over S = ``segments`` blocks of the token sequence (the release)
"""

from __future__ import annotations

import dataclasses
import typing

from softvq.bottlenecks.base import Bottleneck, check_chunk_size, check_count, check_positive
from softvq.bottlenecks.gaussian import GaussianPosterior
from softvq.bottlenecks.gmmvq import GMMVQ
from softvq.bottlenecks.identity import Identity
from softvq.bottlenecks.lfq import ENTROPY_FORMS, MAX_GROUP_BITS, GroupedLookupFree
from softvq.bottlenecks.product import ProductQuantizer
from softvq.bottlenecks.residual import ResidualQuantizer
from softvq.bottlenecks.segments import SegmentCodebooks
from softvq.bottlenecks.softvq import SoftVQ
from softvq.bottlenecks.vq import VQ
from softvq.config import CODEBOOK_KINDS, SOFT_KINDS, BottleneckConfig, BottleneckKind

KINDS: tuple[BottleneckKind, ...] = typing.get_args(BottleneckKind)  # the config type lists them once


def build_quantizer(cfg: BottleneckConfig, dim: int) -> Bottleneck:
    """One plain bottleneck of ``cfg.kind`` over ``dim`` channels (no PQ/RQ/segments)."""
    if cfg.kind in SOFT_KINDS:
        cls = SoftVQ if cfg.kind == "softvq" else GMMVQ
        kwargs: dict[str, typing.Any] = dict(
            temperature=cfg.temperature, distance=cfg.distance,
            detach_codebook_in_logits=cfg.detach_codebook_in_logits,
            entropy_temperature=cfg.entropy_temperature, chunk_size=cfg.chunk_size,
            codebook_loss=cfg.codebook_loss, commit_loss=cfg.commit_loss,
        )
        if cfg.kind == "softvq":
            kwargs["learnable_temperature"] = cfg.learnable_temperature
        return cls(dim, cfg.codebook_size, **kwargs)
    if cfg.kind == "vq":
        return VQ(dim, cfg.codebook_size, distance=cfg.distance)
    if cfg.kind == "kl":
        return GaussianPosterior(dim)
    if cfg.kind == "lfq":
        return GroupedLookupFree(dim, groups=cfg.lfq_groups, entropy_temperature=cfg.entropy_temperature,
                                 entropy_form=cfg.lfq_entropy)
    if cfg.kind == "ae":
        return Identity(dim)
    raise ValueError(f"unknown bottleneck kind {cfg.kind!r}; choose one of: {', '.join(KINDS)}")


_SOFT_SETTINGS = ("codebook_size", "temperature", "learnable_temperature", "distance", "detach_codebook_in_logits",
                  "entropy_temperature", "chunk_size", "codebook_loss", "commit_loss")
# The BottleneckConfig fields each kind reads besides the shape ones every kind reads (kind,
# latent_dim, groups, residual_levels, segments; β where a commit loss is returned): see build_quantizer.
_KIND_SETTINGS: dict[str, tuple[str, ...]] = {
    "softvq": _SOFT_SETTINGS, "gmmvq": _SOFT_SETTINGS, "vq": ("codebook_size", "distance"),
    "kl": (), "lfq": ("entropy_temperature", "lfq_groups", "lfq_entropy"), "ae": (),
}


def unread_settings(cfg: BottleneckConfig) -> tuple[str, ...]:
    """The fields of ``cfg`` that the bottleneck it builds never reads (``temperature`` for
    ``kind='kl'``, ``segment_entropy`` with one segment, β without a commit loss...), so a value
    chosen for one of them can be named as having no effect."""
    reads = {"kind", "latent_dim", "groups", "residual_levels", "segments", *_KIND_SETTINGS[cfg.kind]}
    if cfg.segments > 1 and cfg.kind in SOFT_KINDS:  # only their entropy terms are pooled or not
        reads.add("segment_entropy")
    if "commit" in bottleneck_losses(cfg):  # β weighs it in the objective (SoftVQ's opt-in one too)
        reads.add("commitment_weight")
    return tuple(f.name for f in dataclasses.fields(cfg) if f.name not in reads)


def bottleneck_losses(cfg: BottleneckConfig) -> tuple[str, ...]:
    """The names of the unweighted losses the bottleneck ``cfg`` builds returns (its
    ``BottleneckOutput.losses``), so that a weight for any other name can be refused: SoftVQ /
    GMMVQ ``kl`` (Eq. 4, B.2) plus the opt-in ``codebook`` / ``commit`` (supp. Tab. 5), VQ
    ``codebook`` and ``commit`` (Eq. 2), KL-VAE ``kl`` (Eq. 1), LFQ ``entropy`` and ``commit``
    (WeTok Eq. 3, 5), AE none. Groups, levels and segments combine their parts' losses under the
    same names."""
    if cfg.kind in SOFT_KINDS:
        opted_in = [name for name in ("codebook", "commit") if getattr(cfg, f"{name}_loss")]
        return ("kl", *opted_in)
    known = {"vq": ("codebook", "commit"), "kl": ("kl",), "lfq": ("entropy", "commit"), "ae": ()}
    if cfg.kind not in known:
        raise ValueError(f"unknown bottleneck kind {cfg.kind!r}; choose one of: {', '.join(KINDS)}")
    return known[cfg.kind]


# Every loss name some bottleneck can return (the soft kinds with both opt-in losses on).
LOSS_NAMES: tuple[str, ...] = tuple(dict.fromkeys(
    name for kind in KINDS
    for name in bottleneck_losses(BottleneckConfig(kind=kind, codebook_loss=True, commit_loss=True))
))


def check_config(cfg: BottleneckConfig) -> None:
    """Reject impossible values and compositions with a message that names the key and the fix
    (run by ``TokenizerConfig.validate``, so a bad config fails when it is read, not mid-training)."""
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown bottleneck kind {cfg.kind!r}; choose one of: {', '.join(KINDS)}")
    counts = ("latent_dim", "groups", "residual_levels", "segments", "lfq_groups")
    for name in counts + (("codebook_size",) if cfg.kind in CODEBOOK_KINDS else ()):
        check_count(f"bottleneck.{name}", getattr(cfg, name))
    if cfg.kind in SOFT_KINDS:
        check_positive("bottleneck.temperature", cfg.temperature)
    if cfg.entropy_temperature is not None:
        check_positive("bottleneck.entropy_temperature", cfg.entropy_temperature)
    check_chunk_size("bottleneck.chunk_size", cfg.chunk_size)
    if not cfg.commitment_weight >= 0:
        raise ValueError(f"bottleneck.commitment_weight must be 0 or more, got {cfg.commitment_weight}")
    for name in ("codebook_loss", "commit_loss"):
        if getattr(cfg, name) and cfg.kind not in SOFT_KINDS:
            what = "always returns it" if name.removesuffix("_loss") in bottleneck_losses(cfg) else "has no such loss"
            raise ValueError(f"bottleneck.{name} is SoftVQ's opt-in VQ loss (supp. Tab. 5), but kind {cfg.kind!r} "
                             f"{what}; set bottleneck.{name}=false")
    if cfg.latent_dim % cfg.groups:
        raise ValueError(f"bottleneck.latent_dim {cfg.latent_dim} is not divisible by bottleneck.groups {cfg.groups}")
    if cfg.kind == "gmmvq" and cfg.learnable_temperature:
        raise ValueError("bottleneck.kind 'gmmvq' predicts per-token weights; set bottleneck.learnable_temperature "
                         "to false")
    if cfg.kind == "lfq":
        bits, left = divmod(cfg.latent_dim // cfg.groups, cfg.lfq_groups)
        if left:
            raise ValueError(f"bottleneck.lfq_groups={cfg.lfq_groups} must divide the quantized channels "
                             f"({cfg.latent_dim // cfg.groups}); choose a divisor of {cfg.latent_dim // cfg.groups}")
        if bits > MAX_GROUP_BITS:
            raise ValueError(f"bottleneck.lfq_groups={cfg.lfq_groups}: {bits} channels per LFQ group means 2^{bits} "
                             f"codes per group, too many to enumerate for the entropy loss; raise it so that "
                             f"latent_dim / lfq_groups <= {MAX_GROUP_BITS}")
    if cfg.lfq_entropy not in ENTROPY_FORMS:
        raise ValueError(f"bottleneck.lfq_entropy must be 'per_group' (WeTok Eqs. 7, 9) or 'pooled' (its released "
                         f"GFQ), got {cfg.lfq_entropy!r}")
    if cfg.segment_entropy not in ("pooled", "per_segment"):
        raise ValueError(f"bottleneck.segment_entropy must be 'pooled' or 'per_segment', got {cfg.segment_entropy!r}")
    if cfg.kind == "lfq" and cfg.residual_levels > 1:
        # every LFQ level codes sign(u) = ±1, so the second level codes -sign(u) where |u| < 1 and the
        # sum is 0 there: the latents collapse (all zeros at initialisation)
        raise ValueError("bottleneck.residual_levels > 1 with kind='lfq' cancels itself (each level codes ±1, "
                         "so level 2 undoes level 1); use lfq_groups for WeTok's group-wise LFQ, or a residual "
                         "vq / softvq")
    composed = cfg.groups > 1 or cfg.residual_levels > 1
    if cfg.segments > 1 and cfg.segment_entropy == "pooled" and composed and cfg.kind in SOFT_KINDS:
        raise ValueError(
            "bottleneck.segment_entropy='pooled' (the release) pools one categorical posterior per segment and is "
            "not defined for segments that are product/residual quantizers; set it to 'per_segment'"
        )


def build_bottleneck(cfg: BottleneckConfig) -> Bottleneck:
    """The full bottleneck described by ``cfg``, composition included."""
    check_config(cfg)
    group_dim = cfg.latent_dim // cfg.groups

    def level() -> Bottleneck:
        if cfg.groups == 1:
            return build_quantizer(cfg, cfg.latent_dim)
        return ProductQuantizer([build_quantizer(cfg, group_dim) for _ in range(cfg.groups)])

    def stage() -> Bottleneck:
        if cfg.residual_levels == 1:
            return level()
        return ResidualQuantizer([level() for _ in range(cfg.residual_levels)])

    if cfg.segments == 1:
        return stage()
    return SegmentCodebooks([stage() for _ in range(cfg.segments)], entropy_form=cfg.segment_entropy)
