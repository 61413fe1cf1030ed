"""Reading image files into tensors, and the photos that ship inside installed packages.

Every path that reads user images goes through here, so all commands treat bad input the same:
grayscale / RGBA / palette / CMYK images become RGB; unreadable files raise
:class:`ImageReadError` naming the file; sizes are changed only when the caller asks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                  ".tga", ".jp2", ".avif")  # AVIF: Pillow >= 11.3; an older one skips and names such files
# Photo and image formats Pillow does not read (HEIC, camera raw, vector and HDR formats): left out
# like any other file, but named, since a user would expect them to be used.
UNREAD_IMAGE_SUFFIXES = (".heic", ".heif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf",
                         ".svg", ".exr", ".hdr", ".jxl")

log = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file."""


class ImageSizeError(ImageReadError):
    """An image was read but its size does not fit the model (and resizing was not asked for).

    A subclass of :class:`ImageReadError`, so callers that skip unreadable files can still
    tell a wrong size (a usage error: fail, suggest ``--resize``) from a corrupt file (skip it).
    """


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB. Alpha is composited on white; palettes and grey are expanded."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO or device: opening it would wait for a writer
        raise ImageReadError(f"{path}: not a regular file")
    try:
        with Image.open(path) as img:
            _name_if_huge(img, path)
            img.load()
            return _as_rgb(img)
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageReadError(f"{path}: a link to {os.readlink(path)}, which does not exist") from None
        raise ImageReadError(f"{path}: no such file") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: {_too_large(exc)}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({_reason(exc)})") from None


def why_unreadable(name: str | Path) -> str:
    """``name`` with the reason it cannot be read ("x.png: not a readable image (OSError: Truncated
    File Read)"), found by reading it once more: for the one example a summary line shows, where the
    reading itself kept only the name. A tar member, or a file that now reads, gives the name alone."""
    path = Path(name)
    if not (path.is_file() or path.is_symlink()):
        return str(name)
    try:
        load_rgb(path)
    except ImageReadError as exc:
        return str(exc)
    return str(name)


def decode_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Like :func:`load_rgb` for the bytes of an image file (e.g. a member of a tar shard)."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            _name_if_huge(img, name)
            img.load()
            return _as_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name}: {_too_large(exc)}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a readable image ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """Why Pillow could not read a file, in a few words: its message without the path it repeats
    ("Truncated File Read", "Too many levels of symbolic links"), or what an unknown format means."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a format Pillow reads, or not an image at all"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = " ".join(text.split())
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


PIXEL_LIMIT_VARIABLE = "SOFTVQ_MAX_IMAGE_PIXELS"
if os.environ.get(PIXEL_LIMIT_VARIABLE, "").strip():
    # The user's explicit choice, so that the CLI (and its DataLoader workers) can open trusted huge
    # files; Pillow's own default stays untouched otherwise. 0 lifts the limit.
    try:
        _limit = int(os.environ[PIXEL_LIMIT_VARIABLE])
        if _limit < 0:  # Pillow would refuse every image
            raise ValueError
        Image.MAX_IMAGE_PIXELS = _limit or None
    except ValueError:  # said, not raised: this runs at import, before any command can report an error
        log.warning("%s=%r is not a whole, non-negative number of pixels (0 lifts Pillow's limit); Pillow's "
                    "limit stays", PIXEL_LIMIT_VARIABLE, os.environ[PIXEL_LIMIT_VARIABLE])

_named_huge: set[str] = set()  # each huge file is named once per process, not at every epoch's read


def _name_if_huge(img: Image.Image, name: str | Path) -> None:
    """Pillow warns past ``MAX_IMAGE_PIXELS`` (and refuses past twice that) without naming the
    file; each is decoded whole in memory, so say which one it is (once per file and process)."""
    pixels = img.size[0] * img.size[1]
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS and str(name) not in _named_huge:
        _named_huge.add(str(name))
        log.warning("%s is %dx%d (%.0f megapixels), decoded whole in memory; check that it is meant to be "
                    "this large", name, *img.size, pixels / 1e6,
                    extra={"every_process": True})  # in a launched run, only the process that read it says so


def _too_large(exc: Exception) -> str:
    """Pillow refuses images past its decompression-bomb limit (~179 MP): say so and how to lift it."""
    size = exc.args[0].split(" exceeds")[0] if exc.args else "over the limit"
    limit = f", over twice MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}" if Image.MAX_IMAGE_PIXELS else ""
    return (f"too large to open safely ({size}{limit}); if you trust the file, raise the limit: "
            f"{PIXEL_LIMIT_VARIABLE}=<pixels> for softvq's commands (0: no limit), PIL.Image.MAX_IMAGE_PIXELS "
            f"from Python")


def _grey_units(grey: np.ndarray, unit_interval: bool) -> float:
    """The factor that brings one-channel data of unknown depth to 8-bit units, read from its
    values as image viewers do: [0, 1] (floats only, ``unit_interval``; 1% past either end is an
    overshoot, clipped), 8-bit, 16-bit, else the data's own maximum (32-bit integers)."""
    if not grey.size:
        return 1.0
    lo, hi = float(grey.min()), float(grey.max())
    if unit_interval and lo >= -0.01 and hi <= 1.01:
        return 255.0
    if hi <= 255.5:
        return 1.0
    if hi <= 65535.5:
        return 1 / 257.0
    return 255.0 / hi


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """One-channel data already in 8-bit units -> an RGB image (rounded, clipped to 0..255)."""
    return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def _as_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        # 16-bit greyscale (PNG/TIFF): Pillow's convert("RGB") clips at 255; scale instead.
        return _grey_to_rgb(np.asarray(img, dtype=np.float64) / 257.0)
    if img.mode in ("I", "F"):
        # 32-bit integer or float greyscale (TIFF; a 16-bit PNG under Pillow < 11 is "I" too): its depth
        # is not in the mode, so read it from the values. convert("RGB") clips or truncates: a
        # [0, 1] float image came out black, an "I" image holding 0..255 black after a 16-bit /257.
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return _grey_to_rgb(grey * _grey_units(grey, unit_interval=img.mode == "F"))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # tRNS of P, L and RGB images too
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


CENTER_CROP = "ADM center_crop_arr"  # recorded wherever saved work depends on the crop (eval, pretokenize)


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion's ``center_crop_arr``, which DiT, LlamaGen and the SoftVQ
    release preprocess with): halve the image with a box filter while its shorter side is at least
    twice ``size``, resize it bicubically so that the shorter side is ``size``, then cut the middle
    ``size`` x ``size`` square. Cropping first and resizing once gives other pixels (up to 62 of 255
    levels on a 640 x 427 photo), so reference statistics would not match the published ones."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images on the [0, 1] scale (peak 1) in float32, clamped to the range as a saved image
    would be: the scale PSNR and the plots use."""
    return (images.float().clamp(-1, 1) + 1) / 2


def quantize_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 as a PNG writer would store them (clamp, scale, round)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> PIL RGB (clamped)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"to_pil takes one image (3, H, W), got {shape}"
                         + ("; for a batch: [to_pil(image) for image in batch]" if len(getattr(x, "shape", ())) == 4
                            else ""))
    arr = quantize_to_uint8(x.detach()).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def read_image(path: str | Path, size: int | None = None, *, resize: bool = False,
               multiple_of: int = 1) -> torch.Tensor:
    """Read one file as a (3, H, W) tensor in [-1, 1].

    With ``resize=True`` the image is centre-cropped and resized to ``size``. Otherwise the image
    must already be ``size`` x ``size`` (or, with ``size=None``, have sides divisible by
    ``multiple_of``); if it is not, the error says how to fix it.
    """
    img = load_rgb(path)
    if resize:
        if size is None:
            raise ValueError("resize=True needs a target size")
        img = center_crop_resize(img, size)
    elif size is not None and img.size != (size, size):
        raise ImageSizeError(
            f"{path}: image is {img.size[0]}x{img.size[1]} but the model takes {size}x{size}; "
            f"pass --resize to centre-crop and resize it"
        )
    elif img.size[0] % multiple_of or img.size[1] % multiple_of:
        raise ImageSizeError(
            f"{path}: image is {img.size[0]}x{img.size[1]}, not a multiple of the patch size "
            f"{multiple_of}; pass --resize to centre-crop and resize it"
        )
    return to_tensor(img)


def header_sizes(paths: list[Path]) -> list[tuple[int, int] | None]:
    """Each file's (width, height) from its header alone (no pixels decoded), or None where it does
    not open: read before any work, so that sizes needing ``--resize`` fail at once, all named.
    Files that do not open are left to the reading itself, which skips and names them."""
    sizes: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except Exception:  # any failure to open: the reader says why
            sizes.append(None)
    return sizes


def require_folder(folder: str | Path, fix: str | None = None) -> Path:
    """``folder`` as a Path if it is a folder; otherwise an error saying whether it is missing or a
    file, ended by ``fix`` (the setting or argument to change) where given."""
    folder = Path(folder).expanduser()
    hint = f" ({fix})" if fix else ""
    if folder.is_file():
        raise NotADirectoryError(f"{folder} is a file, not a folder of images{hint}")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist{hint}")
    return folder


def walk_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Every visible file under ``folder``, sorted: the one listing every command reads folders with.

    Hidden names (``.DS_Store``, macOS ``._photo.jpg``, ``.git/``, a ``.cache/`` folder) are left
    out wherever they sit, so no command counts them as images or classes. A broken or looping link
    to a file is listed: reading it fails, and the file is skipped and named like any unreadable one. Symlinked folders are
    followed (class folders linked into an ImageNet subset, say), each real folder once, so a
    symlink loop ends; a link to a folder the tree holds anyway is skipped, so the real folder
    keeps its name (as a class). A folder that cannot be listed is left out with a warning (the
    ``softvq`` logger; the CLI prints it) naming it.
    """
    def unlisted(exc: OSError) -> None:
        log.warning("%s: cannot list this folder (%s); its files are left out", exc.filename,
                    type(exc).__name__)

    root = os.path.realpath(folder)

    def walked_anyway(link: str) -> bool:
        """A link to a visible folder of the tree itself (or to its top): the walk reaches that
        folder under its own name, with no links followed, so no second listing is needed."""
        try:
            parts = Path(os.path.relpath(os.path.realpath(link), root)).parts
        except ValueError:  # another drive (Windows)
            return False
        return not parts or (parts[0] != os.pardir and not any(p.startswith(".") for p in parts))

    seen: set[str] = set()
    files: list[Path] = []
    for top, dirs, names in _visible_walk(folder, followlinks=True, onerror=unlisted):
        real = os.path.realpath(top)
        if real in seen:  # a loop, or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not (os.path.islink(os.path.join(top, d))
                                           and walked_anyway(os.path.join(top, d)))] if recursive else []
        files += [Path(top) / n for n in names if not n.startswith(".") and _file_or_dead_link(os.path.join(top, n))]
    return sorted(files)


def _file_or_dead_link(path: str) -> bool:
    """A file, or a link that leads nowhere (broken, or a loop): such a link stays in the listing, so
    that the reading skips it and names it like any unreadable file instead of it vanishing."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def _visible_walk(folder: Path, **options):
    """``os.walk`` top-down, hidden folders pruned, sub-folders in name order."""
    for top, dirs, names in os.walk(folder, **options):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield top, dirs, names


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` by suffix (see :func:`walk_files`), sorted for a deterministic order."""
    folder = require_folder(folder)
    files = walk_files(folder, recursive)
    name_unread_images(files)
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def name_unread_images(files: list[Path]) -> None:
    """Warn once about the photos among ``files`` in formats Pillow cannot read (HEIC, camera raw,
    ...: :data:`UNREAD_IMAGE_SUFFIXES`), which every command leaves out."""
    unread = [p for p in files if p.suffix.lower() in UNREAD_IMAGE_SUFFIXES]
    if unread:
        kinds = ", ".join(sorted({p.suffix.lower() for p in unread}))
        log.warning("left out %d image file(s) in formats Pillow does not read (%s), e.g. %s; convert them "
                    "to PNG or JPEG to use them", len(unread), kinds, unread[0])


def images_by_class(folder: str | Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """({first-level sub-folder: its images, recursively}, images directly in ``folder``), by
    :func:`list_images`, so every command that reads classes sees the same ones. A caller that
    reads the classes alone names the loose images it leaves out with :func:`name_loose_images`."""
    folder = require_folder(folder)
    classes: dict[str, list[Path]] = {}
    loose: list[Path] = []
    for path in list_images(folder):
        parts = path.relative_to(folder).parts
        (classes.setdefault(parts[0], []) if len(parts) > 1 else loose).append(path)
    return dict(sorted(classes.items())), loose


def name_loose_images(folder: str | Path, loose: list[Path]) -> None:
    """Warn that the images directly in ``folder``, beside its class sub-folders, are left out."""
    if loose:
        log.warning("left out %d image(s) directly in %s, beside its class sub-folders (e.g. %s); move them "
                    "into a class folder to use them", len(loose), folder, loose[0].name)


# Colour photographs that ship inside always-installable wheels (CC0 / public domain in
# scikit-image, CC-BY 2.0 in scikit-learn): the embedded default data set.
_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def bundled_photos() -> list[Path]:
    """Paths of the colour photos shipped inside scikit-image and scikit-learn."""
    import importlib.util

    paths: list[Path] = []
    for package, sub, names in (("skimage", "data", _SKIMAGE_PHOTOS),
                                ("sklearn", "datasets/images", _SKLEARN_PHOTOS)):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        root = Path(spec.origin).parent / sub
        paths += [root / n for n in names if (root / n).exists()]
    if not paths:
        raise FileNotFoundError("no bundled photos found: install scikit-image and scikit-learn")
    return paths
