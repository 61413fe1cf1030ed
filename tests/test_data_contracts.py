"""The data pipeline's smaller promises, one by one: how odd image files read, which files a folder
lists, what a run holds out, and how folder, shard and bundled samples are drawn and cropped."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softvq.data import images
from softvq.data.bundled import BundledCropsDataset, heldout_crops, split_bundled
from softvq.data.folder import ImageFolderDataset, holdout_order, scan_folder
from softvq.data.images import (ImageReadError, ImageSizeError, bundled_photos, list_images, load_rgb,
                                quantize_to_uint8, read_image, to_pil, to_tensor, why_unreadable)
from softvq.data.loader import build_data, hold_out_readable, load_eval_files
from softvq.data.sampler import StreamBatchSampler
from softvq.data.transforms import random_crop, random_flip, sample_rng
from softvq.data.workers import stack_readable, unstack_readable, worker_error
from softvq.training.config import DataConfig


# --- softvq.data.images ----------------------------------------------------------------------------


def test_why_unreadable_gives_the_reason_for_a_dead_link(tmp_path):
    """A broken symlink in a folder is listed and skipped as unreadable; the summary line's example
    must say why (it leads nowhere), not just repeat the name."""

    os.symlink(tmp_path / "gone.png", tmp_path / "dead.png")
    text = why_unreadable(tmp_path / "dead.png")
    assert text.startswith(str(tmp_path / "dead.png")) and "does not exist" in text
    # a file that does not exist at all (a tar member name, say) gives the name alone
    assert why_unreadable(tmp_path / "member.png") == str(tmp_path / "member.png")


def test_a_huge_image_is_named_exactly_when_pillow_itself_warns(tmp_path, monkeypatch, caplog):
    """The file is named in the band where Pillow emits its nameless DecompressionBombWarning
    (pixels strictly past MAX_IMAGE_PIXELS), not at exactly the limit."""

    monkeypatch.setattr(images, "_named_huge", set())
    Image.new("RGB", (8, 8)).save(tmp_path / "at.png")  # 64 pixels
    Image.new("RGB", (9, 8)).save(tmp_path / "past.png")  # 72 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    for name in ("at.png", "past.png"):
        with warnings.catch_warnings(record=True) as pillow:
            warnings.simplefilter("always")
            caplog.clear()
            with caplog.at_level("WARNING", logger="softvq"):
                images.load_rgb(tmp_path / name)
        pillow_warned = any(issubclass(w.category, Image.DecompressionBombWarning) for w in pillow)
        assert pillow_warned == (name == "past.png")
        assert (name in caplog.text) == pillow_warned, name


def test_a_32_bit_integer_image_of_0_and_1_is_read_as_8_bit_units(tmp_path):
    """Only float data is read as [0, 1]: integer 0/1 data is two dark 8-bit levels, not black and white."""

    grey = np.zeros((8, 8), np.int32)
    grey[:, 4:] = 1
    Image.fromarray(grey, mode="I").save(tmp_path / "i.tif")
    rgb = np.asarray(load_rgb(tmp_path / "i.tif"))
    assert rgb.shape == (8, 8, 3)
    np.testing.assert_array_equal(rgb[..., 0], grey.astype(np.uint8))


def test_quantize_to_uint8_rounds_to_the_nearest_level():
    """[-1, 1] -> uint8 rounds as a PNG writer does (not truncation)."""

    x = torch.tensor([-1.0, -0.999, 0.999, 1.0, 2.0, -3.0, 0.5])
    expected = np.clip(np.round((np.clip(x.numpy().astype(np.float64), -1, 1) + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(quantize_to_uint8(x).numpy(), expected)
    assert quantize_to_uint8(torch.tensor([0.999])).item() == 255


@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 8, 8)])
def test_to_pil_refuses_a_tensor_that_is_not_three_channels_first(shape):
    """to_pil takes one (3, H, W) image; other channel counts are a ValueError, not an RGBA/grey image."""

    with pytest.raises(ValueError, match=r"to_pil takes one image \(3, H, W\)"):
        to_pil(torch.zeros(shape))


def test_read_image_checks_both_sides(tmp_path):
    """Without resize, the image must be size x size (both sides), and with size=None both sides must
    be multiples of the patch."""

    Image.new("RGB", (32, 40)).save(tmp_path / "tall.png")
    with pytest.raises(ImageSizeError, match="32x40"):
        read_image(tmp_path / "tall.png", 32)
    Image.new("RGB", (64, 60)).save(tmp_path / "short.png")
    with pytest.raises(ImageSizeError, match="not a multiple of the patch size 8"):
        read_image(tmp_path / "short.png", multiple_of=8)
    assert read_image(tmp_path / "tall.png", multiple_of=8).shape == (3, 40, 32)


def test_a_link_to_a_hidden_folder_inside_the_tree_is_listed(tmp_path):
    """Hidden folders are never walked under their own name, so a visible link to one is the only
    way to reach its images: it must be followed, not taken for a folder the walk reaches anyway."""

    (tmp_path / ".store").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".store" / "a.png")
    os.symlink(tmp_path / ".store", tmp_path / "cats")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["cats/a.png"]


def test_a_folder_linked_twice_from_outside_is_listed_once(tmp_path):
    """Each real folder is read once: a second link to the same folder (or a link loop inside a
    linked folder) adds no duplicate images."""

    outside, data = tmp_path / "outside", tmp_path / "data"
    outside.mkdir()
    data.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "b.png")
    os.symlink(outside, data / "one")
    os.symlink(outside, data / "two")
    os.symlink(outside, outside / "again")  # a loop inside the linked folder
    listed = list_images(data)
    assert [p.relative_to(data).as_posix() for p in listed] == ["one/b.png"]
    assert len({os.path.realpath(p) for p in listed}) == len(listed)


def test_image_suffixes_are_matched_whatever_their_case(tmp_path):
    """Cameras write PHOTO.JPG: every command's listing matches suffixes case-insensitively."""

    Image.new("RGB", (8, 8)).save(tmp_path / "A.JPG", format="JPEG")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.Png", format="PNG")
    assert [p.name for p in list_images(tmp_path)] == ["A.JPG", "b.Png"]
    assert [p.name for p in scan_folder(tmp_path)[0]] == ["A.JPG", "b.Png"]


# --- softvq.data.loader: holding out files of one folder --------------------------------------------


def _folder(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (12, 10), (20 * i, 100, 200)).save(root / f"{i}.png")
    return sorted(root.glob("*.png"))


def _corrupt(path: Path) -> None:
    path.write_bytes(b"not an image")


def test_a_folder_of_one_image_is_refused_as_too_small(tmp_path):
    """One readable file cannot be both trained on and held out: the error says so (not that
    the file is unreadable)."""

    files = _folder(tmp_path, 1)
    with pytest.raises(ValueError, match="a run needs one to train on and one held out") as error:
        hold_out_readable(files, 4, 8, tmp_path)
    assert "could be read" not in str(error.value)


def test_at_most_half_the_folder_is_held_out(tmp_path):
    """Asking for more held-out images than half the folder holds out half, and trains on the rest."""

    files = _folder(tmp_path, 5)
    train, held = hold_out_readable(files, 10, 8, tmp_path)
    assert len(held.names) == 2 and held.images.shape == (2, 3, 8, 8)
    assert len(train) == 3 and {p.stem for p in train}.isdisjoint(held.names)


def test_an_unreadable_file_drawn_for_holdout_is_skipped_named_and_not_trained_on(tmp_path):
    """The next file is drawn in its place, and the unreadable one is left out of training too."""

    files = _folder(tmp_path, 6)
    order = holdout_order(files)
    _corrupt(order[0])
    train, held = hold_out_readable(files, 2, 8, tmp_path)
    assert held.skipped == [str(order[0])]
    assert held.names == [order[1].stem, order[2].stem]
    assert order[0] not in train and sorted(train) == sorted(order[3:])


def test_the_held_out_count_is_kept_when_a_later_file_is_readable(tmp_path):
    """The last held-out image goes back to training only when no other file can be read: here the
    file right after the held-out ones reads, so the full count stays held out."""

    files = _folder(tmp_path, 4)
    order = holdout_order(files)
    _corrupt(order[3])  # after the held-out pair: one readable file (order[2]) remains to train on
    train, held = hold_out_readable(files, 2, 8, tmp_path)
    assert held.names == [order[0].stem, order[1].stem]
    assert order[2] in train


def test_the_last_held_out_image_goes_back_when_nothing_else_reads(tmp_path):
    """A run needs both sets: with no other readable file, the last held-out image is trained on."""

    files = _folder(tmp_path, 4)
    order = holdout_order(files)
    _corrupt(order[2])
    _corrupt(order[3])
    train, held = hold_out_readable(files, 2, 8, tmp_path)
    assert held.names == [order[0].stem]
    assert order[1] in train
    readable = []
    for f in train:
        try:
            load_rgb(f)
            readable.append(f)
        except Exception:
            pass
    assert readable == [order[1]]


def test_a_folder_with_one_readable_file_is_an_error_naming_it(tmp_path):
    """Only one readable image among several: an ImageReadError saying a run needs two."""

    files = _folder(tmp_path, 3)
    order = holdout_order(files)
    for f in order[1:]:
        _corrupt(f)
    with pytest.raises(ImageReadError, match=r"only 1 of the 3 image files .* could be read"):
        hold_out_readable(files, 2, 8, tmp_path)


def test_load_eval_files_with_count_0_reads_every_readable_file(tmp_path):
    """count=0 means all: every readable file, the unreadable ones listed as skipped."""

    files = _folder(tmp_path, 3)
    _corrupt(files[1])
    held = load_eval_files(files, 8, 0)
    assert held.names == [files[0].stem, files[2].stem] and held.skipped == [str(files[1])]
    assert held.images.shape == (2, 3, 8, 8)
    assert load_eval_files(files, 8, 1).names == [files[0].stem]


def _noise_shards(root: Path, n: int) -> str:
    import io
    import tarfile

    for s in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(s).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
        with tarfile.open(root / f"s-{s}.tar", "w") as tar:
            info = tarfile.TarInfo(f"k{s}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return str(root / f"s-{{0..{n - 1}}}.tar")


def test_a_shards_run_resumed_without_saved_positions_does_not_replay_its_first_batches(tmp_path):
    """Without stream positions a resumed shards run starts a fresh order, not the stream the run
    began with (which would train on its first images again)."""

    cfg = DataConfig(source="shards", path=_noise_shards(tmp_path, 3), workers=0, num_eval_images=2)
    fresh, _ = build_data(cfg, image_size=16, micro_batch=2)
    resumed, _ = build_data(cfg, image_size=16, micro_batch=2, start_micro_step=5)
    again, _ = build_data(cfg, image_size=16, micro_batch=2, start_micro_step=5)
    first = next(iter(fresh.loader)).images
    after = next(iter(resumed.loader)).images
    assert torch.equal(after, next(iter(again.loader)).images)  # still deterministic
    assert not torch.equal(first, after)


# --- softvq.data.folder ------------------------------------------------------------------------------


def _flat_files(root: Path, colours) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(colours):
        Image.new("RGB", (20, 16), (c, c, c)).save(root / f"{i}.png")
        paths.append(root / f"{i}.png")
    return paths


def _level(x: torch.Tensor) -> int:
    return round((float(x.mean()) + 1) * 127.5)


def test_a_folder_sample_is_the_file_at_its_index(tmp_path):
    """Item i of the data set is file i (flat colours: crops and flips keep the colour)."""

    colours = [10, 60, 110, 160, 210]
    ds = ImageFolderDataset(_flat_files(tmp_path, colours), 8, seed=0)
    assert [_level(ds[(i, 7 * i)][0]) for i in range(len(colours))] == colours


def test_a_folder_sample_falls_through_to_the_only_readable_file(tmp_path):
    """Unreadable files are replaced by the next readable one, wrapping around: even when the
    only readable file is the last one tried."""

    files = _flat_files(tmp_path, [10, 60, 110])
    _corrupt(files[0])
    _corrupt(files[1])
    image, skipped = ImageFolderDataset(files, 8, seed=0)[(0, 0)]
    assert _level(image) == 110 and skipped == [str(files[0]), str(files[1])]


def _noise_file(path: Path, w: int, h: int) -> Path:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_a_folder_images_crop_changes_with_its_stream_position(tmp_path):
    """The augmentation is seeded by the sample's stream position, so the same file drawn at
    another position (another epoch) gets another crop; the same position gives the same crop."""

    files = [_noise_file(tmp_path / "a.png", 40, 30), _noise_file(tmp_path / "b.png", 40, 30)]
    ds = ImageFolderDataset(files, 16, seed=0, hflip=False)
    crops = [ds[(0, p)][0] for p in range(8)]
    assert torch.equal(crops[0], ds[(0, 0)][0])
    assert len({c.numpy().tobytes() for c in crops}) >= 5  # a few coincide: the crop space is small


def test_hflip_false_never_flips_and_min_crop_fraction_1_keeps_the_whole_image(tmp_path):
    """An image already at the training size, min_crop_fraction=1 and hflip=False: every sample is
    the image itself."""

    path = _noise_file(tmp_path / "a.png", 16, 16)
    ds = ImageFolderDataset([path], 16, seed=0, hflip=False, min_crop_fraction=1.0)
    expected = to_tensor(load_rgb(path))
    assert all(torch.equal(ds[(0, p)][0], expected) for p in range(12))


def test_min_crop_fraction_1_gives_the_image_or_its_mirror(tmp_path):
    """min_crop_fraction=1 crops nothing off an image already at the training size: with flips on,
    each sample is the image or its mirror, and both occur."""

    path = _noise_file(tmp_path / "a.png", 16, 16)
    ds = ImageFolderDataset([path], 16, seed=0, hflip=True, min_crop_fraction=1.0)
    image = to_tensor(load_rgb(path))
    mirror = image.flip(-1)
    kinds = []
    for p in range(16):
        x = ds[(0, p)][0]
        assert torch.equal(x, image) or torch.equal(x, mirror)
        kinds.append(torch.equal(x, image))
    assert 0 < sum(kinds) < 16


# --- softvq.data.workers -----------------------------------------------------------------------------


def test_a_workers_chained_error_is_rebuilt_with_the_last_message():
    """PyTorch's copy of a worker's error holds the whole traceback, chained causes first: the
    rebuilt error carries the message of the error the worker raised last, nothing else."""

    text = ("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            "  File \"a.py\", line 3, in read\nValueError: bad header\n\nDuring handling of the above exception, "
            "another exception occurred:\n\nTraceback (most recent call last):\n  File \"b.py\", line 9, in get\n"
            "ValueError: none of the 2 image files could be read\n")
    rebuilt = worker_error(ValueError(text))
    assert type(rebuilt) is ValueError and str(rebuilt) == "none of the 2 image files could be read"


# --- softvq.data.sampler -----------------------------------------------------------------------------


def test_an_empty_training_set_is_refused_when_the_sampler_is_made():
    """No items: a ValueError saying the training set is empty, not a ZeroDivisionError later."""

    with pytest.raises(ValueError, match="the training set is empty"):
        StreamBatchSampler(0, 2)


def test_shuffle_false_streams_the_items_in_order():
    """shuffle=False (evaluation): every epoch is 0..n-1 in order, positions count on."""

    it = iter(StreamBatchSampler(5, 2, shuffle=False, start=1))
    batches = [next(it) for _ in range(4)]
    assert batches == [[(1, 1), (2, 2)], [(3, 3), (4, 4)], [(0, 5), (1, 6)], [(2, 7), (3, 8)]]


# --- softvq.data.transforms --------------------------------------------------------------------------


def test_random_crop_of_an_image_already_at_size_with_min_fraction_1_is_the_image():
    """min_fraction=1 on a size x size image: nothing to resize or cut, the image comes back whole;
    on a wider image every horizontal offset, the last one included, can be drawn."""

    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for pos in range(5):
        np.testing.assert_array_equal(np.asarray(random_crop(Image.fromarray(arr), 16, sample_rng(0, pos), 1.0)), arr)
    cols = np.tile(np.arange(20, dtype=np.uint8)[None, :, None] * 10, (16, 1, 3))  # R = 10 * column
    offsets = {int(np.asarray(random_crop(Image.fromarray(cols), 16, sample_rng(0, p), 1.0))[0, 0, 0]) // 10
               for p in range(200)}
    assert offsets == set(range(5))


@pytest.mark.parametrize("p, lo, hi", [(0.0, 0, 0), (1.0, 200, 200), (0.2, 20, 60)])
def test_random_flip_flips_with_probability_p(p, lo, hi):
    """p is the probability of a flip: p=0 never, p=1 always, p=0.2 about a fifth of 200 draws."""

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8))
    mirrored = np.asarray(img)[:, ::-1]
    flips = sum(np.array_equal(np.asarray(random_flip(img, sample_rng(0, i), p)), mirrored) for i in range(200))
    assert lo <= flips <= hi


# --- softvq.data.bundled -----------------------------------------------------------------------------


def test_holding_out_every_bundled_photo_is_refused():
    """At least one bundled photo must stay for training."""

    with pytest.raises(ValueError, match="keep at least one for training"):
        split_bundled([p.stem for p in bundled_photos()])


def test_bundled_crops_cycle_through_every_photo(tmp_path):
    """Item i is a crop of photo i mod n: every training photo is used."""

    paths = _flat_files(tmp_path, [30, 130, 230])
    ds = BundledCropsDataset(paths, 8, seed=0, crops_per_photo=2)
    assert len(ds) == 6
    assert [_level(ds[(i, 11 * i)][0]) for i in range(6)] == [30, 130, 230, 30, 130, 230]


def test_bundled_crops_without_hflip_are_never_mirrored(tmp_path):
    """hflip=False: a whole-photo crop (scales (1, 1)) of a photo already at the size is the photo."""

    path = _noise_file(tmp_path / "a.png", 12, 12)
    ds = BundledCropsDataset([path], 12, seed=0, scales=(1.0, 1.0), hflip=False)
    expected = to_tensor(load_rgb(path))
    assert all(torch.equal(ds[(0, p)][0], expected) for p in range(12))


def test_each_photos_first_held_out_crop_is_its_centre_square(tmp_path):
    """heldout_crops: crop 0 of every photo is the whole photo's centre square, resized."""

    wide = _noise_file(tmp_path / "wide.png", 30, 20)
    images, names = heldout_crops([wide], 10, 3, (0.2, 0.5))
    assert names == ["wide-0", "wide-1", "wide-2"]
    centre = Image.open(wide).convert("RGB").crop((5, 0, 25, 20)).resize((10, 10), Image.Resampling.BICUBIC)
    assert torch.equal(images[0], to_tensor(centre))


def test_stack_readable_and_unstack_readable_round_trip_in_order():
    """The collate_fn and its inverse: images and failure strings come back one by one, in order."""

    items = [torch.full((3, 2, 2), 1.0), "a.png: not a readable image", torch.full((3, 2, 2), 2.0),
             torch.full((3, 2, 2), 3.0), "b.png: no such file"]
    images, order = stack_readable(items)
    assert images.shape == (3, 3, 2, 2) and order == [None, items[1], None, None, items[4]]
    back = list(unstack_readable(images, order))
    assert len(back) == len(items)
    for got, want in zip(back, items):
        assert (got == want) if isinstance(want, str) else torch.equal(got, want)
    assert stack_readable(["x", "y"]) == (None, ["x", "y"]) and list(unstack_readable(None, ["x", "y"])) == ["x", "y"]


@pytest.mark.parametrize("targets", [(0, 2, 1), (0, 1, 2)])
def test_a_picture_reachable_through_a_link_is_held_out_once_and_never_trained_on(tmp_path, targets):
    """Three pictures, each also reachable through a symlink, three wanted held out: no picture is
    held out twice, and training keeps a picture (the last held-out one goes back) that is none of
    the held-out ones under any name."""
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    for j, i in enumerate(targets):
        os.symlink(tmp_path / f"{i}.png", tmp_path / f"link-{j}.png")
    train, held = hold_out_readable(scan_folder(tmp_path)[0], 3, 8, tmp_path)
    held_pictures = [os.path.realpath(tmp_path / f"{name}.png") for name in held.names]
    assert len(set(held_pictures)) == len(held_pictures) == 2
    assert train and not {os.path.realpath(p) for p in train} & set(held_pictures)
