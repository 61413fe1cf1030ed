"""Differentiable augmentation for the discriminator (DiffAugment, Zhao et al. 2020).

Supplementary C.1: "we use DiffAug [121], consistency regularization [119], and LeCAM
regularization [101] for discriminator training as in [99]". The policy is DiffAugment's
``color,translation,cutout`` on images in [−1, 1]:

* colour:      x + U(−0.5, 0.5);  (x − mean_c) · U(0, 2) + mean_c;  (x − mean) · U(0.5, 1.5) + mean
* translation: an integer shift of up to ``translation_ratio`` · size in each direction, zero fill
* cutout:      a zeroed square of side ``cutout_ratio`` · size at a random centre

Each operation group (colour / translation / cutout) is applied with probability ``prob`` (the
release: 0.5 with cutout 0.2 for the hinge loss; 1.0 with cutout 0.5 for the consistency term).
As released, one coin decides for the whole batch; ``per_sample=True`` flips one coin per image
instead (ADA-style). The random magnitudes are always per image. Every step is a
differentiable function of the image, so gradients reach the tokenizer through augmented
reconstructions.

Parameters are drawn once by :meth:`DiffAugment.sample` and applied by :meth:`DiffAugment.apply`,
so a real image and its reconstruction can get *identical* augmentations (``paired=True``); the
release draws them independently (``paired=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POLICY = ("color", "translation", "cutout")


@dataclass
class AugmentParams:
    """One draw of augmentation parameters for a batch (per-sample tensors)."""

    use_color: Tensor  # (B,) bool
    brightness: Tensor  # (B, 1, 1, 1)
    saturation: Tensor
    contrast: Tensor
    use_translation: Tensor  # (B,) bool
    shift: Tensor  # (B, 2) long, rows then columns
    use_cutout: Tensor  # (B,) bool
    cutout_center: Tensor  # (B, 2) long
    cutout_size: tuple[int, int]


class DiffAugment:
    """DiffAugment with per-sample probability ``prob``; see the module docstring."""

    def __init__(
        self,
        policy: tuple[str, ...] = POLICY,
        *,
        prob: float = 0.5,
        translation_ratio: float = 0.125,
        cutout_ratio: float = 0.2,
        per_sample: bool = False,
    ) -> None:
        unknown = set(policy) - set(POLICY)
        if unknown:
            raise ValueError(f"unknown DiffAugment operation(s) {sorted(unknown)}; choose from {POLICY}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"DiffAugment probability must be in [0, 1], got {prob}")
        self.policy = tuple(policy)
        self.prob = prob
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio
        self.per_sample = per_sample

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw one augmentation of a batch like ``x`` (which ops apply to which sample, and their
        strengths) from ``generator``."""
        b, _, h, w = x.shape
        dev = x.device

        def uniform(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        def coin(op: str) -> Tensor:
            hit = uniform(b) < self.prob if self.per_sample else (uniform(1) < self.prob).expand(b)
            return hit if op in self.policy else torch.zeros_like(hit)

        use_color, use_translation, use_cutout = coin("color"), coin("translation"), coin("cutout")
        sh, sw = int(h * self.translation_ratio + 0.5), int(w * self.translation_ratio + 0.5)
        shift = torch.stack([
            torch.randint(-sh, sh + 1, (b,), generator=generator, device=dev),
            torch.randint(-sw, sw + 1, (b,), generator=generator, device=dev),
        ], dim=1)
        size = (max(1, int(h * self.cutout_ratio + 0.5)), max(1, int(w * self.cutout_ratio + 0.5)))
        # centres in [0, size + 1) for an even square, as DiffAugment draws them
        center = torch.stack([
            torch.randint(0, h + (1 - size[0] % 2), (b,), generator=generator, device=dev),
            torch.randint(0, w + (1 - size[1] % 2), (b,), generator=generator, device=dev),
        ], dim=1)
        return AugmentParams(
            use_color=use_color,
            brightness=(uniform(b, 1, 1, 1) - 0.5),
            saturation=uniform(b, 1, 1, 1) * 2,
            contrast=uniform(b, 1, 1, 1) + 0.5,
            use_translation=use_translation, shift=shift,
            use_cutout=use_cutout, cutout_center=center, cutout_size=size,
        )

    def apply(self, x: Tensor, p: AugmentParams) -> Tensor:
        """Apply the drawn augmentation to ``x`` (the same batch size as it was drawn for)."""
        if x.shape[0] != p.shift.shape[0]:
            raise ValueError(f"augmentation drawn for batch {p.shift.shape[0]}, applied to batch {x.shape[0]}")
        if "color" in self.policy:
            x = torch.where(p.use_color.view(-1, 1, 1, 1), color(x, p), x)
        if "translation" in self.policy:
            x = torch.where(p.use_translation.view(-1, 1, 1, 1), translate(x, p.shift), x)
        if "cutout" in self.policy:
            x = torch.where(p.use_cutout.view(-1, 1, 1, 1), x * cutout_mask(x, p), x)
        return x

    def __call__(self, *images: Tensor, paired: bool = True) -> tuple[Tensor, ...]:
        """Augment each batch; ``paired`` uses one draw for all (same shapes required)."""
        if paired:
            params = self.sample(images[0])
            return tuple(self.apply(x, params) for x in images)
        return tuple(self.apply(x, self.sample(x)) for x in images)


def color(x: Tensor, p: AugmentParams) -> Tensor:
    """DiffAugment's colour op: brightness, then saturation, then contrast."""
    x = x + p.brightness.to(x.dtype)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * p.saturation.to(x.dtype) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * p.contrast.to(x.dtype) + mean


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """out[i, j] = x[i + dy, j + dx] where inside the image, else 0."""
    b, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h) + shift[:, :1]  # (B, H)
    cols = torch.arange(w, device=x.device).view(1, w) + shift[:, 1:]  # (B, W)
    valid = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(b, 1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    gathered = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1).view(b, h, 1), cols.clamp(0, w - 1).view(b, 1, w)]
    return gathered.permute(0, 3, 1, 2) * valid.to(x.dtype)


def cutout_mask(x: Tensor, p: AugmentParams) -> Tensor:
    """(B, 1, H, W) mask, 0 inside the square of ``cutout_size`` centred at ``cutout_center``."""
    b, _, h, w = x.shape
    sh, sw = p.cutout_size
    top = p.cutout_center[:, :1] - sh // 2
    left = p.cutout_center[:, 1:] - sw // 2
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    inside_r = (rows >= top) & (rows < top + sh)
    inside_c = (cols >= left) & (cols < left + sw)
    inside = inside_r.view(b, 1, h, 1) & inside_c.view(b, 1, 1, w)
    return (~inside).to(x.dtype)
