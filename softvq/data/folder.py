"""A folder of images (recursive, any format Pillow reads) for training.

Files that cannot be decoded (corrupt, truncated, not really images) are skipped: the sample at
that index is replaced by the next readable file, deterministically, and the skipped path is
returned with the batch so the trainer can count and report it. Non-image files (by suffix) are
never listed; :func:`scan_folder` counts them so the report can say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from softvq.data.images import (IMAGE_SUFFIXES, ImageReadError, load_rgb, name_unread_images, require_folder,
                                to_tensor, walk_files)
from softvq.data.transforms import random_crop, random_flip, sample_rng

Sample = tuple[torch.Tensor, list[str]]


def scan_folder(folder: str | Path, fix: str = "set data.path to a folder of images",
                shards_fix: str | None = None) -> tuple[list[Path], list[Path]]:
    """(image files by suffix, other files) under ``folder``, recursively, sorted.

    ``fix`` ends the error for a missing folder or one without images: it names the config key
    that named the folder; ``shards_fix`` is added where the folder holds .tar files instead.
    """
    folder = require_folder(folder, fix)
    files = walk_files(folder)
    name_unread_images(files)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        shards = sum(p.suffix.lower() == ".tar" and p.parent == folder for p in others)  # what a shards folder reads
        hint = f"; its {shards} .tar file(s) {shards_fix}" if shards and shards_fix else ""
        raise FileNotFoundError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}; "
                                f"{len(others)} other file(s)); {fix}{hint}")
    return images, others


def holdout_order(files: list[Path]) -> list[Path]:
    """``files`` in the fixed shuffle the held-out set is drawn from, front first: the split never
    depends on the run seed."""
    return [files[i] for i in np.random.default_rng(0).permutation(len(files)).tolist()]


class ImageFolderDataset(Dataset):
    """Random-cropped, randomly flipped ``size`` x ``size`` training images from a list of files.

    Indexed by ``(item, position)`` pairs from :class:`~softvq.data.sampler.StreamBatchSampler`;
    the position seeds the augmentation.
    """

    def __init__(self, files: list[Path], size: int, *, seed: int = 0, hflip: bool = True,
                 min_crop_fraction: float = 0.8) -> None:
        if not files:
            raise ValueError("no image files to train on")
        self.files = [str(f) for f in files]  # plain strings: smaller in every worker than Path objects
        self.size = size
        self.seed = seed
        self.hflip = hflip
        self.min_crop_fraction = min_crop_fraction

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, position = key
        skipped: list[str] = []
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                img = load_rgb(path)
            except ImageReadError:
                skipped.append(path)
                continue
            rng = sample_rng(self.seed, position)
            img = random_crop(img, self.size, rng, self.min_crop_fraction)
            if self.hflip:
                img = random_flip(img, rng)
            return to_tensor(img), skipped
        raise ImageReadError(f"none of the {len(self.files)} image files could be read (e.g. {self.files[0]})")
