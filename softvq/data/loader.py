"""Build the training stream and the held-out set a run uses, from its :class:`DataConfig`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from softvq.data.bundled import BundledCropsDataset, heldout_crops, split_bundled
from softvq.data.folder import ImageFolderDataset, holdout_order, scan_folder
from softvq.data.images import ImageReadError, load_rgb, read_image
from softvq.data.sampler import StreamBatchSampler
from softvq.data.shards import ShardStream
from softvq.data.workers import ignore_stop_signals

if TYPE_CHECKING:
    from softvq.training.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Images (B, 3, H, W) in [-1, 1] and the unreadable files skipped to fill them."""

    images: torch.Tensor
    skipped: list[str] = field(default_factory=list)
    stream_position: tuple[int, int, int] | None = None  # shards: (logical worker, epoch, next index)


@dataclass
class HeldOut:
    """Fixed evaluation images, their names, and the unreadable files left out."""

    images: torch.Tensor
    names: list[str]
    skipped: list[str] = field(default_factory=list)


@dataclass
class TrainData:
    """A run's training stream: its DataLoader, a one-line description for the log, the number of
    images when known (not for tar shards), and the non-image files a folder held."""
    loader: DataLoader
    description: str
    num_items: int | None = None
    ignored_files: list[str] = field(default_factory=list)  # non-image files in a folder


def collate(samples: list[tuple]) -> Batch:
    """Stack images; shard samples also carry their stream position (a batch comes from one
    worker, so its last sample's position is where that worker continues)."""
    position = samples[-1][2] if len(samples[-1]) > 2 else None
    return Batch(torch.stack([s[0] for s in samples]), [p for s in samples for p in s[1]], position)


def build_data(cfg: "DataConfig", *, image_size: int, micro_batch: int, rank: int = 0, world_size: int = 1,
               seed: int = 0, start_micro_step: int = 0, stream_positions: dict[int, tuple[int, int]] | None = None,
               pin_memory: bool = False) -> tuple[TrainData, HeldOut]:
    """The training loader (this process's share of each global micro-batch of ``micro_batch * world_size``
    images, starting after ``start_micro_step`` consumed micro-batches) and the held-out images.
    ``stream_positions``: for shards, where each logical worker stopped (saved by the trainer)."""
    global_batch = micro_batch * world_size
    start = start_micro_step * global_batch
    ignored: list[str] = []
    dataset: BundledCropsDataset | ImageFolderDataset
    if cfg.source == "bundled":
        train_photos, held_photos = split_bundled(cfg.holdout)
        lo, hi = cfg.bundled_scales  # two numbers: TrainConfig.validate unpacks them the same way
        dataset = BundledCropsDataset(train_photos, image_size, seed=seed, scales=(lo, hi),
                                      crops_per_photo=cfg.bundled_crops_per_photo, hflip=cfg.hflip)
        description = (f"bundled photos: random crops of {len(train_photos)} photos "
                       f"({', '.join(dataset.names)}), held out: {', '.join(p.stem for p in held_photos)}")
        held = (load_folder_eval(Path(cfg.eval_path), image_size, cfg.num_eval_images,
                                 "to hold out the bundled photos of data.holdout") if cfg.eval_path
                else HeldOut(*heldout_crops(held_photos, image_size, cfg.num_eval_images, (lo, hi))))
    elif cfg.source == "folder":
        assert cfg.path is not None  # TrainConfig.validate requires it for a folder
        files, others = scan_folder(cfg.path, shards_fix="are read as webdataset shards with data.source=shards "
                                                          "(data.path may stay this folder)")
        ignored = [str(p) for p in others]
        if cfg.eval_path:
            held_out, trained = Path(cfg.eval_path).resolve(), Path(cfg.path).resolve()
            if held_out.is_relative_to(trained):  # the held-out numbers would be training's
                where = "is data.path" if held_out == trained else f"lies inside data.path ({cfg.path})"
                log.warning("data.eval_path %s: the held-out images are trained on too; move them out of "
                            "data.path, or set data.eval_path=null to hold out some of its images instead", where)
            train_files, held = files, load_folder_eval(Path(cfg.eval_path), image_size, cfg.num_eval_images,
                                                        "to hold out files of data.path")
        else:
            train_files, held = hold_out_readable(files, cfg.num_eval_images, image_size, Path(cfg.path))
        dataset = ImageFolderDataset(train_files, image_size, seed=seed, hflip=cfg.hflip,
                                     min_crop_fraction=cfg.min_crop_fraction)
        description = f"folder {cfg.path}: {len(train_files)} image files for training, {len(held.names)} held out"
        if others:
            description += f", {len(others)} non-image files ignored"
    else:
        assert cfg.path is not None  # TrainConfig.validate requires it for shards
        exact = start_micro_step == 0 or stream_positions is not None
        stream = ShardStream(cfg.path, image_size, seed=seed, rank=rank, world_size=world_size,
                             start_epoch=0 if exact else start_micro_step,  # no positions: a fresh order
                             start_batch=start_micro_step, positions=stream_positions,
                             hflip=cfg.hflip, min_crop_fraction=cfg.min_crop_fraction)
        loader = DataLoader(stream, batch_size=micro_batch, collate_fn=collate, num_workers=cfg.workers,
                            prefetch_factor=cfg.prefetch_factor if cfg.workers else None,
                            persistent_workers=False, pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
                            # as below: a DataLoader without one draws its workers' seeds from the global
                            # RNG, so a resumed run's augmentations would draw other numbers than the run's
                            generator=torch.Generator().manual_seed(seed))
        if cfg.eval_path:
            held = load_folder_eval(Path(cfg.eval_path), image_size, cfg.num_eval_images,
                                    "to evaluate on the bundled photos of data.holdout")
        else:
            _, held_photos = split_bundled(cfg.holdout)
            lo, hi = cfg.bundled_scales
            held = HeldOut(*heldout_crops(held_photos, image_size, cfg.num_eval_images, (lo, hi)))
        return TrainData(loader, f"webdataset shards {cfg.path} ({len(stream.shards)} shard{'s' if len(stream.shards) != 1 else ''})"), held

    sampler = StreamBatchSampler(len(dataset), global_batch, rank=rank, world_size=world_size, seed=seed, start=start)
    generator = torch.Generator().manual_seed(seed)  # keeps DataLoader from drawing on the global RNG
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                        prefetch_factor=cfg.prefetch_factor if cfg.workers else None,
                        pin_memory=pin_memory, generator=generator, worker_init_fn=ignore_stop_signals)
    return TrainData(loader, description, len(dataset), ignored), held


def load_eval_files(files: list[Path], size: int, count: int = 0) -> HeldOut:
    """The first ``count`` readable files (0: all), centre-cropped and resized; an unreadable file
    is left out, listed, and the next one drawn in its place."""
    images: list[torch.Tensor] = []
    names: list[str] = []
    skipped: list[str] = []
    for path in files:
        if count and len(images) == count:
            break
        try:
            images.append(read_image(path, size, resize=True))
            names.append(path.stem)
        except ImageReadError:
            skipped.append(str(path))
    if not images:
        raise ImageReadError(f"none of the {len(files)} held-out image files could be read "
                             f"(e.g. {', '.join(skipped[:3])})")
    return HeldOut(torch.stack(images), names, skipped)


def hold_out_readable(files: list[Path], count: int, size: int, folder: Path) -> tuple[list[Path], HeldOut]:
    """(training files, held-out images) of one folder: up to ``count`` readable files (at most half
    the folder), drawn in :func:`holdout_order`, never trained on, not even through a symlink to
    one. An unreadable file is skipped (listed in ``skipped``, left out of training too) and the
    next one drawn; the last held-out image goes back to training when no other file can be read,
    since a run needs both."""
    fix = "replace the unreadable files, or point data.path at another folder"
    if len(files) < 2:
        raise ValueError(f"{folder} holds {len(files)} image file: a run needs one to train on and one held out "
                         f"(data.num_eval_images); add images, or set data.eval_path to a folder of held-out ones")
    order = holdout_order(files)
    want, tried = min(count, len(files) // 2), 0
    held: list[tuple[Path, torch.Tensor]] = []
    skipped: list[str] = []
    held_real: set[str] = set()  # a held-out picture under any of its names (a link to it, the file a link names)
    for path in order:
        if len(held) == want:
            break
        tried += 1
        real = os.path.realpath(path)
        if real in held_real:  # the same picture again, through a link: held out once
            continue
        try:
            held.append((path, read_image(path, size, resize=True)))
            held_real.add(real)
        except ImageReadError:
            skipped.append(str(path))
    if not held:
        raise ImageReadError(f"none of the {len(files)} image files in {folder} could be read "
                             f"(e.g. {', '.join(skipped[:3])}); {fix}")
    # stops at the first readable file: one read as a rule; a held-out picture's twin trains on nothing new
    if not any(_readable(p) for p in order[tried:] if os.path.realpath(p) not in held_real):
        if len(held) == 1:
            raise ImageReadError(f"only 1 of the {len(files)} image files in {folder} could be read "
                                 f"({held[0][0]}): a run needs one to train on and one held out; {fix}")
        held_real.discard(os.path.realpath(held.pop()[0]))
    kept = {p for p, _ in held} | set(map(Path, skipped))
    train = [f for f in files if f not in kept and os.path.abspath(f) not in held_real  # abspath: no system call
             and not (os.path.islink(f) and os.path.realpath(f) in held_real)]
    return train, HeldOut(torch.stack([image for _, image in held]), [p.stem for p, _ in held], skipped)


def _readable(path: Path) -> bool:
    try:
        load_rgb(path)
    except ImageReadError:
        return False
    return True


def load_folder_eval(folder: Path, size: int, count: int, without: str) -> HeldOut:
    """The first ``count`` readable images of ``data.eval_path``; ``without`` says, for the error,
    what ``data.eval_path=null`` holds out instead with this data source."""
    files, _ = scan_folder(folder, fix=f"set data.eval_path to a folder of held-out images, or data.eval_path=null "
                                       f"{without}")
    return load_eval_files(files, size, count)
