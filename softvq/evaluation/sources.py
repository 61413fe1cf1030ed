"""Where evaluation images come from, in a fixed order: an image folder, webdataset shards, or a
sample batch ``.npz`` (``arr_0``: N x H x W x 3 uint8, as ``generate --npz`` and ADM's samplers write).

Order (part of the evaluation protocol): a folder's images sorted by relative path (recursive);
shards in sorted order (``data/val-{000..063}.tar`` brace patterns and ``*`` globs expand, then
sort), and inside each shard the tar member order; a sample batch's rows in order. The first
``limit`` images are used.
Every image is resized and centre-cropped to the model's size as ADM does (box halvings, then PIL
bicubic, then the middle square: :func:`softvq.data.images.center_crop_resize`).
"""

from __future__ import annotations

import struct
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from softvq.data.images import (IMAGE_SUFFIXES, ImageReadError, center_crop_resize, decode_rgb, list_images, load_rgb,
                                why_unreadable)
from softvq.data.shards import expand_shards, image_members, is_remote
from softvq.data.workers import ignore_stop_signals, stack_readable, worker_batches


@dataclass(frozen=True)
class ImageRef:
    """One image: a file, or a member of a tar shard (with its byte range when uncompressed)."""

    path: Path
    member: str | None = None
    offset: int | None = None
    size: int | None = None

    @property
    def name(self) -> str:
        """The image's file, with ``:member`` for a tar member."""
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def read_member(self) -> bytes:
        """The tar member's bytes."""
        if self.offset is not None and self.size is not None:
            # Plain .tar: read the byte range directly (no header scan per image, fork-safe).
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                return fh.read(self.size)
        assert self.member is not None  # open_rgb reads a ref without a member as a file
        with tarfile.open(self.path, "r:*") as tar:
            member = tar.extractfile(self.member)
            if member is None:  # not a regular file: the AttributeError open_rgb reports as unreadable
                raise AttributeError(f"{self.name} is not a regular file")
            return member.read()

    def open_rgb(self) -> Image.Image:
        """The image as RGB, or :class:`ImageReadError` naming it."""
        if self.member is None:
            return load_rgb(self.path)
        try:
            data = self.read_member()
        except (OSError, KeyError, AttributeError, tarfile.TarError) as exc:
            raise ImageReadError(f"{self.name}: unreadable tar member ({type(exc).__name__})") from None
        return decode_rgb(data, self.name)


@dataclass(frozen=True)
class ArrayImageRef:
    """One image of a sample batch ``.npz``: row ``index`` of its uncompressed ``arr_0``, whose
    pixels start at byte ``offset`` of the file (read directly: no unzipping, fork-safe)."""

    path: Path
    index: int
    offset: int
    height: int
    width: int

    @property
    def name(self) -> str:
        """The ``.npz`` file, with ``[row]``."""
        return f"{self.path}[{self.index}]"

    def open_rgb(self) -> Image.Image:
        """The row's pixels as an RGB image."""
        count = self.height * self.width * 3
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + self.index * count)
            data = fh.read(count)
        if len(data) != count:
            raise ImageReadError(f"{self.name}: the file ends inside this image")
        return Image.fromarray(np.frombuffer(data, np.uint8).reshape(self.height, self.width, 3))


ImageSource = ImageRef | ArrayImageRef  # what evaluation reads an image from


def sample_batch_refs(path: Path, limit: int | None = None) -> list[ArrayImageRef]:
    """The images of a sample batch ``.npz`` (``arr_0`` of shape (N, H, W, 3), uint8, stored
    uncompressed: what ``np.savez``, ADM's samplers and ``generate --npz`` write)."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo("arr_0.npy")
        except KeyError:
            raise FileNotFoundError(f"{path} holds no arr_0 (a sample batch's images); a .npz of reference "
                                    f"statistics (mu, sigma) scores samples, it is not a set of them") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path} is compressed (np.savez_compressed): its images cannot be read in place; "
                             f"save it with np.savez, or pass a folder of the images")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"{path}: arr_0 is a .npy of version {version}, which this reader does not know")
            shape, fortran, dtype = read_header(member)
            header_bytes = member.tell()
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"{path}: arr_0 is {dtype} of shape {shape}; a sample batch is (N, H, W, 3) uint8 "
                         f"(C order)")
    with open(path, "rb") as fh:  # the member's data follows its local header, whose extra field may differ
        fh.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", fh.read(4))
    start = info.header_offset + 30 + name_length + extra_length + header_bytes
    count = shape[0] if not limit else min(limit, shape[0])
    return [ArrayImageRef(path, i, start, shape[1], shape[2]) for i in range(count)]


def local_shards(spec: str) -> list[Path]:
    """The shards ``spec`` names (:func:`softvq.data.shards.expand_shards`), sorted: the protocol's
    image order does not depend on how the pattern was written. Evaluation reads local files only."""
    names = expand_shards(spec)
    remote = [n for n in names if is_remote(n)]
    if remote:
        raise FileNotFoundError(f"softvq eval reads local shards only, not {remote[0]}; download them first")
    return sorted({Path(n).expanduser() for n in names})


def _shard_members(shard: Path) -> list[ImageRef]:
    """The image members of ``shard`` in tar order. A damaged shard (truncated, not a tar) keeps the
    members read before the damage, and one more ref for the rest, which reads as unreadable: so
    the damage is named, skipped and counted like a corrupt image, as training does, instead of
    ending the evaluation."""
    members: dict[str, tarfile.TarInfo] = {}
    damage = None
    try:
        try:
            tar, plain = tarfile.open(shard, "r:"), True  # uncompressed: byte ranges are valid
        except tarfile.ReadError:
            tar, plain = tarfile.open(shard, "r:*"), False
        with tar:
            for m in tar:
                if m.isfile():
                    members[m.name] = m
    except (OSError, EOFError, tarfile.TarError) as exc:
        damage = ImageRef(shard, f"(the rest of the shard: {type(exc).__name__})")
    # one image per sample, the one training reads (webdataset's keys; see image_members)
    refs = [ImageRef(shard, m.name, m.offset_data if plain else None, m.size if plain else None)
            for m in (members[name] for name in image_members(list(members)))]
    return refs + ([damage] if damage else [])


def list_image_refs(source: str | Path, limit: int | None = None) -> tuple[list[ImageSource], list[Path], Path | None]:
    """-> (the first ``limit`` images in protocol order, the files they live in, the folder root).

    ``source``: an image folder, a folder of ``.tar`` shards, a ``.tar`` file, a shard pattern, or a
    sample batch ``.npz``.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.suffix == ".npz" and path.is_file():
        return list(sample_batch_refs(path, limit)), [path], None
    if path.is_dir():
        files = list_images(path)
        if files:
            refs: list[ImageSource] = [ImageRef(p) for p in (files[:limit] if limit else files)]
            return refs, [r.path for r in refs], path
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")
        root = path
    elif path.suffix == ".tar" or any(ch in text for ch in "{*?[,") or is_remote(text):
        shards, root = local_shards(text), None
    elif not path.exists():
        raise FileNotFoundError(f"{text} does not exist: pass an image folder, webdataset .tar shards or a sample "
                                f"batch .npz")
    else:
        raise FileNotFoundError(f"{text} is neither an image folder nor webdataset .tar shards")
    refs = []  # typed by the image-folder branch above
    used: list[Path] = []
    for shard in shards:
        members = _shard_members(shard)
        if members:
            used.append(shard)
        refs += members
        if limit and len(refs) >= limit:
            break
    if not refs:
        raise FileNotFoundError(f"no images inside the shards of {text}")
    return (refs[:limit] if limit else refs), used, root


class EvalImages(torch.utils.data.Dataset):
    """Images in protocol order as uint8 tensors (3, size, size): centre crop + bicubic resize.
    An unreadable image comes out as its name instead, for :func:`readable_batches` to skip."""

    def __init__(self, refs: list[ImageSource], size: int) -> None:
        self.refs = refs
        self.size = size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            img = center_crop_resize(self.refs[i].open_rgb(), self.size)
        except ImageReadError:
            return self.refs[i].name
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def readable_batches(refs: list[ImageSource], size: int, batch_size: int, workers: int,
                     skipped: list[str], require_readable: bool = True) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, size, size) of ``refs`` in protocol order, batch k from refs
    [k·batch_size, (k+1)·batch_size). Unreadable images are left out and their names appended to
    ``skipped``, so one corrupt file does not end a long run; an :class:`ImageReadError` when none
    of them is readable (unless ``require_readable`` is False: the tail of a resumed run)."""
    loader = torch.utils.data.DataLoader(EvalImages(refs, size), batch_size=batch_size, num_workers=workers,
                                         shuffle=False, collate_fn=stack_readable, worker_init_fn=ignore_stop_signals)
    readable = 0
    with worker_batches(loader) as batches:  # the workers stop with the generator, an error or close()
        for images, order in batches:
            skipped += [name for name in order if name is not None]
            if images is not None:
                readable += len(images)
                yield images
    if require_readable and refs and not readable:
        raise ImageReadError(f"none of the first {len(refs)} images given is readable, "
                             f"e.g. {why_unreadable(skipped[0])}")


def first_readable(refs: list[ImageSource], none_read: str) -> Image.Image:
    """The first of ``refs`` that reads (the others before it are tried and passed over): what a
    check before a long run needs to know of a set that is skipped past when read. Where none
    reads, an :class:`ImageReadError` of ``none_read``, with the first one and why."""
    for ref in refs:
        try:
            return ref.open_rgb()
        except ImageReadError:
            continue
    raise ImageReadError(f"{none_read}, e.g. {why_unreadable(refs[0].name)}")


def skipped_note(skipped: list[str], considered: int) -> str:
    """One line for a report's notes about the images :func:`readable_batches` left out."""
    return f"skipped {len(skipped)} unreadable image(s) of the first {considered}, e.g. {why_unreadable(skipped[0])}"


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], the tokenizer's input convention."""
    return images.float().div(127.5).sub(1.0)
