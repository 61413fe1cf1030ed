"""``softvq reconstruct`` on a bundled photo: the PNGs it writes and the PSNR it prints."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from interrupting import interrupt_at_call

from softvq import Tokenizer
from softvq.cli.main import main
from softvq.data.images import bundled_photos, center_crop_resize, load_rgb, to_pil, to_tensor


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def test_reconstruct_bundled_photo_writes_pngs_and_prints_psnr(tmp_path, capsys):
    photo = bundled_photos()[0]
    code = main(["reconstruct", str(photo), "--resize", "--out", str(tmp_path), "--seed", "3"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "RANDOM weights" in err  # a preset's random init is announced

    recon = np.asarray(Image.open(tmp_path / f"{photo.stem}_recon.png"))
    pair = np.asarray(Image.open(tmp_path / f"{photo.stem}_side_by_side.png"))
    original = np.asarray(center_crop_resize(load_rgb(photo), 64))
    gutter = 4
    assert recon.shape == (64, 64, 3) and pair.shape[1:] == (128 + gutter, 3) and pair.shape[0] > 64
    assert np.array_equal(pair[:64, :64], original) and np.array_equal(pair[:64, 64 + gutter:], recon)
    assert (pair[:64, 64:64 + gutter] == 255).all() and pair[64:].min() < 100  # a gutter; names and PSNR under
    score = float(re.search(r"PSNR ([\d.]+) dB", out).group(1))
    table = (tmp_path / "psnr.csv").read_text().splitlines()
    assert table[0] == "image,reconstruction,psnr_db" and table[1].startswith(f"{photo},{photo.stem}_recon.png,")
    assert float(table[1].rsplit(",", 1)[1]) == pytest.approx(score, abs=0.006) and table[2].startswith("mean,,")

    # The written reconstruction is the model's own (seeded preset), not some other image.
    torch.manual_seed(3)
    model = Tokenizer.from_preset("softvq-tiny").eval()
    expected = np.asarray(to_pil(model.reconstruct(to_tensor(Image.fromarray(original))[None])[0]))
    assert np.array_equal(recon, expected)

    printed = re.search(rf"{photo.name}: PSNR ([\d.]+) dB", out)
    assert printed, out
    assert float(printed.group(1)) == round(_psnr(original, recon), 2)
    mean = re.search(r"mean PSNR over 1 image\(s\): ([\d.]+) dB", out)
    assert mean and float(mean.group(1)) == float(printed.group(1))


def test_mean_psnr_over_several_images(tmp_path, capsys):
    photos = bundled_photos()[:2]
    assert main(["reconstruct", *map(str, photos), "--resize", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    scores = [float(s) for s in re.findall(r": PSNR ([\d.]+) dB", out)]
    mean = float(re.search(r"mean PSNR over 2 image\(s\): ([\d.]+) dB", out).group(1))
    assert len(scores) == 2 and abs(mean - sum(scores) / 2) <= 0.01


def test_a_folder_is_read_batch_by_batch_not_all_before_the_first_batch(tmp_path, capsys, monkeypatch):
    import softvq.cli.reconstruct as command
    from softvq import Tokenizer

    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in bundled_photos()[:3]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    events = []
    reading = command.read_image
    monkeypatch.setattr(command, "read_image", lambda *a, **k: events.append("read") or reading(*a, **k))
    forward = Tokenizer.forward
    monkeypatch.setattr(Tokenizer, "forward", lambda self, x: events.append("model") or forward(self, x))
    assert main(["reconstruct", str(folder), "--resize", "--batch-size", "2", "--out", str(tmp_path / "out")]) == 0
    assert events == ["read", "read", "model", "read", "model"]  # a 50,000-image folder used to be held whole


def test_a_folder_stands_for_its_images_and_its_unreadable_files_are_skipped(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in bundled_photos()[:2]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    assert main(["reconstruct", str(folder), "--resize", "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "mean PSNR over 2 image(s)" in out and "skipped 1 unreadable image file(s):" in err
    assert "broken.png: not a readable image (not a format Pillow reads" in err  # each named, with its reason
    assert sorted(p.name for p in (tmp_path / "out").glob("*_recon.png")) == sorted(
        f"{p.stem}_recon.png" for p in bundled_photos()[:2])
    # named on the command line, the same file is an error before any compute
    assert main(["reconstruct", str(folder / "broken.png"), "--resize", "--out", str(tmp_path / "o2")]) == 2
    assert "broken.png: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    # one whose header reads (its size is checked first) but whose pixels do not: found while reconstructing
    whole = bundled_photos()[0].read_bytes()
    (folder / "cut.png").write_bytes(whole[:len(whole) // 2])
    assert main(["reconstruct", str(folder / "cut.png"), "--resize", "--out", str(tmp_path / "o4")]) == 2
    assert "cut.png: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()  # was left holding only reconstruct's records of nothing
    (tmp_path / "o5").mkdir()  # a folder that was there stays, without the records
    assert main(["reconstruct", str(folder / "cut.png"), "--resize", "--out", str(tmp_path / "o5")]) == 2
    assert list((tmp_path / "o5").iterdir()) == []
    (folder / "cut.png").unlink()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no pictures here")
    assert main(["reconstruct", str(tmp_path / "notes"), "--out", str(tmp_path / "o3")]) == 2
    assert "holds no image files" in capsys.readouterr().err  # data.folder.scan_folder's error, as for train


def test_outputs_under_a_folder_given_are_not_reconstructed_again(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = bundled_photos()[0]
    (folder / photo.name).write_bytes(photo.read_bytes())
    command = ["reconstruct", str(folder), "--resize", "--out", str(folder / "recon")]
    for run in range(2):  # the second run finds the first one's two PNGs under the folder
        assert main(command) == 0
        out, err = capsys.readouterr()
        assert "mean PSNR over 1 image(s)" in out
        assert ("left out 2 earlier output(s) of reconstruct (named in their folder" in err) == (run == 1)
    assert sorted(p.name for p in (folder / "recon").iterdir()) == [".reconstruct-outputs", f"{photo.stem}_recon.png",
                                                                    f"{photo.stem}_side_by_side.png", "psnr.csv"]
    # originals in --out itself are still read, their outputs beside them are not
    for run in range(2):
        assert main(["reconstruct", str(folder), "--resize", "--out", str(folder)]) == 0
        assert "mean PSNR over 1 image(s)" in capsys.readouterr().out
    # only outputs given: a one-line error, not "none could be read"
    assert main(["reconstruct", str(folder / "recon"), "--resize", "--out", str(folder / "recon")]) == 2
    assert "the folders given hold only earlier outputs of reconstruct" in capsys.readouterr().err


def test_a_photo_named_like_an_output_is_an_input_and_never_replaced(tmp_path, capsys):
    """Was: any *_recon.png under --out counted as an earlier output, so with --out the folder given,
    the user's own a_recon.png was left out of the inputs and overwritten by a.png's reconstruction."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = bundled_photos()[0]
    (folder / "a.png").write_bytes(photo.read_bytes())
    (folder / "a_recon.png").write_bytes(photo.read_bytes())  # the user's own file
    mine = (folder / "a_recon.png").read_bytes()
    assert main(["reconstruct", str(folder), "--resize", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--out {folder} holds a_recon.png, which reconstruct did not write and would replace" in err
    assert (folder / "a_recon.png").read_bytes() == mine and not (folder / "a_side_by_side.png").exists()
    assert main(["reconstruct", str(folder), "--resize", "--out", str(tmp_path / "out")]) == 0
    assert "mean PSNR over 2 image(s)" in capsys.readouterr().out  # a_recon.png is an input like any other
    assert main(["reconstruct", str(folder), "--resize", "--out", str(tmp_path / "out")]) == 0  # its own: replaced
    assert "mean PSNR over 2 image(s)" in capsys.readouterr().out


def test_help_names_where_the_reconstructions_go(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["reconstruct", "--help"])
    assert stop.value.code == 0
    assert "output folder (default: reconstructions)" in " ".join(capsys.readouterr().out.split())


def test_an_interrupted_reconstruct_keeps_the_psnrs_of_the_images_it_made(tmp_path, capsys, monkeypatch):
    """Was: Ctrl-C after a thousand images left no psnr.csv at all."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in bundled_photos()[:3]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    interrupt_at_call(monkeypatch, Tokenizer, "forward", 2)  # at the second batch
    assert main(["reconstruct", str(folder), "--resize", "--batch-size", "1", "--out", str(tmp_path / "o")]) == 130
    assert f"the PSNRs of the 1 image(s) reconstructed so far are in {tmp_path / 'o' / 'psnr.csv'}" in \
        capsys.readouterr().err
    rows = (tmp_path / "o" / "psnr.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[-1].startswith("mean of the 1 done (interrupted),,")
    assert rows[1].split(",")[1] == f"{sorted(folder.iterdir())[0].stem}_recon.png"
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]


def test_a_folder_from_before_the_outputs_record_is_still_reconstructed_into(tmp_path, capsys):
    """A folder an older softvq wrote has psnr.csv but no .reconstruct-outputs: its outputs stay
    reconstruct's on every later run (was: the first rerun left an empty record, and the next
    refused the folder's own outputs)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = bundled_photos()[0]
    (folder / "a.png").write_bytes(photo.read_bytes())
    command = ["reconstruct", str(folder), "--resize", "--out", str(tmp_path / "o")]
    assert main(command) == 0
    (tmp_path / "o" / ".reconstruct-outputs").unlink()
    for _ in range(2):
        assert main(command) == 0
        assert "mean PSNR over 1 image(s)" in capsys.readouterr().out
    assert sorted((tmp_path / "o" / ".reconstruct-outputs").read_text().split()) == ["a_recon.png",
                                                                                    "a_side_by_side.png"]


def test_an_interrupted_reconstruct_continues_where_it_stopped(tmp_path, capsys, monkeypatch):
    """Was: a rerun made every image again (a Ctrl-C after 49,000 of 50,000 images lost them all)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in bundled_photos()[:4]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    command = ["reconstruct", str(folder), "--resize", "--batch-size", "1"]
    assert main([*command, "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, Tokenizer, "forward", 3)  # two images made, then Ctrl-C
        assert main([*command, "--out", str(tmp_path / "o")]) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    calls = []
    real_forward = Tokenizer.forward
    monkeypatch.setattr(Tokenizer, "forward", lambda self, x: calls.append(len(x)) or real_forward(self, x))
    assert main([*command, "--batch-size", "2", "--out", str(tmp_path / "o")]) == 0  # another batch size: same images
    assert calls == [2] and "continued an interrupted run: 2 image(s)" in capsys.readouterr().out
    assert (tmp_path / "o" / "psnr.csv").read_text() == (tmp_path / "whole" / "psnr.csv").read_text()
    for png in (tmp_path / "whole").glob("*.png"):
        assert (tmp_path / "o" / png.name).read_bytes() == png.read_bytes(), png.name
    assert not (tmp_path / "o" / ".reconstruct-progress").exists()  # finished: a rerun makes them all again
    calls.clear()
    assert main([*command, "--out", str(tmp_path / "o")]) == 0 and calls == [1, 1, 1, 1]


def test_a_reconstruct_continues_only_what_the_same_weights_made_from_the_same_inputs(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in bundled_photos()[:3]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    command = ["reconstruct", str(folder), "--resize", "--batch-size", "1", "--out", str(tmp_path / "o")]
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, Tokenizer, "forward", 3)
        assert main(command) == 130
    progress = tmp_path / "o" / ".reconstruct-progress"
    with open(progress, "a") as cut:  # a kill while a line was written: it is left out, not misread
        cut.write(f"{folder / 'x.png'},x_recon.png,3")
    calls = []
    real_forward = Tokenizer.forward
    monkeypatch.setattr(Tokenizer, "forward", lambda self, x: calls.append(len(x)) or real_forward(self, x))
    first = sorted(folder.iterdir())[0]  # replaced since (a new modification time): made again
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert main(command) == 0 and calls == [1, 1] and "continued an interrupted run: 1 image(s)" in \
        capsys.readouterr().out
    # the row written after the cut line is read back too (it was glued onto the cut line and lost)
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, Tokenizer, "forward", 2)
        assert main(command) == 130
    with open(progress, "a") as cut:
        cut.write(f"{folder / 'x.png'},x_re")
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, Tokenizer, "forward", 2)  # one more made after the cut line, then stopped
        assert main(command) == 130
    calls.clear()
    assert main(command) == 0 and calls == [1] and "continued an interrupted run: 2 image(s)" in \
        capsys.readouterr().out
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, Tokenizer, "forward", 3)
        assert main(command) == 130
    calls.clear()  # other weights (the --seed of a preset's random ones): all made again
    assert main([*command, "--seed", "1"]) == 0 and calls == [1, 1, 1]
    assert "continued" not in capsys.readouterr().out


def test_a_scheduler_sigterm_stops_reconstruct_as_ctrl_c_does(tmp_path):
    """SIGTERM killed it outright: no psnr.csv of the images done, no word of how to continue."""
    import signal
    import subprocess
    import sys
    import time

    from launching import cpu_process_env

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(150):  # far more than it makes before the signal
        Image.new("RGB", (64, 64), (i, 90, 200 - i)).save(folder / f"{i:03d}.png")
    out = tmp_path / "o"
    job = subprocess.Popen([sys.executable, "-m", "softvq.cli.main", "reconstruct", str(folder), "--batch-size", "1",
                            "--out", str(out)], env=cpu_process_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*_side_by_side.png")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-2000:]
    assert "softvq reconstruct: interrupted; the images written are kept: run the same command again" in err
    rows = (out / "psnr.csv").read_text().splitlines()
    assert rows[-1].startswith("mean of the") and "(interrupted)" in rows[-1]
