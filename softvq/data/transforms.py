"""Training augmentations, driven by an explicit RNG: random crop and horizontal flip, as in the
LlamaGen codebase the paper trains with (Sec. 4.1 names the codebase; neither text names the
augmentations).

Every random choice takes a ``numpy.random.Generator`` made from (run seed, sample position), so
an image's crop does not depend on which worker or process loads it, and a resumed run sees the
same crops as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """The RNG of the sample drawn at global stream ``position`` of a run with ``seed``."""
    return np.random.default_rng([seed, position])


def random_crop(img: Image.Image, size: int, rng: np.random.Generator, min_fraction: float = 0.8) -> Image.Image:
    """Resize the shorter side to size / U(min_fraction, 1), then cut a random size x size window.

    This is the "random crop" of LlamaGen's tokenizer training (ADM's ``random_crop_arr``), the
    codebase the paper builds on: the crop keeps between ``min_fraction`` and all of the shorter
    side. ``min_fraction=1`` gives a plain random crop after resizing the shorter side to ``size``.
    """
    fraction = rng.uniform(min_fraction, 1.0) if min_fraction < 1.0 else 1.0
    short = max(size, math.ceil(size / fraction))
    w, h = img.size
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(rng.integers(0, new_w - size + 1))
    top = int(rng.integers(0, new_h - size + 1))
    return img.crop((left, top, left + size, top + size))


def random_scale_crop(img: Image.Image, size: int, rng: np.random.Generator,
                      scales: tuple[float, float]) -> Image.Image:
    """A square crop whose side is a log-uniform fraction in ``scales`` of the shorter side, at a
    random place, resized to ``size``: crops of a few large photos at many scales."""
    w, h = img.size
    lo, hi = scales
    fraction = math.exp(rng.uniform(math.log(lo), math.log(hi))) if lo < hi else lo
    side = max(1, min(min(w, h), round(min(w, h) * fraction)))
    left = int(rng.integers(0, w - side + 1))
    top = int(rng.integers(0, h - side + 1))
    crop = img.crop((left, top, left + side, top + side))
    return crop if side == size else crop.resize((size, size), Image.Resampling.BICUBIC)


def random_flip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    """Horizontal flip with probability ``p``."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img
