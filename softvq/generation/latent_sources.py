"""What ``softvq pretokenize`` encodes: an image folder (one class per sub-folder, or a single class
when the images sit directly in it), or random crops of the photos bundled in scikit-image /
scikit-learn (one class per photo, or a single class). Each source knows its ``identity``, so an
interrupted run continues only on the same samples, and can start anywhere, so processes can
split it."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softvq.data.folder import scan_folder
from softvq.data.images import CENTER_CROP, ImageReadError, bundled_photos, load_rgb, read_image, to_tensor
from softvq.data.workers import ignore_stop_signals, stack_readable, unstack_readable, worker_batches
from softvq.messages import first_few
from softvq.resume import listing_sha1

_LOG = logging.getLogger(__name__)  # the CLI prints its warnings as "softvq: warning: ..."

Sample = tuple[Tensor, int, str]  # image (3, H, W) in [-1, 1], label, name


@dataclass
class LatentSource:
    """Samples to encode, their class names, and how many there are.

    A source that can continue an interrupted run, or be split between processes, also has
    ``identity`` (JSON-able, what makes its samples: a resumed run must have the same) and
    ``resume_from(start, stop=None)``, the samples from source position ``start`` up to ``stop``;
    positions count every item, unreadable files included, in ``samples``' order.

    A source serves one :func:`pretokenize` call (``samples`` is read once, ``skipped`` filled once).
    """

    samples: Iterable[Sample]
    classes: list[str]
    count: int
    skipped: list[str] = field(default_factory=list)  # unreadable files, filled while iterating
    identity: dict[str, Any] | None = None
    resume_from: Callable[..., Iterable[Sample]] | None = None
    used: bool = False  # set by pretokenize
    # images softvq's own loaders made, in [-1, 1] by construction: a bright batch is no mistake to
    # warn of (softvq.ImageRangeWarning); a source of the caller's own tensors keeps the warning
    from_softvq_loader: bool = False


class _DecodedImages(torch.utils.data.Dataset):
    """Files read as (3, S, S) tensors in [-1, 1] (centre crop + resize); an unreadable file comes
    out as its error message, so the sample stream can skip and count it in order."""

    def __init__(self, files: list[Path], image_size: int) -> None:
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor | str:
        try:
            return read_image(self.files[i], self.image_size, resize=True)
        except ImageReadError as exc:
            return str(exc)


def folder_source(folder: str | Path, image_size: int, single_class: bool = False, workers: int = 0) -> LatentSource:
    """Images under ``folder``, centre-cropped and resized to ``image_size``. Labels come from the
    first-level sub-folder names (sorted); images directly in ``folder`` form one class.

    ``workers`` > 0 decodes in that many DataLoader processes, in order: ImageNet's JPEGs take
    a few ms each to decode and resize, more than a GPU takes to encode them.
    """
    if workers < 0:
        raise ValueError(f"workers must be 0 (decode in this process) or more, got {workers}")
    folder = Path(folder)
    files = scan_folder(folder, "pass --images a folder of images (sub-folders = classes)")[0]
    names = sorted({f.relative_to(folder).parts[0] for f in files if len(f.relative_to(folder).parts) > 1})
    if single_class or not names:
        classes, label_of = [folder.name or "images"], (lambda f: 0)
    else:
        if any(len(f.relative_to(folder).parts) == 1 for f in files):
            raise ValueError(f"{folder} mixes images and class sub-folders; move the loose images into a "
                             f"sub-folder, or take the whole folder as one class (--single-class; from Python, "
                             f"single_class=True)")
        index = {n: i for i, n in enumerate(names)}
        classes, label_of = names, (lambda f: index[f.relative_to(folder).parts[0]])
        # a class folder without images is no class: the indices of those after it shift down by one
        empty = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and p.name not in index)
        if empty:
            _LOG.warning("left out %d sub-folder(s) of %s without readable-format images (%s): they are no "
                         "classes, so the class indices count without them", len(empty), folder,
                         first_few(empty, 5))

    skipped: list[str] = []

    def labelled(todo: list[Path], decoded: Iterable[Tensor | str]) -> Iterator[Sample]:
        for f, image in zip(todo, decoded):
            if isinstance(image, str):  # a corrupt file is skipped and counted, not the end of the run
                skipped.append(image)
                continue
            yield image, label_of(f), str(f.relative_to(folder))

    def samples(start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        todo = files[start:stop]
        decoded = _DecodedImages(todo, image_size)
        if not workers:
            yield from labelled(todo, iter(decoded))  # iter: mypy knows the __getitem__ protocol only there
            return
        loader = torch.utils.data.DataLoader(decoded, batch_size=16, shuffle=False, num_workers=workers,
                                             collate_fn=stack_readable, worker_init_fn=ignore_stop_signals)
        with worker_batches(loader) as chunks:  # the workers stop with the generator, an error or close()
            yield from labelled(todo, (item for chunk in chunks for item in unstack_readable(*chunk)))

    listing = listing_sha1(str(f.relative_to(folder)) for f in files)
    identity = {"kind": "folder", "folder": str(folder.resolve()), "files": len(files), "listing_sha1": listing,
                "crop": CENTER_CROP,  # shards cut another way must not be continued with these
                "classes": classes, "image_size": image_size}
    return LatentSource(samples(), classes, len(files), skipped, identity, samples, from_softvq_loader=True)


def bundled_source(image_size: int, crops_per_photo: int = 32, seed: int = 0, single_class: bool = False,
                   scales: tuple[float, float] = (0.25, 1.0)) -> LatentSource:
    """Random square crops (side a log-uniform fraction ``scales`` of the shorter side, random
    horizontal flip) of each bundled photo, resized to ``image_size``; one class per photo."""
    from softvq.data.transforms import random_flip, random_scale_crop, sample_rng

    if isinstance(crops_per_photo, bool) or not isinstance(crops_per_photo, numbers.Integral) or crops_per_photo < 1:
        raise ValueError(f"crops_per_photo must be a whole number of 1 or more, got {crops_per_photo!r}")
    crops_per_photo = int(crops_per_photo)
    photos = bundled_photos()
    classes = ["photos"] if single_class else [p.stem for p in photos]

    def samples(start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        stop = len(photos) * crops_per_photo if stop is None else stop
        for label, path in enumerate(photos):
            first = label * crops_per_photo
            if first + crops_per_photo <= start or first >= stop:
                continue
            img = load_rgb(path)
            for k in range(max(0, start - first), min(crops_per_photo, stop - first)):
                rng = sample_rng(seed, label * crops_per_photo + k)  # one stream per position
                crop = random_flip(random_scale_crop(img, image_size, rng, scales), rng)
                yield to_tensor(crop), 0 if single_class else label, f"{path.stem}-{k:04d}"

    identity = {"kind": "bundled", "photos": [p.stem for p in photos], "crops_per_photo": crops_per_photo,
                "seed": seed, "single_class": single_class, "scales": list(scales), "image_size": image_size}
    return LatentSource(samples(), classes, len(photos) * crops_per_photo, identity=identity, resume_from=samples,
                        from_softvq_loader=True)
