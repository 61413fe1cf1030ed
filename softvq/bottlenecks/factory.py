"""Build a bottleneck from its :class:`~softvq.config.BottleneckConfig`."""

from __future__ import annotations

from softvq.bottlenecks.base import Bottleneck
from softvq.bottlenecks.identity import Identity
from softvq.bottlenecks.softvq import SoftVQ
from softvq.config import BottleneckConfig


def build_quantizer(cfg: BottleneckConfig, dim: int) -> Bottleneck:
    """One plain bottleneck of ``cfg.kind`` over ``dim`` channels (no PQ/RQ/segments)."""
    if cfg.kind == "softvq":
        return SoftVQ(
            dim, cfg.codebook_size, temperature=cfg.temperature,
            learnable_temperature=cfg.learnable_temperature, distance=cfg.distance,
            detach_codebook_in_logits=cfg.detach_codebook_in_logits,
            entropy_temperature=cfg.entropy_temperature,
        )
    if cfg.kind == "ae":
        return Identity(dim)
    raise ValueError(f"unknown bottleneck kind {cfg.kind!r}")


def build_bottleneck(cfg: BottleneckConfig) -> Bottleneck:
    """The full bottleneck described by ``cfg``, composition included."""
    return build_quantizer(cfg, cfg.latent_dim)
