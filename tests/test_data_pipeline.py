"""Training data: deterministic process-independent batches, augmentations, folders with bad
files, the bundled photos split, and webdataset shards."""

from __future__ import annotations

import gc
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softvq.data.bundled import BundledCropsDataset, heldout_crops, split_bundled
from softvq.data.folder import ImageFolderDataset, scan_folder
from softvq.data.loader import build_data
from softvq.data.sampler import StreamBatchSampler
from softvq.data.shards import ShardStream, expand_shards
from softvq.data.transforms import random_crop, random_flip, random_scale_crop, sample_rng
from softvq.training.config import DataConfig


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_two_processes_split_exactly_the_one_process_batches():
    one = _take(StreamBatchSampler(10, 4, seed=3), 7)
    r0 = _take(StreamBatchSampler(10, 4, rank=0, world_size=2, seed=3), 7)
    r1 = _take(StreamBatchSampler(10, 4, rank=1, world_size=2, seed=3), 7)
    for full, a, b in zip(one, r0, r1):
        assert full == a + b
    # Crossing epoch boundaries every item appears once per epoch (positions 0..9, 10..19).
    positions = [p for batch in one for _, p in batch]
    assert positions == list(range(28))
    items = [i for batch in one for i, _ in batch]
    assert sorted(items[:10]) == list(range(10)) and sorted(items[10:20]) == list(range(10))
    assert items[:10] != items[10:20]  # a new permutation each epoch


def test_sampler_resumes_mid_stream():
    straight = _take(StreamBatchSampler(9, 3, seed=1), 6)
    resumed = _take(StreamBatchSampler(9, 3, seed=1, start=3 * 3), 3)
    assert resumed == straight[3:]


def test_sampler_rejects_uneven_split():
    with pytest.raises(ValueError, match="not divisible"):
        StreamBatchSampler(10, 5, world_size=2)


def test_augmentations_depend_only_on_seed_and_position():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    a = np.asarray(random_crop(img, 32, sample_rng(5, 17)))
    b = np.asarray(random_crop(img, 32, sample_rng(5, 17)))
    c = np.asarray(random_crop(img, 32, sample_rng(5, 18)))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    crop = random_scale_crop(img, 16, sample_rng(0, 0), (0.5, 0.5))
    assert crop.size == (16, 16)
    flips = [np.array_equal(np.asarray(random_flip(img, sample_rng(0, i))), np.asarray(img)[:, ::-1])
             for i in range(200)]
    assert 60 < sum(flips) < 140  # p = 0.5


def test_random_crop_covers_at_least_min_fraction():
    # A horizontal ramp: the crop's value range tells how much of the width it spans.
    ramp = np.tile(np.linspace(0, 255, 200).astype(np.uint8)[None, :, None], (100, 1, 3))
    img = Image.fromarray(ramp)
    for pos in range(20):
        crop = np.asarray(random_crop(img, 50, sample_rng(0, pos), min_fraction=0.8)).astype(float)
        # the shorter side (100) is resized to 50 / f with f in [0.8, 1], so the 50 px window spans
        # 50 * f / 50 * 100 = f * 100 source px of 200, i.e. between 40 % and 50 % of the ramp.
        span = (crop[:, -1, 0].mean() - crop[:, 0, 0].mean()) / 255
        assert 0.37 < span < 0.52


def _write_folder(root):
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / "sub" / "grey.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "sub" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_skips_and_reports_corrupt_files(tmp_path):
    images, others = scan_folder(_write_folder(tmp_path / "data"))
    assert len(images) == 7 and [p.name for p in others] == ["notes.txt"]
    ds = ImageFolderDataset(images, 32, seed=0)
    skipped = set()
    for index in range(len(ds)):
        x, bad = ds[(index, index)]
        assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
        skipped.update(bad)
    assert sorted(p.split("/")[-1] for p in skipped) == ["broken.jpg", "empty.png"]
    # A replaced sample is deterministic: the same key gives the same tensor.
    broken = next(i for i, p in enumerate(images) if p.name == "broken.jpg")
    assert torch.equal(ds[(broken, 5)][0], ds[(broken, 5)][0])


def test_a_missing_folder_names_the_setting_to_change(tmp_path):
    """The paper configs name a relative held-out folder; its absence must not blame data.path."""
    train = _write_folder(tmp_path / "train")
    with pytest.raises(FileNotFoundError, match=r"set data\.path"):
        build_data(DataConfig(source="folder", path=str(tmp_path / "nowhere")), image_size=32, micro_batch=2)
    with pytest.raises(FileNotFoundError, match=r"set data\.eval_path .* or data\.eval_path=null") as error:
        build_data(DataConfig(source="folder", path=str(train), eval_path=str(tmp_path / "val")),
                   image_size=32, micro_batch=2)
    assert "set data.path" not in str(error.value) and "hold out files of data.path" in str(error.value)
    # the bundled photos have no data.path: null holds out some of them instead, and the error says so
    with pytest.raises(FileNotFoundError, match=r"data\.eval_path=null to hold out the bundled photos of data\.holdout"):
        build_data(DataConfig(source="bundled", eval_path=str(tmp_path / "val")), image_size=32, micro_batch=2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no image")
    with pytest.raises(FileNotFoundError, match=r"notes holds no image files .*1 other file.*set data\.path"):
        build_data(DataConfig(source="folder", path=str(tmp_path / "notes")), image_size=32, micro_batch=2)
    with pytest.raises(NotADirectoryError, match=r"a\.txt is a file, not a folder of images \(set data\.path"):
        build_data(DataConfig(source="folder", path=str(tmp_path / "notes" / "a.txt")), image_size=32, micro_batch=2)
    (tmp_path / "notes" / "train-000.tar").write_bytes(b"")  # webdataset shards given as a folder of images
    with pytest.raises(FileNotFoundError, match=r"set data\.path to a folder of images; its 1 \.tar file\(s\) are "
                                                r"read as webdataset shards with data\.source=shards"):
        build_data(DataConfig(source="folder", path=str(tmp_path / "notes")), image_size=32, micro_batch=2)
    (tmp_path / "nested" / "part1").mkdir(parents=True)  # a shards folder reads its own .tar files, not deeper ones
    (tmp_path / "nested" / "part1" / "train-000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        build_data(DataConfig(source="folder", path=str(tmp_path / "nested")), image_size=32, micro_batch=2)
    assert "data.source=shards" not in str(error.value)


def test_a_held_out_folder_that_is_the_training_folder_is_warned_of(tmp_path, caplog):
    train = _write_folder(tmp_path / "train")
    with caplog.at_level("WARNING", logger="softvq.data.loader"):
        build_data(DataConfig(source="folder", path=str(train), eval_path=str(tmp_path / "." / "train"),
                              num_eval_images=2), image_size=32, micro_batch=2)
    assert "data.eval_path is data.path" in caplog.text and "the held-out images are trained on too" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="softvq.data.loader"):  # a folder inside it is trained on as well
        build_data(DataConfig(source="folder", path=str(tmp_path), eval_path=str(train), num_eval_images=2),
                   image_size=32, micro_batch=2)
    assert f"data.eval_path lies inside data.path ({tmp_path})" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="softvq.data.loader"):  # a folder beside it: nothing to say
        build_data(DataConfig(source="folder", path=str(train), eval_path=str(_write_folder(tmp_path / "val")),
                              num_eval_images=2), image_size=32, micro_batch=2)
    assert "data.eval_path" not in caplog.text


def test_folder_holdout_is_disjoint_seed_independent_and_not_trained_on_through_a_symlink(tmp_path):
    from softvq.data.loader import hold_out_readable

    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        os.symlink(tmp_path / f"{i}.png", tmp_path / f"link-{i}.png")  # every image under a second name
    files = scan_folder(tmp_path)[0]
    train, held = hold_out_readable(files, 3, 8, tmp_path)
    assert len(held.names) == 3 and hold_out_readable(files, 3, 8, tmp_path)[0] == train
    real = {os.path.realpath(f) for f in train}
    held_files = [f for f in files if f not in train]
    assert len(train) == 6 and not real & {os.path.realpath(f) for f in held_files}  # was: the twins trained on


def test_bundled_split_and_heldout_crops():
    train, held = split_bundled(["chelsea", "china"])
    assert {p.stem for p in held} == {"chelsea", "china"} and not {p.stem for p in train} & {"chelsea", "china"}
    images, names = heldout_crops(held, 32, 6, (0.2, 1.0))
    again, _ = heldout_crops(held, 32, 6, (0.2, 1.0))
    assert images.shape == (6, 3, 32, 32) and torch.equal(images, again)
    assert names[:4] == ["chelsea-0", "china-0", "chelsea-1", "china-1"]  # interleaved
    ds = BundledCropsDataset(train[:2], 32, seed=0, crops_per_photo=4)
    assert len(ds) == 8
    a, b = ds[(0, 0)][0], ds[(0, 1)][0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown bundled photos"):
        split_bundled(["no-such-photo"])


def _png_bytes(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shards_stream_every_image_once_per_epoch_and_report_bad_ones(tmp_path):
    _write_shard(tmp_path / "s-0.tar", [("a.png", _png_bytes(0)), ("a.cls", b"1"), ("b.png", b"garbage")])
    _write_shard(tmp_path / "s-1.tar", [("c.png", _png_bytes(1)), ("d.jpg", _png_bytes(2))])
    stream = ShardStream(str(tmp_path / "s-{0..1}.tar"), 32, seed=0)
    it = iter(stream)
    first_epoch = [next(it) for _ in range(3)]
    assert all(x.shape == (3, 32, 32) for x, _, _ in first_epoch)
    skipped = [s for _, bad, _ in first_epoch for s in bad]
    assert len(skipped) == 1 and skipped[0].endswith(":b")
    # Two processes: disjoint shards.
    r0 = ShardStream(str(tmp_path / "s-{0..1}.tar"), 32, seed=0, rank=0, world_size=2)
    r1 = ShardStream(str(tmp_path / "s-{0..1}.tar"), 32, seed=0, rank=1, world_size=2)
    assert set(r0._my_shards(0, 0, 1)).isdisjoint(r1._my_shards(0, 0, 1))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        ShardStream(str(tmp_path / "missing-{0..1}.tar"), 32)


def test_training_and_eval_read_the_same_shard_patterns(tmp_path, monkeypatch):
    from softvq.evaluation.sources import local_shards

    for i in range(3):
        _write_shard(tmp_path / f"s-{i}.tar", [("a.png", _png_bytes(i))])
    monkeypatch.setenv("HOME", str(tmp_path))
    every = [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    # a comma inside braces is an alternative, not a list separator (it used to split the pattern in two)
    assert expand_shards(f"{tmp_path}/s-{{0,1}}.tar, {tmp_path}/s-2.tar") == every
    assert expand_shards(f"{tmp_path}/*.tar") == every  # globs: eval took them, training did not
    assert expand_shards(str(tmp_path)) == every  # a folder of shards, as eval takes it
    assert expand_shards("~/s-{2..0}.tar,~/s-2.tar") == every[::-1]  # the order given, each once, ~ expanded
    assert expand_shards("https://host/t-{0..1}.tar") == ["https://host/t-0.tar", "https://host/t-1.tar"]
    _write_shard(tmp_path / "my,set.tar", [("a.png", _png_bytes(9))])  # an existing name is not a list
    assert expand_shards(str(tmp_path / "my,set.tar")) == [str(tmp_path / "my,set.tar")]
    assert local_shards(f"{tmp_path}/s-{{2..0}}.tar") == [Path(p) for p in every]  # eval's protocol order
    with pytest.raises(FileNotFoundError, match=r"no shards match '.*/q\*\.tar'"):
        expand_shards(f"{tmp_path}/q*.tar")
    with pytest.raises(FileNotFoundError, match="reads local shards only, not https://host/t.tar"):
        local_shards("https://host/t.tar")


def test_metadata_only_samples_are_not_skipped_images_and_imageless_shards_stop(tmp_path):
    # a sample of metadata alone is not an unreadable image (eval leaves it out the same way)
    _write_shard(tmp_path / "m-0.tar", [("a.png", _png_bytes(0)), ("meta.json", b"{}"), ("b.png", _png_bytes(1))])
    stream = iter(ShardStream(str(tmp_path / "m-0.tar"), 32, seed=0))
    assert [bad for _, bad, _ in (next(stream) for _ in range(4))] == [[], [], [], []]
    # shards without one readable image used to loop for ever
    _write_shard(tmp_path / "x-0.tar", [("a.json", b"{}"), ("b.png", b"garbage")])
    with pytest.raises(ValueError, match=r"no readable image in the shards .*x-0.tar \(1 unreadable samples\)"):
        next(iter(ShardStream(str(tmp_path / "x-0.tar"), 32, seed=0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_stream_resumes_exactly_from_saved_positions(tmp_path, workers):
    """Stop after 5 batches (mid-epoch, with a corrupt sample), resume from the positions the
    trainer would have saved: the next batches equal the uninterrupted stream's, pixel for pixel."""
    from torch.utils.data import DataLoader

    from softvq.data.loader import collate

    for s in range(4):
        members = [(f"s{s}i{i}.png", _png_bytes(10 * s + i)) for i in range(5)]
        if s == 1:
            members.insert(2, ("bad.png", b"garbage"))
        _write_shard(tmp_path / f"s-{s}.tar", members)
    pattern = str(tmp_path / "s-{0..3}.tar")

    def batches(start=0, positions=None, n=12):
        stream = ShardStream(pattern, 16, seed=3, start_batch=start, positions=positions)
        loader = DataLoader(stream, batch_size=3, collate_fn=collate, num_workers=workers)
        return [b for b, _ in zip(loader, range(n))]

    straight = batches()
    stop = 5
    positions = {}
    for batch in straight[:stop]:  # what the trainer records as it consumes batches
        logical, epoch, index = batch.stream_position
        positions[logical] = (epoch, index)
    resumed = batches(stop, positions, n=len(straight) - stop)
    assert len(resumed) == len(straight) - stop
    for a, b in zip(straight[stop:], resumed):
        assert torch.equal(a.images, b.images)
    # without positions a resume would start elsewhere: the test can tell the difference
    assert not torch.equal(batches(stop, None, n=1)[0].images, straight[stop].images)


class _WhoServes(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor([os.getpid(), i])


def test_loader_workers_outlive_the_stop_signals_the_main_process_handles():
    """A scheduler's SIGTERM reaches the workers too; they must leave stopping to the main process."""
    from softvq.data.workers import ignore_stop_signals

    loader = torch.utils.data.DataLoader(_WhoServes(), batch_size=None, num_workers=2,
                                         worker_init_fn=ignore_stop_signals)
    seen, signalled = [], set()
    for pid, i in loader:
        seen.append(int(i))
        if int(pid) != os.getpid() and int(pid) not in signalled:
            signalled.add(int(pid))
            os.kill(int(pid), signal.SIGTERM)
            os.kill(int(pid), signal.SIGINT)
    assert seen == list(range(40)) and len(signalled) == 2  # both workers signalled, no item lost



def test_a_data_worker_error_ends_train_with_its_one_line_instead_of_hanging(tmp_path):
    """Every training file unreadable, read in 2 workers: the worker's error used to print its
    whole traceback, then the process waited forever at exit for workers that ignore SIGTERM."""
    from launching import cpu_process_env

    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    for name in ("a.png", "b.png"):
        (bad / name).write_bytes(b"broken")
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(good / f"{i}.png")
    command = [sys.executable, "-m", "softvq.cli.main", "train", "demo", "schedule.steps=2",
               "schedule.warmup_steps=1", "data.source=folder", f"data.path={bad}", f"data.eval_path={good}",
               "data.workers=2", "run.progress=false", "-o", str(tmp_path / "run")]
    # a session of its own, so that a hung run and its workers (deaf to SIGTERM) can all be killed
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cpu_process_env(), start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)  # about 5 s of work on 2 cores
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("softvq train did not exit after a DataLoader worker's error")
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1] == (f"softvq train: error: none of the 2 image files could be read "
                                            f"(e.g. {bad / 'a.png'})")
    assert "Traceback" not in err and "DataLoader worker" not in err
    # the workers are gone with their process, not orphaned (their session holds no one else)
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def _broken(self, i):
    raise ValueError(f"image {i} is broken")


def _workers_left_after(read):
    """(the processes ``read()`` started and left alive after raising, while its error is still
    held as a caller holds it; the error's message)."""
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError) as caught:
        read()
    left = [p for p in multiprocessing.active_children() if p not in before]
    message = str(caught.value)
    del caught
    gc.collect()  # the iterator the error held goes, but as garbage it cannot stop its workers:
    for process in left:  # kill what it left, or pytest's exit waits for them forever
        process.kill()
        process.join()
    return left, message


def test_an_error_in_an_eval_worker_stops_the_workers_and_keeps_its_message(tmp_path, monkeypatch):
    from softvq.evaluation.sources import EvalImages, ImageRef, readable_batches

    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(EvalImages, "__getitem__", _broken)  # the forked workers inherit it
    refs = [ImageRef(p) for p in sorted(tmp_path.glob("*.png"))]
    left, message = _workers_left_after(lambda: list(readable_batches(refs, 32, 2, 2, [])))
    assert left == [] and message == "image 0 is broken"


def test_an_error_in_a_pretokenize_worker_stops_the_workers_and_keeps_its_message(tmp_path, monkeypatch):
    from softvq.generation.latent_sources import _DecodedImages, folder_source

    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(_DecodedImages, "__getitem__", _broken)
    left, message = _workers_left_after(lambda: list(folder_source(tmp_path, 32, workers=2).samples))
    assert left == [] and message == "image 0 is broken"


def test_worker_batches_stops_the_workers_of_a_loop_left_early():
    from softvq.data.workers import ignore_stop_signals, worker_batches

    loader = torch.utils.data.DataLoader(_WhoServes(), batch_size=None, num_workers=2,
                                         worker_init_fn=ignore_stop_signals)
    with worker_batches(loader) as batches:
        next(batches)
        workers = list(batches._workers)
    assert len(workers) == 2 and not any(w.is_alive() for w in workers)


def test_an_image_past_pillows_size_limit_is_an_unreadable_file_not_a_crash(tmp_path, monkeypatch):
    from PIL import Image

    from softvq.data.images import ImageReadError, load_rgb

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: past twice the limit, a "bomb"
    with pytest.raises(ImageReadError, match=r"big.png: too large to open safely .*MAX_IMAGE_PIXELS"):
        load_rgb(tmp_path / "big.png")  # was a DecompressionBombError traceback in every command


def test_every_command_lists_the_same_images_and_classes(tmp_path):
    """Hidden files and folders are never images or classes, a symlinked class folder is followed,
    a folder reached twice (or a symlink loop) is read once: for training, encoding, eval and plots."""
    import os

    from PIL import Image

    from softvq.data.folder import scan_folder
    from softvq.data.images import images_by_class, list_images

    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / cls / "a.png")
    (tmp_path / "data" / ".hidden_dir").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / ".hidden_dir" / "x.png")
    (tmp_path / "data" / "cats" / "._a.png").write_bytes(b"macOS resource fork")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "b.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")  # a class folder linked in
    os.symlink(tmp_path / "data" / "cats", tmp_path / "data" / "cats" / "loop")  # a loop
    data = tmp_path / "data"
    names = [p.relative_to(data).as_posix() for p in list_images(data)]
    assert names == ["cats/a.png", "dogs/a.png", "linked/b.png"]
    assert [p.relative_to(data).as_posix() for p in scan_folder(data)[0]] == names
    assert list(images_by_class(data)[0]) == ["cats", "dogs", "linked"]
    # a link to a class folder the tree holds anyway is skipped, so the class keeps its own name
    os.symlink(data / "dogs", data / "aaa_alias")  # walked first by name order
    assert list(images_by_class(data)[0]) == ["cats", "dogs", "linked"]  # was ["aaa_alias", "cats", "linked"]


def test_a_folder_that_cannot_be_listed_is_named_not_silently_dropped(tmp_path, monkeypatch, caplog):
    import os

    from softvq.data.images import list_images

    for cls in ("a", "locked"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "x.png")
    scandir = os.scandir

    def refusing(path="."):  # what a folder without read permission does (root ignores chmod 000)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with caplog.at_level("WARNING", logger="softvq"):
        assert [p.name for p in list_images(tmp_path)] == ["x.png"]
    assert f"{tmp_path / 'locked'}: cannot list this folder (PermissionError)" in caplog.text


def test_center_crop_resize_is_adms_box_halvings_then_bicubic_then_the_middle_square():
    from softvq.data.images import center_crop_resize

    rows, cols = np.mgrid[0:60, 0:100]
    wide = np.stack([cols, rows, (cols * 7 + rows * 3) % 256], -1).astype(np.uint8)  # R = column index
    out = np.asarray(center_crop_resize(Image.fromarray(wide), 60))
    np.testing.assert_array_equal(out, wide[:, 20:80])  # (100 - 60) / 2 columns off each side
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 60 wide, 100 high: rows 20..79
    np.testing.assert_array_equal(np.asarray(center_crop_resize(Image.fromarray(tall), 60)), tall[20:80])
    odd = np.concatenate([wide, wide[:, :1]], 1)  # 101 wide: the extra column goes to the right margin
    np.testing.assert_array_equal(np.asarray(center_crop_resize(Image.fromarray(odd), 60)), odd[:, 20:80])
    # a smaller size, as guided-diffusion's center_crop_arr makes it: 60 >= 2 x 24, so one box halving to
    # 50 x 30, a bicubic resize to 40 x 24, then columns 8..31 (the crop-then-resize it replaced differs)
    halved = Image.fromarray(wide).resize((50, 30), Image.BOX)
    expected = np.asarray(halved.resize((40, 24), Image.BICUBIC))[:, 8:32]
    small = np.asarray(center_crop_resize(Image.fromarray(wide), 24))
    assert small.shape == (24, 24, 3)
    np.testing.assert_array_equal(small, expected)
    cropped_first = np.asarray(Image.fromarray(np.ascontiguousarray(wide[:, 20:80])).resize((24, 24), Image.BICUBIC))
    assert np.abs(small.astype(int) - cropped_first.astype(int)).max() > 0
    # a short side of exactly twice the size is halved too (ADM's `while min(size) >= 2 * image_size`),
    # leaving 50 x 30, already the size: only the middle columns are cut
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    expected = np.asarray(noisy.resize((50, 30), Image.BOX))[:, 10:40]
    np.testing.assert_array_equal(np.asarray(center_crop_resize(noisy, 30)), expected)
    # a photo-sized 640 x 427 to 64: halved to 320 x 213, then 160 x 106 (106 < 128 stops it), bicubic to 97 x 64
    photo = np.random.default_rng(0).integers(0, 256, (427, 640, 3), dtype=np.uint8)
    steps = Image.fromarray(photo).resize((320, 213), Image.BOX).resize((160, 106), Image.BOX)
    expected = np.asarray(steps.resize((97, 64), Image.BICUBIC))[:, 16:80]
    np.testing.assert_array_equal(np.asarray(center_crop_resize(Image.fromarray(photo), 64)), expected)


def test_a_workers_error_is_rebuilt_with_its_own_message_except_where_str_is_not_the_message():
    from softvq.data.workers import worker_error

    def as_torch_gives_it(kind, line):
        return kind(f"Caught {kind.__name__} in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                    f"last):\n  File \"x.py\", line 1, in f\n{line}\n")

    rebuilt = worker_error(as_torch_gives_it(ValueError, "ValueError: none of the 2 image files could be read"))
    assert type(rebuilt) is ValueError and str(rebuilt) == "none of the 2 image files could be read"
    assert "x.py" in rebuilt.__notes__[0]
    # KeyError's str() quotes its argument and OSError's carries errno and filename: passed through
    assert worker_error(as_torch_gives_it(KeyError, "KeyError: 'missing'")) is None
    assert worker_error(as_torch_gives_it(FileNotFoundError, "FileNotFoundError: [Errno 2] x")) is None


def test_shard_order_is_shuffled_anew_every_epoch(tmp_path):
    """The module's promise: shards are re-shuffled every epoch from the run seed. Each shard holds
    one flat-coloured image, so an image names its shard."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    from softvq.data.shards import ShardStream

    n = 6
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((36, 36, 3), 30 * i, dtype=np.uint8)).save(buf, "PNG")
        with tarfile.open(tmp_path / f"s-{i}.tar", "w") as tar:
            info = tarfile.TarInfo("k.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    it = iter(ShardStream(str(tmp_path / f"s-{{0..{n - 1}}}.tar"), 32, seed=0, hflip=False))
    orders: dict[int, list[int]] = {}
    for _ in range(4 * n):
        image, _, (_, epoch, _) = next(it)
        value = (float(image.mean()) + 1) * 127.5
        orders.setdefault(epoch, []).append(round(value / 30))
    assert all(sorted(o) == list(range(n)) for o in orders.values())  # every shard once per epoch
    assert len({tuple(o) for o in orders.values()}) > 1, orders  # 4 epochs, 720 orders: not all the same
