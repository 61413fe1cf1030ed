"""The embedded default data set: random crops of the photos shipped in scikit-image / scikit-learn.

Eleven colour photographs (``softvq.data.images.bundled_photos``) are enough to train a small
tokenizer on a CPU without downloading anything. A few photos (``holdout``) are never trained on;
fixed crops of them are the held-out set for reconstruction grids and PSNR / LPIPS. Training
samples are random square crops at log-uniform scales of the shorter side, resized to the training
size and randomly flipped: an endless stream of distinct images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from softvq.data.images import bundled_photos, load_rgb, to_tensor
from softvq.data.transforms import random_flip, random_scale_crop, sample_rng

# Evaluation crops use their own fixed seed: the held-out set is the same for every run.
_EVAL_SEED = 20250101


def split_bundled(holdout: list[str]) -> tuple[list[Path], list[Path]]:
    """(training photos, held-out photos) by file stem; unknown stems are an error listing the known."""
    photos = bundled_photos()
    stems = {p.stem: p for p in photos}
    unknown = [h for h in holdout if h not in stems]
    if unknown:
        raise ValueError(f"data.holdout names unknown bundled photos {unknown}; known: {', '.join(sorted(stems))}")
    train = [p for p in photos if p.stem not in holdout]
    if not train:
        raise ValueError("data.holdout holds out every bundled photo; keep at least one for training")
    return train, [stems[h] for h in holdout]


class BundledCropsDataset(Dataset):
    """Random multi-scale crops of the training photos, ``crops_per_photo`` draws per photo per epoch."""

    def __init__(self, photos: list[Path], size: int, *, seed: int = 0, scales: tuple[float, float] = (0.2, 1.0),
                 crops_per_photo: int = 64, hflip: bool = True) -> None:
        self.photos = [load_rgb(p) for p in photos]
        self.names = [p.stem for p in photos]
        self.size = size
        self.seed = seed
        self.scales = (float(scales[0]), float(scales[1]))
        self.crops_per_photo = crops_per_photo
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.photos) * self.crops_per_photo

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
        index, position = key
        rng = sample_rng(self.seed, position)
        img = random_scale_crop(self.photos[index % len(self.photos)], self.size, rng, self.scales)
        if self.hflip:
            img = random_flip(img, rng)
        return to_tensor(img), []


def heldout_crops(photos: list[Path], size: int, count: int, scales: tuple[float, float],
                  seed: int = _EVAL_SEED) -> tuple[torch.Tensor, list[str]]:
    """``count`` fixed crops spread over the photos, interleaved photo by photo so any prefix
    (e.g. a grid's first 8) shows every photo: each photo's first crop is the whole photo (centre
    square), the others are at random places and scales fixed by ``seed``.
    Returns (images (count, 3, size, size), names ``<photo stem>-<k>``)."""
    per_photo = [count // len(photos) + (i < count % len(photos)) for i in range(len(photos))]
    crops: list[list[tuple[torch.Tensor, str]]] = []
    for p_index, (path, n) in enumerate(zip(photos, per_photo)):
        img = load_rgb(path)
        rng = np.random.default_rng([seed, p_index])
        mine = []
        for k in range(n):
            source, crop_scales = (_centre_square(img), (1.0, 1.0)) if k == 0 else (img, scales)
            mine.append((to_tensor(random_scale_crop(source, size, rng, crop_scales)), f"{path.stem}-{k}"))
        crops.append(mine)
    ordered = [photo[k] for k in range(max(per_photo)) for photo in crops if k < len(photo)]
    return torch.stack([c[0] for c in ordered]), [c[1] for c in ordered]


def _centre_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))
