"""Bad input (issue 2, item 6): odd colour modes become RGB; wrong sizes, unreadable files and
missing or corrupt checkpoints give one-line errors (exit status 2, no traceback)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from softvq import Tokenizer
from softvq.cli.main import main
from softvq.data.images import ImageReadError, _as_rgb, load_rgb


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    """The error line of stderr (other lines are the random-weights warning)."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    return errors[0]


# --- colour modes --------------------------------------------------------------------------------


def _gradient(size: int = 64) -> np.ndarray:
    return np.add.outer(np.arange(size), np.arange(size)).astype(np.uint8)


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    Image.fromarray(_gradient(), mode="L").save(tmp_path / "g.png")
    rgb = np.asarray(load_rgb(tmp_path / "g.png"))
    assert rgb.shape == (64, 64, 3)
    assert all(np.array_equal(rgb[..., c], _gradient()) for c in range(3))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    deep = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(deep).save(tmp_path / "deep.png")
    rgb = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert rgb.shape == (64, 64, 3)
    assert np.array_equal(rgb[..., 1], np.round(deep / 257).astype(np.uint8))


@pytest.mark.parametrize("scale", [1.0, 255.0, 65535.0])
def test_float_tiffs_are_read_in_0_1_or_in_8_or_16_bit_units(tmp_path, scale):
    grey = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(grey * scale, mode="F").save(tmp_path / "f.tif")
    rgb = np.asarray(load_rgb(tmp_path / "f.tif"))  # [0, 1] floats came out black, 16-bit units white
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(np.float64) - grey * 255).max() <= 0.5 + 1e-3


def test_a_float_tiff_overshooting_0_1_a_little_stays_a_0_1_image(tmp_path):
    grey = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    over = grey * 1.0001
    over[0, 0] = -0.001  # one pixel past the end used to turn the whole image into 8-bit units: black
    Image.fromarray(over, mode="F").save(tmp_path / "f.tif")
    rgb = np.asarray(load_rgb(tmp_path / "f.tif"))
    assert np.abs(rgb[..., 0].astype(np.float64) - np.clip(over, 0, 1) * 255).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("top", [255, 65535, 2**31 - 1])
def test_32_bit_integer_tiffs_are_read_in_the_units_their_values_use(tmp_path, top):
    grey = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray(np.round(grey * top).astype(np.int32), mode="I").save(tmp_path / "i.tif")
    rgb = np.asarray(load_rgb(tmp_path / "i.tif"))  # 0..255 data was divided by 257: black
    assert np.abs(rgb[..., 1].astype(np.float64) - grey * 255).max() <= 0.5 + 1e-3


def test_an_unreadable_file_says_why_in_a_few_words(tmp_path):
    import os

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    os.symlink("loop.png", tmp_path / "loop.png")
    reasons = {}
    for name in ("cut.jpg", "notes.png", "loop.png"):
        with pytest.raises(ImageReadError) as info:
            load_rgb(tmp_path / name)
        reasons[name] = str(info.value).split(": not a readable image ")[1]
    # was "(OSError)" for both a truncated file and a link loop
    assert reasons == {"cut.jpg": "(OSError: Truncated File Read)",
                       "notes.png": "(not a format Pillow reads, or not an image at all)",
                       "loop.png": "(OSError: Too many levels of symbolic links)"}


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200            # red everywhere
    rgba[:32, :, 3] = 255         # top half opaque
    rgba[32:, :, 3] = 0           # bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(load_rgb(tmp_path / "a.png"))
    assert rgb.shape == (64, 64, 3)
    assert (rgb[:32] == [200, 0, 0]).all()
    assert (rgb[32:] == 255).all()


@pytest.mark.parametrize("mode, transparent", [("L", 0), ("RGB", (0, 0, 0))])
def test_a_transparency_key_is_composited_on_white_as_alpha_is(tmp_path, mode, transparent):
    """PNG's tRNS chunk on a grey or RGB image marks one colour transparent; it came out black."""
    Image.new(mode, (8, 8), transparent).save(tmp_path / "t.png", transparency=transparent)
    assert (np.asarray(load_rgb(tmp_path / "t.png")) == 255).all()
    pa = Image.new("PA", (8, 8), (0, 0))  # palette + alpha, fully transparent
    pa.putpalette([0, 0, 0] * 256)
    assert (np.asarray(_as_rgb(pa)) == 255).all()


def test_palette_is_expanded_to_its_colours(tmp_path):
    img = Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 3).astype(np.uint8), mode="P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.save(tmp_path / "p.png")
    rgb = np.asarray(load_rgb(tmp_path / "p.png"))
    idx = np.arange(64 * 64).reshape(64, 64) % 3
    assert rgb.shape == (64, 64, 3)
    assert np.array_equal(rgb, np.eye(3, dtype=np.uint8)[idx] * 255)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK"])
def test_reconstruct_accepts_every_colour_mode(tmp_path, capsys, mode):
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).convert(mode).save(tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}")
    src = next(tmp_path.glob("x.*"))
    code, out, _ = _run(capsys, "reconstruct", str(src), "--out", str(tmp_path / "out"))
    assert code == 0 and "PSNR" in out
    assert Image.open(tmp_path / "out" / "x_recon.png").mode == "RGB"


# --- sizes ----------------------------------------------------------------------------------------


def test_wrong_size_is_an_error_that_suggests_resize(tmp_path, capsys):
    Image.new("RGB", (80, 50)).save(tmp_path / "wide.png")
    code, _, err = _run(capsys, "reconstruct", str(tmp_path / "wide.png"), "--out", str(tmp_path / "o"))
    line = _one_line_error(err)
    assert code == 2
    assert "wide.png" in line and "80x50" in line and "64x64" in line and "--resize" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    code, _, _ = _run(capsys, "reconstruct", str(tmp_path / "wide.png"), "--resize", "--out", str(tmp_path / "o"))
    assert code == 0
    assert Image.open(tmp_path / "o" / "wide_recon.png").size == (64, 64)


def test_native_size_needs_a_multiple_of_the_patch(tmp_path, capsys):
    Image.new("RGB", (60, 64)).save(tmp_path / "odd.png")
    code, _, err = _run(capsys, "reconstruct", str(tmp_path / "odd.png"), "--native-size", "--out", str(tmp_path))
    assert code == 2 and "not a multiple of the patch size 8" in _one_line_error(err)
    Image.new("RGB", (96, 32)).save(tmp_path / "ok.png")
    code, _, _ = _run(capsys, "reconstruct", str(tmp_path / "ok.png"), "--native-size", "--out", str(tmp_path))
    assert code == 0 and Image.open(tmp_path / "ok_recon.png").size == (96, 32)
    # past 4x the trained side: refused from the header (a 12000 px photo ran for hours, then ran out of memory)
    Image.new("RGB", (264, 64)).save(tmp_path / "huge.png")
    code, _, err = _run(capsys, "reconstruct", str(tmp_path / "huge.png"), "--native-size", "--out", str(tmp_path))
    assert code == 2 and "huge.png: 264x64, over 4x the 64 px the model was trained at" in _one_line_error(err)
    # a folder's wrong sizes are named all at once, before any compute
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, side in enumerate((64, 50, 72)):
        Image.new("RGB", (side, side)).save(folder / f"{i}.png")
    code, out, err = _run(capsys, "reconstruct", str(folder), "--out", str(tmp_path / "o"))
    assert code == 2 and "2 of the 3 images do not fit the model as they are" in _one_line_error(err)
    assert "1.png: 50x50, not 64x64" in err and "2.png: 72x72, not 64x64" in err and "PSNR" not in out


def test_encode_wrong_size_is_an_error_not_a_skip(tmp_path, capsys, monkeypatch):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (65, 64)).save(tmp_path / "imgs" / "b.png")
    Image.new("RGB", (32, 48)).save(tmp_path / "imgs" / "c.png")
    (tmp_path / "imgs" / "d.png").write_text("no")  # unreadable: skipped later, not a size problem
    encoded = []
    monkeypatch.setattr(Tokenizer, "encode_latents", lambda self, x: encoded.append(x) or x)
    code, _, err = _run(capsys, "encode", str(tmp_path / "imgs"), "--out", str(tmp_path / "z.safetensors"),
                        "--batch-size", "1")
    # every wrong size named at once, before anything is encoded (was: the first, after the work before it)
    assert code == 2 and "2 of the 4 images are not 64x64" in _one_line_error(err) and "--resize" in err
    assert "b.png: 65x64" in err and "c.png: 32x48" in err and "d.png" not in err and not encoded
    assert not (tmp_path / "z.safetensors").exists()


# --- unreadable files -------------------------------------------------------------------------------


def test_unreadable_image_is_named(tmp_path, capsys):
    (tmp_path / "broken.png").write_text("this is not a png")
    code, _, err = _run(capsys, "reconstruct", str(tmp_path / "broken.png"), "--out", str(tmp_path))
    line = _one_line_error(err)
    assert code == 2 and "broken.png" in line and "not a readable image" in line


def test_missing_image_is_named(tmp_path, capsys):
    code, _, err = _run(capsys, "reconstruct", str(tmp_path / "nope.jpg"), "--out", str(tmp_path))
    assert code == 2 and "nope.jpg: no such file" in _one_line_error(err)


def test_encode_skips_corrupt_files_and_lists_them(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / name)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "d.jpg").write_text("text")
    code, out, err = _run(capsys, "encode", str(folder), "--out", str(tmp_path / "z.safetensors"))
    assert code == 0
    assert "skipped 2 unreadable file(s)" in err and "b.png" in err and "d.jpg" in err
    assert "encoded 2 image(s) of 4" in out
    assert load_file(str(tmp_path / "z.safetensors"))["latents"].shape == (2, 16, 8)


def test_encode_reads_tga_and_names_the_photos_pillow_cannot_read(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_gradient()).convert("RGB").save(tmp_path / "imgs" / "a.png")
    Image.fromarray(_gradient()).convert("RGB").save(tmp_path / "imgs" / "b.tga")  # was left out unnamed
    (tmp_path / "imgs" / "c.HEIC").write_bytes(b"ftypheic")
    (tmp_path / "imgs" / "notes.txt").write_text("a caption file: not an image, not named")
    code, out, err = _run(capsys, "encode", str(tmp_path / "imgs"), "--out", str(tmp_path / "z.safetensors"))
    assert code == 0 and "encoded 2 image(s) of 2" in out
    assert "softvq: warning: left out 1 image file(s) in formats Pillow does not read (.heic), e.g." in err
    assert "c.HEIC" in err and "notes.txt" not in err


def test_dead_links_in_a_folder_are_skipped_and_named_not_lost(tmp_path, capsys):
    import os

    (tmp_path / "imgs").mkdir()
    Image.fromarray(_gradient()).convert("RGB").save(tmp_path / "imgs" / "a.png")
    os.symlink("gone.png", tmp_path / "imgs" / "broken.png")
    os.symlink("loop.png", tmp_path / "imgs" / "loop.png")
    code, out, err = _run(capsys, "encode", str(tmp_path / "imgs"), "--out", str(tmp_path / "z.safetensors"))
    # both used to vanish from the listing, neither used nor counted
    assert code == 0 and "encoded 1 image(s) of 3" in out and "skipped 2 unreadable file(s)" in err
    assert "broken.png: a link to gone.png, which does not exist" in err
    assert "loop.png: not a readable image (OSError: Too many levels of symbolic links)" in err


def test_encode_folder_of_only_corrupt_files_fails(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_text("no")
    code, _, err = _run(capsys, "encode", str(tmp_path / "imgs"), "--out", str(tmp_path / "z.safetensors"))
    assert code == 2 and "none of the 1 image file(s)" in err


def test_missing_image_folder(tmp_path, capsys):
    code, _, err = _run(capsys, "encode", str(tmp_path / "nowhere"), "--out", str(tmp_path / "z.safetensors"))
    assert code == 2 and "does not exist" in _one_line_error(err)


def test_an_image_file_where_a_folder_goes_is_named_as_such(tmp_path, capsys):
    Image.fromarray(_gradient()).convert("RGB").save(tmp_path / "a.png")
    code, _, err = _run(capsys, "encode", str(tmp_path / "a.png"), "--out", str(tmp_path / "z.safetensors"))
    assert code == 2 and "a.png is a file, not a folder of images" in _one_line_error(err)


def test_an_output_path_taken_by_a_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_gradient()).convert("RGB").save(tmp_path / "imgs" / "a.png")
    (tmp_path / "z.safetensors").mkdir()  # the latents file's path is a folder
    code, _, err = _run(capsys, "encode", str(tmp_path / "imgs"), "--out", str(tmp_path / "z.safetensors"))
    assert code == 2 and "z.safetensors" in _one_line_error(err)


@pytest.mark.parametrize("argv", [["eval", "--images", ".", "--num-images", "0"],
                                  ["encode", ".", "--batch-size", "-3"],
                                  ["generate", "g", "--per-class", "0"],
                                  ["bench", "gen", "--repeats", "-1"]])
def test_counts_below_one_are_refused_when_parsed(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "is not a positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["encode", ".", "--out", "z", "--seed", str(2**70)],  # torch: "Overflow when unpacking"
                                  ["generate", "g", "--out", "o", "--seed", "-1"],
                                  ["pretokenize", ".", "--out", "o", "--seed", str(2**63)],
                                  ["reconstruct", ".", "--out", "o", "--seed", "1.5"]])  # argparse: "invalid seed_int value"
def test_seeds_torch_cannot_take_are_refused_when_parsed(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "is not a seed: use a whole number from 0 to 2**63 - 1" in capsys.readouterr().err


def test_train_generator_refuses_a_seed_torch_cannot_take():
    from softvq.generation.train import GeneratorTrainConfig

    with pytest.raises(ValueError, match=r"--seed must be 0 or more and below 2\*\*63, got -1"):
        GeneratorTrainConfig(latents="lat", out="o", seed=-1).validate()


# --- checkpoints --------------------------------------------------------------------------------------


@pytest.fixture
def photo(tmp_path):
    Image.new("RGB", (64, 64), (100, 50, 0)).save(tmp_path / "p.png")
    return str(tmp_path / "p.png")


def test_missing_checkpoint_folder(tmp_path, capsys, photo):
    code, _, err = _run(capsys, "reconstruct", photo, "--model", str(tmp_path / "no_such_ckpt"))
    assert code == 2 and "no_such_ckpt" in _one_line_error(err)


def test_unknown_preset_lists_the_presets(capsys, photo):
    code, _, err = _run(capsys, "reconstruct", photo, "--model", "softvq-small")
    assert code == 2 and "softvq-tiny" in _one_line_error(err)


def test_corrupt_checkpoint(tmp_path, capsys, photo):
    folder = Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = _run(capsys, "reconstruct", photo, "--model", str(folder), "--out", str(tmp_path / "o"))
    assert code == 2 and "corrupt" in _one_line_error(err)
    (folder / "config.json").write_text("{not json")
    code, _, err = _run(capsys, "info", str(folder))
    assert code == 2 and "not valid JSON" in _one_line_error(err)


def test_checkpoint_missing_weights_file(tmp_path, capsys):
    folder = Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    code, _, err = _run(capsys, "info", str(folder))
    assert code == 2 and "does not exist" in _one_line_error(err)


def test_corrupt_official_checkpoint(tmp_path, capsys):
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"tau": 0.07}))
    (folder / "model.safetensors").write_bytes(b"junk")
    code, _, err = _run(capsys, "info", f"official:{folder}")
    assert code == 2 and "corrupt" in _one_line_error(err)


def test_release_folder_without_prefix_suggests_it(tmp_path, capsys):
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"tau": 0.07}))
    code, _, err = _run(capsys, "info", str(folder))
    assert code == 2 and f"official:{folder}" in _one_line_error(err)


def test_decode_rejects_latents_of_another_model(tmp_path, capsys):
    from softvq.cli.encode import write_latents

    write_latents(tmp_path / "z.safetensors", torch.zeros(1, 16, 4), ["a.png"], {"model": "softvq-tiny"})
    code, _, err = _run(capsys, "decode", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "o"))
    assert code == 2 and "(16, 4)" in _one_line_error(err) and "(16, 8)" in err


def test_decode_rejects_a_file_that_is_not_latents(tmp_path, capsys):
    (tmp_path / "z.safetensors").write_bytes(b"nope")
    code, _, err = _run(capsys, "decode", str(tmp_path / "z.safetensors"), "--model", "softvq-tiny")
    assert code == 2 and "not a readable safetensors file" in _one_line_error(err)


# --- devices -------------------------------------------------------------------------------------


def test_unknown_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "gen", "--device", "cuda:x", "--no-throughput"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "argument --device: unknown device 'cuda:x'; use auto, cpu, cuda, cuda:N or mps" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_names_the_cpu_instead(capsys, photo):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "gen", "--device", "cuda", "--no-throughput"])
    assert exit_.value.code == 2
    assert "CUDA is not available; use --device cpu" in capsys.readouterr().err
    code, _, err = _run(capsys, "reconstruct", str(photo), "--device", "cuda", "--model", "softvq-tiny")
    assert code == 2 and "CUDA is not available; use --device cpu" in _one_line_error(err)


# --- never losing work ----------------------------------------------------------------------------


def test_outputs_that_would_replace_work_are_refused(tmp_path, capsys):
    """info --save over a checkpoint, decode over the encoded images, train -o into a run."""
    trained = Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "ckpt")
    weights = (trained / "model.safetensors").read_bytes()
    code, _, err = _run(capsys, "info", "softvq-tiny", "--save", str(trained))
    assert code == 2 and "model.safetensors and 1 more already exist;" in _one_line_error(err)
    assert (trained / "model.safetensors").read_bytes() == weights

    (tmp_path / "imgs").mkdir()
    Image.fromarray(_gradient()).convert("RGB").save(tmp_path / "imgs" / "a.png")
    original = (tmp_path / "imgs" / "a.png").read_bytes()
    latents = str(tmp_path / "z.safetensors")
    assert _run(capsys, "encode", str(tmp_path / "imgs"), "--model", str(trained), "--out", latents)[0] == 0
    code, _, err = _run(capsys, "decode", latents, "--out", str(tmp_path / "imgs"))
    assert code == 2 and "a.png already exists" in _one_line_error(err)
    assert (tmp_path / "imgs" / "a.png").read_bytes() == original

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("{}\n")
    code, _, err = _run(capsys, "train", "demo", "-o", str(tmp_path / "run"), "schedule.steps=1")
    assert code == 2 and "--resume" in _one_line_error(err)
    assert (tmp_path / "run" / "log.jsonl").read_text() == "{}\n"


def test_eval_of_samples_refuses_tokenizer_options_instead_of_ignoring_them(tmp_path, capsys):
    for folder in ("fake", "real"):
        (tmp_path / folder).mkdir()
        Image.fromarray(_gradient()).convert("RGB").save(tmp_path / folder / "a.png")
    code, _, err = _run(capsys, "eval", "--samples", str(tmp_path / "fake"), "--images", str(tmp_path / "real"),
                        "--model", "softvq-tiny")
    assert code == 2 and "--model and --probe evaluate a tokenizer instead" in _one_line_error(err)
    code, _, err = _run(capsys, "eval", "--samples", str(tmp_path / "fake"), "--images", str(tmp_path / "real"),
                        "--reference-stats", str(tmp_path / "q.npz"))  # was ignored without a word
    assert code == 2 and "--reference-stats is the rFID statistics file of --model" in _one_line_error(err)
    assert not (tmp_path / "eval").exists()


def test_train_into_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a run")
    code, _, err = _run(capsys, "train", "demo", "-o", str(tmp_path / "taken"), "schedule.steps=1")
    assert code == 2 and "is a file; a run is a folder: choose another --output" in _one_line_error(err)  # was Errno 17


def test_a_train_stopped_during_set_up_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    import softvq.training.trainer as trainer_module

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_module, "build_data", stop)  # Ctrl-C while the data is being scanned
    code, _, err = _run(capsys, "train", "demo", "-o", str(tmp_path / "run"), "schedule.steps=1")
    assert code == 130 and "interrupted; nothing was written: run the same command again" in err
    assert not (tmp_path / "run" / "config.yaml").exists()
    monkeypatch.setattr(trainer_module, "RunLogger", stop)  # ... or just after the config is written
    monkeypatch.setattr(trainer_module, "build_data", lambda *a, **k: (None, type("H", (), {"skipped": []})()))
    code, _, err = _run(capsys, "train", "demo", "-o", str(tmp_path / "run2"), "schedule.steps=1")
    assert code == 130 and f"continue with: softvq train --resume --output {tmp_path / 'run2'}" in err


@pytest.mark.parametrize("argv", [["eval", "--model", "softvq-tiny", "--images", "."], ["encode", ".", "--out", "z.safetensors"],
                                  ["decode", "z.safetensors"], ["reconstruct", "."]])
def test_one_process_commands_under_a_launcher_are_refused_instead_of_run_once_per_process(capsys, monkeypatch,
                                                                                          argv):
    """torchrun --nproc_per_node 2: each process evaluated every image (eval), or wrote the same
    file (encode: the second failed on the first's) or images (decode, reconstruct: one held the
    lock, the other failed, and torchrun killed both half done)."""
    said = f"softvq {argv[0]}: error: {argv[0]} runs in one process on one device; start it without torchrun"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):  # a launcher sets LOCAL_RANK: the first process on the machine says it
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        code, _, err = _run(capsys, *argv)
        assert code == 2 and (said in err if rank == "0" else err == ""), rank
    monkeypatch.delenv("LOCAL_RANK")  # a shell that only exported WORLD_SIZE and RANK: said, not a silent 2
    code, _, err = _run(capsys, *argv)
    assert code == 2 and said in err


def test_info_and_plot_run_under_a_launcher(capsys, monkeypatch):
    """A training script under torchrun may call them on its first process: they write one table or
    picture, which a second process would only write again."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, _ = _run(capsys, "info", "softvq-tiny")
    assert code == 0 and "softvq-tiny" in out


def test_a_file_name_that_is_not_utf8_is_evaluated_like_any_other(tmp_path, capsys):
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in (b"caf\xe9.png", b"plain.png"):  # a Latin-1 name, as scraped data has them
        Image.fromarray(_gradient()).convert("RGB").save(os.path.join(os.fsencode(folder), name))
    Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "tok")  # saved weights: a resumable eval
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path / "tok"), "--images", str(folder), "--no-fid",
                        "--no-lpips", "--no-flops", "--no-progress", "--out", str(tmp_path / "eval"))
    assert code == 0, err  # was: 'utf-8' codec can't encode character '\udce9', naming no file
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["num_images"] == 2
    from softvq.evaluation.fid import dataset_checksum  # rFID's reference cache and generate --fid-ref

    files = sorted(folder.iterdir())
    assert dataset_checksum(files, {}, folder) != dataset_checksum(files[:1], {}, folder)


def test_official_prefix_without_a_release_is_named(capsys):
    code, _, err = _run(capsys, "info", "official:")
    assert code == 2 and "official: needs a release folder or hub id after it" in _one_line_error(err)


# --- generation ---------------------------------------------------------------------------------------


def _tiny_generator(folder, objective="sit", tokenizer=None):
    from softvq.generation.checkpoint import GeneratorMeta, save_generator
    from softvq.generation.models import GeneratorConfig, build_generator

    model = build_generator(GeneratorConfig(kind=objective, width=32, depth=1, heads=2, num_tokens=16, latent_dim=8,
                                            num_classes=2))
    return save_generator(model, GeneratorMeta(objective=objective, tokenizer=tokenizer, classes=["a", "b"]), folder)


def test_generate_takes_quiet_like_the_other_long_jobs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # --fid-ref caches reference statistics under ~/.cache
    gen = _tiny_generator(tmp_path / "gen", tokenizer="softvq-tiny")
    make = ["generate", str(gen), "--classes", "0", "--per-class", "1", "--steps", "2", "--device", "cpu", "--out"]
    code, _, err = _run(capsys, *make, str(tmp_path / "loud"))
    assert code == 0 and "batch" in err  # the progress bar
    code, _, err = _run(capsys, *make, str(tmp_path / "quiet"), "--quiet")
    assert code == 0 and "batch" not in err and len(list((tmp_path / "quiet" / "images").glob("*.png"))) == 1
    (tmp_path / "ref").mkdir()
    for i in range(2):
        Image.fromarray(_gradient()).convert("RGB").save(tmp_path / "ref" / f"{i}.png")
    two = [flag if flag != "1" else "2" for flag in make]  # --per-class 2: FID needs two samples
    code, out, err = _run(capsys, *two, str(tmp_path / "scored"), "--quiet", "--fid-ref", str(tmp_path / "ref"))
    assert code == 0, err
    assert "gFID vs" in out and "samples:" not in err and "reference:" not in err  # scoring's bars too


@pytest.mark.parametrize("flags, named", [
    (["--temperature", "1.0"], "--temperature applies only to MAR generators; "),
    (["--cfg-schedule", "constant", "--ar-steps", "2"], "--ar-steps, --cfg-schedule apply only to MAR generators; "),
])
def test_generate_refuses_mar_options_on_a_sit_instead_of_ignoring_them(tmp_path, capsys, flags, named):
    gen = _tiny_generator(tmp_path / "gen")
    code, _, err = _run(capsys, "generate", str(gen), "--out", str(tmp_path / "s"), "--device", "cpu", *flags)
    assert code == 2 and named in _one_line_error(err) and "is a SiT one: drop" in err
    assert not (tmp_path / "s").exists()


def test_generate_refuses_a_guidance_interval_without_guidance(tmp_path, capsys):
    gen = _tiny_generator(tmp_path / "gen")
    code, _, err = _run(capsys, "generate", str(gen), "--out", str(tmp_path / "s"), "--device", "cpu",
                        "--interval", "0.2", "0.5")  # accepted with the default --cfg 1, and had no effect
    assert code == 2 and "--interval says where guidance applies, and --cfg 1" in _one_line_error(err)
    assert not (tmp_path / "s").exists()


def test_generate_says_what_a_folder_that_is_not_a_generator_is(tmp_path, capsys):
    Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "tokrun" / "export")  # a `softvq train` run
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "meta.json").write_text(json.dumps({"format": "softvq-latents"}))
    (tmp_path / "genrun").mkdir()  # train-generator stopped before its export
    (tmp_path / "genrun" / "config.json").write_text(json.dumps({"train": {}, "model": {}, "latents_sha1": "0"}))
    (tmp_path / "tokrun" / "config.yaml").write_text("model: {}\n")  # and one of its training checkpoints
    (tmp_path / "tokrun" / "checkpoints").mkdir()
    torch.save({"step": 1}, tmp_path / "tokrun" / "checkpoints" / "step-00000001.pt")
    for folder, named in (("tokrun", "is a tokenizer training run (its tokenizer is"),
                          ("tokrun/export", "is a tokenizer, not a generator; pass it as --tokenizer"),
                          ("tokrun/checkpoints/step-00000001.pt", "is a checkpoint of a tokenizer training run, not "
                                                                  "of a generator; pass it as --tokenizer"),
                          ("tokrun/export/config.json", "is a file that is not a generator checkpoint; pass a "
                                                        "generator folder"),
                          ("lat", "is a latent set (meta.json, written by pretokenize), not a generator; train one on "
                                  "it with `softvq train-generator --latents"),
                          ("genrun", "is a train-generator run with no generator/ yet (it stopped before its last "
                                     "step); rerun the same train-generator command to finish it")):
        code, _, err = _run(capsys, "generate", str(tmp_path / folder), "--out", str(tmp_path / "s"), "--device", "cpu")
        assert code == 2 and named in _one_line_error(err), folder
    assert not (tmp_path / "s").exists()
    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.generation.checkpoint import load_generator

    with pytest.raises(CheckpointError, match="pass it as the tokenizer"):  # from Python: no CLI flag to name
        load_generator(tmp_path / "tokrun" / "export")


def test_bugs_keep_their_traceback_and_softvq_traceback_shows_any(capsys, monkeypatch):
    import softvq.cli.info as info

    # an unknown preset is the user's to fix: one line, without KeyError's quotes around it
    code, _, err = _run(capsys, "train", "demo", "model.preset=softvq-xxl")
    assert code == 2 and _one_line_error(err) == ("softvq train: error: unknown preset 'softvq-xxl'; choose one of: "
                                                  "softvq-b-32, softvq-b-64, softvq-bl-32, softvq-bl-64, "
                                                  "softvq-bl-64-512, softvq-l-32, softvq-l-32-512, softvq-l-64, "
                                                  "softvq-s-32, softvq-s-64, softvq-tiny")

    def internal_bug(args):
        raise KeyError("a lookup inside softvq that failed")  # was printed as a one-line user error

    monkeypatch.setattr(info, "run", internal_bug)
    with pytest.raises(KeyError, match="a lookup inside softvq"):
        main(["info"])
    monkeypatch.setenv("SOFTVQ_TRACEBACK", "0")  # off is off
    assert _run(capsys, "train", "demo", "model.preset=softvq-xxl")[0] == 2
    monkeypatch.setenv("SOFTVQ_TRACEBACK", "1")  # and a ValueError's traceback on request
    with pytest.raises(ValueError, match="unknown preset"):
        main(["train", "demo", "model.preset=softvq-xxl"])


def test_library_warnings_speak_in_the_cli_voice(tmp_path, capsys):
    import json as _json

    from test_checkpoint_official import tiny_release

    folder, _, config = tiny_release(tmp_path, 1)
    (folder / "config.json").write_text(_json.dumps({**config, "image_size": 64}))
    code, _, err = _run(capsys, "info", f"official:{folder}")
    assert code == 0
    assert "softvq: warning: config.json says image_size 64 but the position embeddings are for 32 px" in err


def test_in_a_launched_run_only_process_0_repeats_what_every_process_would_warn(capsys, monkeypatch):
    import logging

    from softvq.cli.main import show_library_warnings

    show_library_warnings()
    log = logging.getLogger("softvq.data.images")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        log.warning("cannot list folder x (rank %s)", rank)
        log.warning("image y is huge (rank %s)", rank, extra={"every_process": True})
    assert capsys.readouterr().err.splitlines() == ["softvq: warning: cannot list folder x (rank 0)",
                                                    "softvq: warning: image y is huge (rank 0)",
                                                    "softvq: warning: image y is huge (rank 1)"]


def test_a_bad_seed_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "demo", "-o", str(tmp_path / "run"), "model.preset=softvq-tiny",
                        "schedule.steps=1", "schedule.seed=-1")
    assert code == 2 and "schedule.seed must be 0 or more" in _one_line_error(err)
    assert not (tmp_path / "run").exists()  # was: config.yaml, grids/, log.jsonl, so a rerun needed --resume


def test_paths_of_the_wrong_kind_are_named_as_such(tmp_path, capsys):
    """Each was a "does not exist", an [Errno 17]/[Errno 20], or torch's own advice."""
    run = tmp_path / "run"
    assert _run(capsys, "train", "demo", "-o", str(run), "model.preset=softvq-tiny", "schedule.steps=2",
                "run.checkpoint_every=1", "run.eval_lpips=false", "run.progress=false")[0] == 0
    code, _, err = _run(capsys, "train", "--resume", "model.x=1", "-o", str(run))
    assert code == 2 and "--resume took 'model.x=1' as its CHECKPOINT, but it looks like an override: put " \
                         "key=value overrides before --resume" in _one_line_error(err)
    code, _, err = _run(capsys, "train", "--resume", str(run / "checkpoints"), "-o", str(run))
    assert code == 2 and f"is a folder, not a checkpoint file: name one of its files (the newest is " \
                         f"{run / 'checkpoints' / 'step-00000002.pt'})" in _one_line_error(err)
    newest = run / "checkpoints" / "step-00000002.pt"
    torch.save({"x": np.zeros(2)}, newest)  # weights-only loading refuses it, with advice meant for code
    code, _, err = _run(capsys, "train", "--resume", "-o", str(run), "schedule.steps=3")
    line = _one_line_error(err)
    assert code == 2 and f"{newest} is corrupt or unreadable (UnpicklingError); delete it to continue from the " \
                         f"previous checkpoint, {run / 'checkpoints' / 'step-00000001.pt'}" in line
    assert "weights_only" not in line and "trust" not in line
    newest.unlink()
    (run / "grids").rename(tmp_path / "grids")
    (run / "grids").write_text("")
    code, _, err = _run(capsys, "train", "--resume", "-o", str(run), "schedule.steps=3")
    assert code == 2 and f"{run / 'grids'} is a file, but the run writes its grids/ folder there" in _one_line_error(err)

    (tmp_path / "file").write_text("x")
    for argv, said in ((["plot", str(tmp_path / "file")], "is a file; plot takes run folders"),
                       (["reconstruct", str(tmp_path / "grids"), "--resize", "--model", str(run / "export"),
                         "--out", str(tmp_path / "file")], "is a file; reconstruct writes a folder of images"),
                       (["pretokenize", str(tmp_path / "file"), "--images", str(tmp_path / "grids"), "--model",
                         str(run / "export")], "is a file; pretokenize writes a folder of latent shards")):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and said in _one_line_error(err), argv

    gen = tmp_path / "gen"  # a generator run: its config.json names the tokenizer
    gen.mkdir()
    (gen / "config.json").write_text(json.dumps({"train": {"tokenizer": str(run / "export")}, "model": {}}))
    for argv in (["reconstruct", str(tmp_path / "grids"), "--resize", "--model", str(gen), "--out",
                  str(tmp_path / "r")], ["encode", str(tmp_path / "grids"), "--resize", "--model", str(gen),
                                      "--out", str(tmp_path / "z.safetensors")]):
        code, _, err = _run(capsys, *argv)
        line = _one_line_error(err)
        assert code == 2 and f"{gen} is a generator run (train-generator), not a tokenizer" in line, argv
        assert f"its latents come from the tokenizer {run / 'export'}" in line and "official:" not in line


def test_an_image_past_pillows_warning_size_is_named_in_a_warning(tmp_path, monkeypatch, caplog):
    """Pillow warns between MAX_IMAGE_PIXELS and twice that without naming the file."""
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: in the warning band
    with caplog.at_level("WARNING", logger="softvq"):
        assert load_rgb(tmp_path / "big.png").size == (40, 40)
    assert f"{tmp_path / 'big.png'} is 40x40" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="softvq"):
        load_rgb(tmp_path / "big.png")
    assert "big.png" not in caplog.text  # once per file: training named it at every epoch's read
    import warnings

    with warnings.catch_warnings():  # Pillow's documented way to refuse such files still works
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(Image.DecompressionBombWarning):
            load_rgb(tmp_path / "big.png")


def test_the_pixel_limit_can_be_raised_for_the_commands_by_an_environment_variable(tmp_path):
    import os
    import subprocess
    import sys

    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    script = ("import PIL.Image as I; I.MAX_IMAGE_PIXELS = 500\n"  # 1600 px: past twice the limit, refused
              "import softvq.data.images as m\n"  # reads the variable, as the CLI's user sets it, at import
              f"print(m.load_rgb({str(tmp_path / 'big.png')!r}).size)")
    for value, expected in (("", "(Image size (1600 pixels), over twice MAX_IMAGE_PIXELS = 500); if you trust the "
                                 "file, raise the limit: SOFTVQ_MAX_IMAGE_PIXELS=<pixels>"),
                            ("0", "(40, 40)"), ("5000", "(40, 40)"),
                            ("-5", "SOFTVQ_MAX_IMAGE_PIXELS='-5' is not a whole, non-negative number of pixels")):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, "SOFTVQ_MAX_IMAGE_PIXELS": value})
        assert expected in done.stdout + done.stderr, (value, done.stderr[-500:])


def test_the_commands_name_a_huge_image_once_without_pillows_nameless_warning(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "imgs" / "big.png")  # 1600 pixels: Pillow's warning band
    done = subprocess.run([sys.executable, "-m", "softvq.cli.main", "eval", "--model", "softvq-tiny", "--images",
                           str(tmp_path / "imgs"), "--no-fid", "--no-lpips", "--no-flops", "--no-progress",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "SOFTVQ_MAX_IMAGE_PIXELS": "1000"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{tmp_path / 'imgs' / 'big.png'} is 40x40" in done.stderr
    assert "DecompressionBombWarning" not in done.stderr  # was printed too, with Pillow's path and no file name


def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    import os

    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_rgb(tmp_path / "x.png")  # was a hang: opening a FIFO waits for a writer


def test_a_launched_runs_other_processes_leave_refusals_before_they_meet_to_process_0(capsys, monkeypatch):
    """Under torchrun every process parses the same command line and reads the same files, so a usage
    error or a refusal before the processes meet was printed once per process; process 0 says it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "--bogus"])
        assert exit_.value.code == 2 and ("arguments are required: generator, --out" in capsys.readouterr().err) == said
        assert main(["train", "demo", "schedule.steps=-1"]) == 2
        assert ("schedule.steps" in capsys.readouterr().err) == said
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process of another machine, whose files may differ: it says it
    assert main(["train", "demo", "schedule.steps=-1"]) == 2 and "schedule.steps" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")  # a scheduler's RANK without a launch: every error is said
    monkeypatch.delenv("LOCAL_RANK")
    assert main(["train", "demo", "schedule.steps=-1"]) == 2 and "schedule.steps" in capsys.readouterr().err


def test_a_ctrl_c_after_the_work_is_done_ends_quietly(monkeypatch, capsys):
    """A launched run's process that had already left main() printed a KeyboardInterrupt traceback
    when Ctrl-C came as it flushed its output and left."""
    import softvq.cli.main as cli

    def done_then_interrupted(argv=None):  # the signal lands between main's return and the exit
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", done_then_interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.run([])
    assert exit_.value.code == 130 and capsys.readouterr().err == ""


def test_a_launched_runs_sampler_flag_refusal_is_said_by_its_main_process(tmp_path, monkeypatch):
    """Under torchrun every process loads the generator and refuses a MAR-only flag on a SiT: the
    processes other than the main one leave the message to it (it was printed once per process)."""
    import softvq.cli.generate as generate_cli
    from softvq.cli.main import build_parser
    from softvq.training.accelerator import said_elsewhere

    gen = _tiny_generator(tmp_path / "gen", tokenizer="softvq-tiny")

    class Follower:  # what launched_accelerator gives a process other than the main one
        is_main_process = False
        device = torch.device("cpu")

    monkeypatch.setattr("softvq.training.accelerator.launched_accelerator", lambda cpu: Follower())
    args = build_parser().parse_args(["generate", str(gen), "--out", str(tmp_path / "s"), "--device", "cpu",
                                      "--temperature", "1.0"])
    with pytest.raises(ValueError, match="--temperature applies only to MAR generators") as info:
        generate_cli.run(args)
    assert said_elsewhere(info.value)


# --- outputs that cannot be written: refused before the work, not after it ----------------------


def _no_work(monkeypatch):
    """Make every long evaluation, encoding, sampling or reconstruction fail loudly: the refusal must
    come before them."""
    from softvq.cli import encode as encode_cli
    from softvq.cli import eval as eval_cli
    from softvq.cli import pretokenize as pretokenize_cli
    from softvq.cli import reconstruct as reconstruct_cli
    from softvq.evaluation import evaluate, generated
    from softvq.generation import checkpoint, pretokenize

    def never(*args, **kwargs):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr(evaluate, "evaluate_tokenizer", never)
    monkeypatch.setattr(generated, "evaluate_samples", never)
    monkeypatch.setattr(checkpoint, "load_generator", never)
    monkeypatch.setattr(pretokenize, "pretokenize", never)
    for cli in (encode_cli, eval_cli, pretokenize_cli, reconstruct_cli):  # a checkpoint's load may be a download
        monkeypatch.setattr(cli, "load_tokenizer", never)


# command -> (argv for images IMGS and an output OUT, the flag that names OUT, what the command writes there)
_WRITERS = {
    "eval-model": (lambda imgs, out: ["eval", "--model", "softvq-tiny", "--images", imgs, "--out", out],
                   "--out", "eval writes its report there"),
    "eval-samples": (lambda imgs, out: ["eval", "--samples", imgs, "--images", imgs, "--out", out],
                     "--out", "eval writes its report there"),
    "encode": (lambda imgs, out: ["encode", imgs, "--out", f"{out}/x.safetensors"],
               "--out", "encode writes the latents file there"),
    "generate": (lambda imgs, out: ["generate", imgs, "--out", out], "--out", "generate writes the samples there"),
    "reconstruct": (lambda imgs, out: ["reconstruct", imgs, "--out", out],
                    "--out", "reconstruct writes a folder of images"),
    "pretokenize": (lambda imgs, out: ["pretokenize", out, "--images", imgs],
                    "OUT", "pretokenize writes a folder of latent shards"),
}


@pytest.mark.parametrize("command", list(_WRITERS))
def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, monkeypatch, command):
    """Was: eval and encode ran to the end (hours on 50,000 images), then failed on a raw errno
    (Not a directory, Operation not permitted) and kept nothing. Every command that writes a folder
    checks it first."""
    from softvq.cli import common

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("mine")
    _no_work(monkeypatch)
    make_argv, flag, writes = _WRITERS[command]

    def argv(out):
        return make_argv(str(tmp_path), out)

    notes, below = tmp_path / "notes.txt", tmp_path / "notes.txt" / "deeper"

    def shown(out):  # what the flag named
        return out / "x.safetensors" if command == "encode" else out

    code, _, err = _run(capsys, *argv(str(notes)))
    where = f"lies under {notes}, a file" if command == "encode" else "is a file"
    assert code == 2 and f"{flag} {shown(notes)} {where}; {writes}: choose another {flag}" in _one_line_error(err)
    code, _, err = _run(capsys, *argv(str(below)))
    assert code == 2 and f"{flag} {shown(below)} lies under {notes}, a file" in _one_line_error(err)
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # would fail at the end: mkdir on a broken link
    code, _, err = _run(capsys, *argv(str(tmp_path / "gone")))
    assert code == 2 and f"{tmp_path / 'gone'} is a broken symbolic link" in _one_line_error(err)

    locked = tmp_path / "locked"  # read-only or immutable: root passes chmod, so the check itself is faked
    locked.mkdir()
    real_access = common.os.access
    monkeypatch.setattr(common.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    code, _, err = _run(capsys, *argv(str(locked / "new")))
    assert code == 2 and (f"{flag} {shown(locked / 'new')}: {locked}, where it would be made, is not writable "
                          f"(read-only, or another user's)") in _one_line_error(err)
    assert notes.read_text() == "mine" and not (locked / "new").exists()


@pytest.mark.parametrize("flags, named", [
    (["--no-fid"], "--no-fid applies only to a tokenizer's evaluation (--model)"),
    (["--image-size", "32", "--no-lpips"], "--no-lpips, --image-size apply only to a tokenizer's evaluation (--model)"),
    (["--precision", "bf16", "--seed", "3", "--no-flops"], "--no-flops, --precision, --seed apply only to a tokenizer's"),
])
def test_eval_samples_refuses_the_tokenizer_flags_it_would_ignore(tmp_path, capsys, monkeypatch, flags, named):
    """Was: accepted and dropped, so that --no-fid still ran Inception and --image-size 32 reported 64."""
    _no_work(monkeypatch)
    code, _, err = _run(capsys, "eval", "--samples", str(tmp_path), "--images", str(tmp_path), *flags)
    assert code == 2 and named in _one_line_error(err) and "drop " in err


def test_eval_names_a_missing_source_and_an_image_size_off_the_patch_grid(tmp_path, capsys):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    code, _, err = _run(capsys, "eval", "--model", "softvq-tiny", "--images", str(tmp_path / "nowhere"), "--no-fid",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and f"{tmp_path / 'nowhere'} does not exist" in _one_line_error(err)  # was: "is neither ..."
    code, _, err = _run(capsys, "eval", "--model", "softvq-tiny", "--images", str(tmp_path), "--no-fid",
                        "--image-size", "60", "--out", str(tmp_path / "o"))
    # was: "... crop or resize the images (the CLI's --resize does this)", a flag eval does not have
    assert code == 2 and "image size 60 is not a multiple of the model's patch size 8: evaluate at 56 or 64 " \
                         "(--image-size)" in _one_line_error(err)
    code, _, err = _run(capsys, "eval", "--model", "softvq-tiny", "--images", str(tmp_path), "--no-fid",
                        "--image-size", "4", "--out", str(tmp_path / "o"))
    assert code == 2 and "patch size 8: evaluate at 8 (--image-size)" in _one_line_error(err)  # was: "8 or 8"


def test_non_negative_float_takes_zero_and_refuses_infinity():
    """Flags of 0 or more (bench --max-gmacs-cpu) take 0 and refuse infinity and NaN."""
    from softvq.cli.common import non_negative_float

    assert non_negative_float("0") == 0.0 and non_negative_float("2.5") == 2.5
    for text in ("inf", "-1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a number of 0 or more"):
            non_negative_float(text)


def test_non_negative_int_takes_zero():
    """Counts of 0 or more take 0."""
    from softvq.cli.common import non_negative_int

    assert non_negative_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="-1 is negative"):
        non_negative_int("-1")


def test_a_repeat_is_not_renamed_to_the_name_of_a_later_input():
    """Output names made distinct never take a later input's own name."""
    from softvq.cli.common import make_distinct

    assert make_distinct(["a.png", "a.png", "a-1.png"]) == ["a.png", "a-2.png", "a-1.png"]


def test_a_symbolic_link_to_a_folder_is_a_fine_output_folder(tmp_path):
    """A symbolic link to a folder is a fine output folder; a broken one is refused by name."""
    from softvq.cli.common import refuse_unwritable

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    refuse_unwritable(tmp_path / "link", "--out", "it writes images")
    refuse_unwritable(tmp_path / "link" / "new", "--out", "it writes images")
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    with pytest.raises(NotADirectoryError, match="is a broken symbolic link"):
        refuse_unwritable(tmp_path / "broken", "--out", "it writes images")


def test_a_given_tokenizer_overrides_the_recorded_one(tmp_path):
    """A tokenizer given on the command line wins over the one a generator records."""
    from softvq.cli.common import generator_tokenizer

    spec, tokenizer = generator_tokenizer("gen", str(tmp_path / "moved-away"), "softvq-tiny", "--tokenizer", "cpu")
    assert spec == "softvq-tiny" and tokenizer.config.num_tokens == 16
