"""WebDataset tar shards for ImageNet-scale training.

Each shard is a tar of samples ``<key>.<ext>`` (the extension starts at the file name's first
dot, as webdataset reads it); a sample's image is its member whose extension comes first in
``png, jpg, jpeg, bmp, gif, webp, tif, tiff, ppm, pgm`` (other members such as ``cls`` are
ignored). ``softvq eval`` reads shards the same way (:func:`image_members`).
Shards are listed from a brace pattern (``/data/train-{000000..001023}.tar``), re-shuffled every
epoch from the run seed, and split between processes and DataLoader workers, so every image is
seen once per epoch. Unreadable samples are skipped and reported with the batch, like
:mod:`softvq.data.folder`.

Resuming is exact: every yielded image carries its stream position (logical worker, epoch,
sample index), the trainer saves the position of the last batch it consumed from each logical
worker, and a resumed stream skips to it without decoding the skipped samples. Augmentation
randomness is a function of (seed, epoch, rank, logical worker, sample index), so a skipped
sample consumes none. DataLoader hands out batches round-robin from worker 0, so after ``b``
consumed batches physical worker ``w`` plays logical worker ``(w + b) % workers``: global batch
``k`` always comes from logical worker ``k % workers``. Without saved positions (or with another
worker count) a resumed stream starts a fresh epoch order instead.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from softvq.data.images import IMAGE_SUFFIXES, decode_rgb, to_tensor
from softvq.data.transforms import random_crop, random_flip
from softvq.messages import first_few

_IMAGE_KEYS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
# webdataset's split of a member name into sample key and extension: the extension starts at the
# first dot of the file name ("a/0001.cls" -> key "a/0001", extension "cls")
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def image_members(names: list[str]) -> list[str]:
    """The member that is each sample's image, in tar order: members grouped by sample key as
    webdataset groups them, and per sample the first of :data:`_IMAGE_KEYS` present, as the
    training stream picks it. Evaluation uses this too, so both read the same images."""
    by_key: dict[str, dict[str, str]] = {}
    for name in names:
        match = _KEY_AND_EXTENSION.match(name)
        if match:
            by_key.setdefault(match.group(1), {})[match.group(2).lower()] = name
    chosen = []
    for members in by_key.values():
        ext = next((k for k in _IMAGE_KEYS if k in members), None)
        if ext is not None:
            chosen.append(members[ext])
    return chosen


def is_remote(name: str) -> bool:
    """A URL or a ``pipe:`` command, which webdataset opens itself: nothing to check on disk."""
    return "://" in name or name.startswith("pipe:")


def pattern_parts(pattern: str) -> list[str]:
    """``pattern`` split at the commas outside braces: ``a-{0,1}.tar,b.tar`` is two parts (the
    list :func:`expand_shards` reads; a config's relative parts are anchored one by one)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(pattern):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    return [p.strip() for p in [*parts, pattern[start:]] if p.strip()]


def expand_shards(pattern: str) -> list[str]:
    """The shards ``pattern`` names, in its order, each once: a brace pattern
    (``train-{000..099}.tar``), a glob (``*.tar``, sorted), a folder (its ``.tar`` files, sorted),
    URLs and ``pipe:`` commands (kept as given), or a comma-separated list of these. Training
    (``data.source=shards``) and ``softvq eval`` both read shards through it. A missing local
    shard, or a glob or folder with none, is an error naming it."""
    import braceexpand  # installed with webdataset

    names: list[str] = []
    whole = Path(pattern).expanduser()
    parts = [pattern] if whole.exists() else pattern_parts(pattern)  # "my,set.tar" is one file
    for part in parts:
        for name in braceexpand.braceexpand(part):
            local = Path(name).expanduser()
            if is_remote(name):
                names.append(name)
            elif local.is_dir():
                found = sorted(str(p) for p in local.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"{name} holds no .tar shards")
                names += found
            elif any(ch in name for ch in "*?["):
                found = sorted(glob.glob(str(local)))
                if not found:
                    raise FileNotFoundError(f"no shards match {name!r}")
                names += found
            else:
                names.append(str(local))
    names = list(dict.fromkeys(names))
    missing = [n for n in names if not is_remote(n) and not Path(n).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {pattern!r} do not exist, e.g. {missing[0]}")
    if not names:
        raise FileNotFoundError(f"no shards in {pattern!r}")
    return names


class ShardStream(IterableDataset):
    """Endless stream of ``(image tensor, skipped keys, position)`` from tar shards, split by process
    and worker; ``position`` = (logical worker, epoch, next sample index) for exact resume."""

    def __init__(self, pattern: str, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_epoch: int = 0, start_batch: int = 0,
                 positions: dict[int, tuple[int, int]] | None = None,
                 hflip: bool = True, min_crop_fraction: float = 0.8) -> None:
        self.shards = expand_shards(pattern)
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_epoch = start_epoch
        self.start_batch = start_batch
        self.positions = positions or {}
        self.hflip = hflip
        self.min_crop_fraction = min_crop_fraction

    def _my_shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        mine = [self.shards[i] for i in order[self.rank :: self.world_size]]
        return mine[worker::workers]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str], tuple[int, int, int]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if len(self.shards) < self.world_size * workers:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.world_size} processes x {workers} workers; "
                f"use more shards or fewer data.workers"
            )
        logical = (worker + self.start_batch) % workers
        epoch, position = self.positions.get(logical, (self.start_epoch, 0))
        pending: list[str] = []  # skipped samples, reported with the next good one

        def skip(exc: Exception) -> bool:
            pending.append(f"tar error {type(exc).__name__}: {exc}")
            return True

        import webdataset as wds  # only needed for shards

        while True:
            urls = [{"url": u} for u in self._my_shards(epoch, logical, workers)]
            served = False
            for index, sample in enumerate(wds.tarfile_samples(urls, handler=skip)):
                if index < position:  # consumed before the resume: skip without decoding
                    served = True
                    continue
                key = next((k for k in _IMAGE_KEYS if k in sample), None)
                if key is None:  # a sample of other files only (metadata): not an image, as eval reads it
                    continue
                try:
                    img = decode_rgb(sample[key])
                except Exception:  # corrupt image: skip it, report it
                    pending.append(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}")
                    continue
                served = True
                rng = np.random.default_rng([self.seed, epoch, self.rank, logical, index])
                img = random_crop(img, self.size, rng, self.min_crop_fraction)
                if self.hflip:
                    img = random_flip(img, rng)
                yield to_tensor(img), pending[:], (logical, epoch, index + 1)
                pending.clear()
            if not served:  # a whole pass without one image would loop for ever
                shards = first_few([u["url"] for u in urls], 3)
                raise ValueError(f"no readable image in the shards {shards} ({len(pending)} unreadable samples); "
                                 f"check data.path, or give this worker shards with images")
            epoch, position = epoch + 1, 0
