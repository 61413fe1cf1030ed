"""What each command passes to the library and gives back: flags reaching the functions they
set, default output folders, exit codes (0, 1, 2, 3, 130), refusals of flags that would be
ignored, and what is printed or recorded at the end."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softvq import Tokenizer
from softvq.cli.main import main

from interrupting import interrupt_at_call
from tests.tiny_generation import TINY, tiny_latent_set


def _images(folder: Path, n: int = 3, size: int = 64, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{i}.png" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return names


# ----------------------------------------------------------------------------------------------- main.py

def test_no_command_prints_the_help_and_fails(capsys):
    """A bare `softvq` is not a success."""
    assert main([]) == 1
    assert "usage: softvq" in capsys.readouterr().out


def test_a_sigterm_stops_decode_as_ctrl_c_does_and_keeps_the_images_written(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM stops decode as Ctrl-C does (exit 130, the images written so far kept)."""
    _images(tmp_path / "imgs")
    latents = str(tmp_path / "z.safetensors")
    assert main(["encode", str(tmp_path / "imgs"), "--model", "softvq-tiny", "--out", latents]) == 0
    real_decode, calls = Tokenizer.decode, []

    def preempted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption, during the second batch
        return real_decode(self, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "decode", preempted)
    seen = []

    def ours(signum, frame):  # SIGTERM's default would kill pytest; this one only notes it
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        code = main(["decode", latents, "--out", str(tmp_path / "out"), "--batch-size", "1"])
        assert signal.getsignal(signal.SIGTERM) is ours  # decode gives the handler it replaced back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and not seen
    assert "decode: interrupted; the images written are kept" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["0.png"]


# --------------------------------------------------------------------------------------------- decode.py

@pytest.fixture
def encoded(tmp_path):
    _images(tmp_path / "imgs")
    latents = str(tmp_path / "z.safetensors")
    assert main(["encode", str(tmp_path / "imgs"), "--model", "softvq-tiny", "--seed", "5", "--out", latents]) == 0
    return latents


def test_decode_writes_into_decoded_by_default(tmp_path, encoded, monkeypatch, capsys):
    """decoded/, the folder --help and the docs name."""
    monkeypatch.chdir(tmp_path)
    assert main(["decode", encoded]) == 0
    assert sorted(p.name for p in (tmp_path / "decoded").glob("*.png")) == ["0.png", "1.png", "2.png"]
    assert "-> decoded" in capsys.readouterr().out


def test_decode_seed_0_given_is_not_replaced_by_the_recorded_seed(tmp_path, encoded, capsys):
    """An explicit --seed 0 must win over the seed 5 that encode recorded (another preset draw)."""
    assert main(["decode", encoded, "--out", str(tmp_path / "zero"), "--seed", "0"]) == 0
    assert json.loads((tmp_path / "zero" / "decode.json").read_text())["seed"] == 0
    assert "was encoded by other weights" in capsys.readouterr().err  # seed 0's weights are not seed 5's
    torch.manual_seed(0)
    model = Tokenizer.from_preset("softvq-tiny").eval()
    from softvq.cli.encode import read_latents
    from softvq.data.images import to_pil

    with torch.inference_mode():
        expected = to_pil(model.decode(read_latents(encoded).latents[:1])[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "zero" / "0.png")), np.asarray(expected))


def test_a_decode_stopped_before_its_first_image_may_be_rerun_with_other_options(tmp_path, encoded, monkeypatch,
                                                                                 capsys):
    """A folder with decode.json but no image yet has nothing to mix, so another decode there is not
    refused."""
    interrupt_at_call(monkeypatch, Tokenizer, "decode", 1)  # Ctrl-C in the first batch: nothing written
    out = tmp_path / "out"
    assert main(["decode", encoded, "--out", str(out), "--batch-size", "1"]) == 130
    monkeypatch.undo()
    assert (out / "decode.json").is_file() and not list(out.glob("*.png"))
    capsys.readouterr()
    assert main(["decode", encoded, "--out", str(out), "--seed", "3"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png", "2.png"]
    assert json.loads((out / "decode.json").read_text())["seed"] == 3


def test_a_fresh_decode_does_not_claim_images_from_an_earlier_run(tmp_path, encoded, capsys):
    """A fresh decode does not say "(0 already there from an earlier run)"."""
    assert main(["decode", encoded, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"decoded 3 image\(s\) with .* -> .*out\n", out), out
    assert "already there" not in out


def test_a_generative_decoder_draws_each_batch_its_own_noise(tmp_path, capsys):
    """Each batch draws its own noise: equal latents in two batches decode to different images."""
    from softvq.config import BottleneckConfig, TokenizerConfig, ViTConfig
    from softvq.randomness import derived_seed

    torch.manual_seed(0)
    vit = ViTConfig(width=32, depth=1, heads=2)
    stage1 = Tokenizer(TokenizerConfig(image_size=32, patch_size=8, num_tokens=8, encoder=vit, decoder=vit,
                                       bottleneck=BottleneckConfig(kind="softvq", latent_dim=4, codebook_size=16)))
    model = stage1.with_generative_decoder(4).eval()
    with torch.no_grad():
        model.from_latent.weight[:, 4:].normal_(0, 0.5)
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
    model.save_pretrained(tmp_path / "gd")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.png"):  # the same picture twice: the same latents
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(folder / name)
    latents = str(tmp_path / "z.safetensors")
    assert main(["encode", str(folder), "--model", str(tmp_path / "gd"), "--out", latents]) == 0
    assert main(["decode", latents, "--out", str(tmp_path / "out"), "--batch-size", "1", "--seed", "2"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / "out" / n)) for n in ("a.png", "b.png"))
    assert not np.array_equal(a, b)
    from softvq.cli.encode import read_latents
    from softvq.data.images import to_pil

    z = read_latents(latents).latents
    with torch.inference_mode():
        expected = to_pil(model.decode(z[1:2], 32, generator=torch.Generator().manual_seed(derived_seed(2, 1)))[0])
    assert np.array_equal(b, np.asarray(expected))


# ---------------------------------------------------------------------------------------- reconstruct.py

def test_reconstruct_writes_into_reconstructions_by_default(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "imgs", 1)
    monkeypatch.chdir(tmp_path)
    assert main(["reconstruct", str(tmp_path / "imgs" / "0.png")]) == 0
    assert (tmp_path / "reconstructions" / "0_recon.png").is_file()
    assert (tmp_path / "reconstructions" / "psnr.csv").is_file()
    assert "(each in reconstructions/psnr.csv)" in capsys.readouterr().out


def test_the_bundled_photos_are_resized_whatever_resize_flag_says(tmp_path, monkeypatch, capsys):
    """The bundled photos are resized whatever --resize says (read unresized, they are refused for their
    size)."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(photo)
    monkeypatch.setattr("softvq.cli.reconstruct.bundled_photos", lambda: [photo])  # one small "bundled" photo
    assert main(["reconstruct", "--resize", "--out", str(tmp_path / "o")]) == 0
    assert np.asarray(Image.open(tmp_path / "o" / "photo_recon.png")).shape == (64, 64, 3)


def test_native_size_reconstructs_images_of_different_sizes_in_one_run(tmp_path, capsys):
    """--native-size images of different sizes go one per batch (stacked together they fail)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / "b.png")
    assert main(["reconstruct", str(folder), "--native-size", "--batch-size", "4", "--out", str(tmp_path / "o")]) == 0
    assert np.asarray(Image.open(tmp_path / "o" / "b_recon.png")).shape == (32, 48, 3)
    assert "mean PSNR over 2 image(s)" in capsys.readouterr().out


def test_native_size_takes_a_side_of_exactly_four_times_the_trained_one(tmp_path, capsys):
    """A 256 px side (4 x 64) is within the limit; 264 px is over it."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 256, 3), dtype=np.uint8)).save(tmp_path / "edge.png")
    Image.fromarray(rng.integers(0, 256, (16, 264, 3), dtype=np.uint8)).save(tmp_path / "over.png")
    assert main(["reconstruct", str(tmp_path / "edge.png"), "--native-size", "--out", str(tmp_path / "o")]) == 0
    assert np.asarray(Image.open(tmp_path / "o" / "edge_recon.png")).shape == (16, 256, 3)
    assert main(["reconstruct", str(tmp_path / "over.png"), "--native-size", "--out", str(tmp_path / "o2")]) == 2
    assert "over 4x the 64 px the model was trained at" in capsys.readouterr().err


def test_a_named_image_whose_pixels_do_not_read_is_an_error_beside_good_ones(tmp_path, capsys):
    """A file named on the command line whose header reads but whose pixels do not is an error, not a
    skipped file in a successful run."""
    _images(tmp_path / "imgs", 1)
    buf = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf)
    whole = buf.read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    code = main(["reconstruct", str(tmp_path / "imgs" / "0.png"), str(tmp_path / "cut.png"),
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "cut.png: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "o" / "psnr.csv").exists()


# ---------------------------------------------------------------------------------------- pretokenize.py

def test_pretokenize_passes_workers_not_the_batch_size(tmp_path, monkeypatch, capsys):
    from softvq.generation import latent_sources

    real, seen = latent_sources.folder_source, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("workers"))
        return real(*args, **{**kwargs, "workers": 0})  # decoded here, whatever was asked

    monkeypatch.setattr(latent_sources, "folder_source", spy)
    _images(tmp_path / "imgs" / "a", 2, size=32)
    torch.manual_seed(0)
    Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1}).save_pretrained(
        tmp_path / "tok")
    assert main(["pretokenize", str(tmp_path / "lat"), "--images", str(tmp_path / "imgs"), "--model",
                 str(tmp_path / "tok"), "--batch-size", "3", "--workers", "1", "--device", "cpu", "--quiet"]) == 0
    assert seen == [1]


def test_pretokenize_bundled_single_class_puts_every_crop_in_class_0(tmp_path, capsys):
    from softvq.generation.latents import load_latents

    torch.manual_seed(0)
    Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1}).save_pretrained(
        tmp_path / "tok")
    assert main(["pretokenize", str(tmp_path / "lat"), "--bundled", "--single-class", "--crops-per-photo", "1",
                 "--model", str(tmp_path / "tok"), "--device", "cpu", "--quiet"]) == 0
    data = load_latents(tmp_path / "lat")
    assert len(data.classes) == 1 and set(data.labels.tolist()) == {0} and len(data.labels) > 1
    assert "; 1 class(es);" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- generate.py

@pytest.fixture(scope="module")
def mar_run(tmp_path_factory):
    """(root, run): a tiny tokenizer and latent set and a MAR generator trained one step."""
    from softvq.generation.train import GeneratorTrainConfig, train_generator

    root = tmp_path_factory.mktemp("mar")
    tiny_latent_set(root)
    settings = {**TINY, "objective": "mar", "head_width": 32, "head_depth": 1, "warmup_steps": 0,
                "diffusion_steps": 50}
    train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(root / "run"), steps=1, **settings),
                    progress=False)
    return root, root / "run"


MAR_FAST = ["--classes", "0", "--per-class", "1", "--steps", "2", "--ar-steps", "2", "--device", "cpu", "--quiet"]


def test_generate_passes_the_temperature_to_the_mar_sampler(mar_run, tmp_path, capsys):
    _, run = mar_run
    assert main(["generate", str(run), "--out", str(tmp_path / "s"), "--temperature", "0.5", *MAR_FAST]) == 0
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["temperature"] == 0.5
    assert main(["generate", str(run), "--out", str(tmp_path / "d"), *MAR_FAST]) == 0
    assert json.loads((tmp_path / "d" / "samples.json").read_text())["temperature"] == 1.0


def test_diverged_mar_samples_suggest_clip_x0_only_when_it_was_not_given(mar_run, tmp_path, monkeypatch, capsys):
    """The hint to sample again with --clip-x0 5 goes to runs that did not clip, not to those that did."""
    from softvq.generation import samples

    real = samples.write_samples
    monkeypatch.setattr(samples, "write_samples",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), diverged=True))  # as if some diverged
    _, run = mar_run
    capsys.readouterr()
    assert main(["generate", str(run), "--out", str(tmp_path / "s"), *MAR_FAST]) == 0
    err = capsys.readouterr().err
    assert "some samples diverged" in err and "sample again with --clip-x0 5 into another --out" in err
    assert main(["generate", str(run), "--out", str(tmp_path / "c"), "--clip-x0", "5", *MAR_FAST]) == 0
    err = capsys.readouterr().err
    assert "some samples diverged" in err and "--clip-x0 5" not in err


def test_fid_json_counts_every_sample_scored_also_those_of_an_earlier_run(mar_run, tmp_path, monkeypatch, capsys):
    """A rerun that finds all its images made records every sample its gFID scored, not 0."""
    import softvq.cli.generate as generate

    scored = []
    monkeypatch.setattr(generate, "generation_fid",  # Inception is not what this checks
                        lambda folder, reference, device, progress=True: scored.append(folder) or {"gfid": 12.5})
    _, run = mar_run
    (tmp_path / "ref").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ref" / "r.png")
    command = ["generate", str(run), "--out", str(tmp_path / "s"), "--fid-ref", str(tmp_path / "ref"),
               "--classes", "0,1", *MAR_FAST[2:]]
    assert main(command) == 0
    assert json.loads((tmp_path / "s" / "fid.json").read_text())["samples"] == 2
    assert main(command) == 0  # all there: nothing made, the same two scored
    assert "already holds all 2 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "fid.json").read_text()) == {
        "gfid": 12.5, "reference": str(tmp_path / "ref"), "samples": 2}
    assert len(scored) == 2


def test_a_class_index_equal_to_the_class_count_is_out_of_range():
    """Index 3 of 3 classes is the null (unconditional) label, not a class."""
    from softvq.cli.generate import parse_classes

    assert parse_classes("2,0", ["a", "b", "c"], 3) == [2, 0]
    with pytest.raises(ValueError, match=r"class index 3 is out of range 0\.\.2"):
        parse_classes("3", ["a", "b", "c"], 3)


# ---------------------------------------------------------------------------------------------- train.py

def test_a_config_named_after_an_override_is_refused():
    """`train k=v demo` refuses a CONFIG that is not first instead of taking demo as the config."""
    from softvq.cli.train import split_items

    assert split_items(["demo", "a.b=1"]) == ("demo", ["a.b=1"])
    with pytest.raises(ValueError, match="unexpected argument 'demo': give one CONFIG first"):
        split_items(["a.b=1", "demo"])


def test_a_new_run_beside_an_existing_one_goes_to_name_2(tmp_path, monkeypatch):
    """The second run of a name goes to runs/NAME-2."""
    from softvq.cli.train import resolve_run_dir

    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir(None, "demo", False) == Path("runs/demo")
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "config.yaml").write_text("x")
    assert resolve_run_dir(None, "demo", False) == Path("runs/demo-2")
    (tmp_path / "runs" / "demo-2").mkdir()
    (tmp_path / "runs" / "demo-2" / "config.yaml").write_text("x")
    assert resolve_run_dir(None, "demo", False) == Path("runs/demo-3")
    assert resolve_run_dir(None, "demo", True) == Path("runs/demo")


def _tiny_config(tmp_path, **sections) -> str:
    from test_training_run import tiny_tree

    from softvq.training.config import config_from_dict, save_config

    path = tmp_path / "tiny.yaml"
    save_config(config_from_dict(tiny_tree(**sections)), path)
    return str(path)


def _sabotaged_trainer(monkeypatch, **sabotage):
    """The CLI's Trainer, with the repo's Sabotage objective (NaN losses, a Ctrl-C) at chosen steps."""
    from test_training_run import factory

    from softvq.training import trainer

    real = trainer.Trainer

    class Sabotaged(real):
        def __init__(self, cfg, run_dir, **kwargs):
            super().__init__(cfg, run_dir, objective_factory=factory(**sabotage), **kwargs)

    monkeypatch.setattr(trainer, "Trainer", Sabotaged)


def test_train_stopped_by_nonfinite_losses_exits_with_3(tmp_path, monkeypatch, capsys):
    _sabotaged_trainer(monkeypatch, nan_at={1, 3})
    config = _tiny_config(tmp_path, schedule={"steps": 6}, run={"max_nonfinite": 2})
    assert main(["train", config, "-o", str(tmp_path / "run")]) == 3
    assert "softvq train: " in capsys.readouterr().err


def test_train_stopped_by_ctrl_c_exits_with_130_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    _sabotaged_trainer(monkeypatch, sigint_at=1)
    config = _tiny_config(tmp_path, schedule={"steps": 6})
    assert main(["train", config, "-o", str(tmp_path / "run")]) == 130
    assert f"stopped at step 2; continue with: softvq train --resume --output {tmp_path / 'run'}" \
        in capsys.readouterr().out


def test_train_prints_the_held_out_psnr_to_two_decimals(tmp_path, capsys):
    config = _tiny_config(tmp_path, schedule={"steps": 3})
    assert main(["train", config, "-o", str(tmp_path / "run")]) == 0
    psnr = json.loads((tmp_path / "run" / "metrics.json").read_text())["psnr"]
    assert f"finished at step 3: held-out PSNR {psnr:.2f} dB" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ train_generator.py

def test_train_generator_stopped_by_sigterm_exits_with_130(tmp_path, monkeypatch, capsys):
    from softvq.generation import train as train_module

    tiny_latent_set(tmp_path)
    real_lr = train_module.learning_rate

    def preempted(cfg, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 2
        return real_lr(cfg, step)

    monkeypatch.setattr(train_module, "learning_rate", preempted)
    flags = ["--width", "32", "--depth", "1", "--heads", "2", "--batch-size", "4", "--cpu", "--quiet"]
    assert main(["train-generator", "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "g"), "--steps", "6",
                 *flags]) == 130
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stopped"] and result["steps"] == 2


# ----------------------------------------------------------------------------------------------- eval.py

def test_eval_samples_refuses_probe_instead_of_ignoring_it(tmp_path, capsys):
    """--samples with --probe is refused, not scored with the probe dropped without a word."""
    for name in ("fake", "real", "labelled"):
        (tmp_path / name).mkdir()
    code = main(["eval", "--samples", str(tmp_path / "fake"), "--images", str(tmp_path / "real"),
                 "--probe", str(tmp_path / "labelled"), "--device", "cpu"])
    assert code == 2
    assert "--model and --probe evaluate a tokenizer instead: run them as a separate eval" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_the_report_of_generates_npz_pack_goes_beside_its_samples(tmp_path):
    """Not in a folder named after the .npz file."""
    from softvq.cli.eval import samples_report_folder

    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "samples.json").write_text("{}")
    (tmp_path / "s" / "samples.npz").write_bytes(b"")
    assert samples_report_folder(tmp_path / "s" / "samples.npz") == tmp_path / "s" / "eval"
    (tmp_path / "batch.npz").write_bytes(b"")  # an npz of anyone else's: ./eval
    assert samples_report_folder(tmp_path / "batch.npz") == Path("eval")


def test_eval_passes_workers_to_the_tokenizer_evaluation(tmp_path, monkeypatch, capsys):
    from softvq.evaluation import evaluate

    real, seen = evaluate.evaluate_tokenizer, []

    def spy(model, images, options, **kwargs):
        seen.append(options.workers)
        return real(model, images, dataclasses.replace(options, workers=0), **kwargs)  # read here, whatever was asked

    monkeypatch.setattr(evaluate, "evaluate_tokenizer", spy)
    _images(tmp_path / "imgs", 2)
    assert main(["eval", "--model", "softvq-tiny", "--images", str(tmp_path / "imgs"), "--workers", "2",
                 "--no-fid", "--no-lpips", "--no-flops", "--quiet", "--device", "cpu",
                 "--out", str(tmp_path / "e")]) == 0
    assert seen == [2]
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["num_images"] == 2


def test_eval_measures_lpips_with_both_networks_unless_no_lpips(tmp_path, monkeypatch, capsys):
    """The report has both LPIPS columns, VGG and Alex."""
    from softvq.evaluation import evaluate

    real, seen = evaluate.evaluate_tokenizer, []

    def spy(model, images, options, **kwargs):
        seen.append(tuple(options.lpips_nets))
        return real(model, images, dataclasses.replace(options, lpips_nets=()), **kwargs)  # no LPIPS weights needed

    monkeypatch.setattr(evaluate, "evaluate_tokenizer", spy)
    _images(tmp_path / "imgs", 1)
    common = ["eval", "--model", "softvq-tiny", "--images", str(tmp_path / "imgs"), "--no-fid", "--no-flops",
              "--quiet", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--no-lpips", "--out", str(tmp_path / "b")]) == 0
    assert seen == [("vgg", "alex"), ()]


# ----------------------------------------------------------------------------------------------- plot.py

def test_plot_with_nothing_to_draw_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert "softvq plot: nothing to draw" in capsys.readouterr().err


def test_plot_passes_per_class_and_num_reconstructions_each_their_own(tmp_path, monkeypatch, capsys):
    from softvq.evaluation import runs

    seen = {}

    def spy(run_dirs, out, **kwargs):
        seen.update(kwargs)
        return [Path(out) / "comparison.md"]

    monkeypatch.setattr(runs, "plot_runs", spy)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "out"), "--per-class", "3",
                 "--num-reconstructions", "5"]) == 0
    assert (seen["per_class"], seen["num_reconstructions"]) == (3, 5)
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "comparison.md")


# ---------------------------------------------------------------------------------------------- bench.py

def test_bench_gen_times_one_repeat_on_the_cpu_by_default(monkeypatch, capsys):
    from softvq.generation import benchmark

    real, seen = benchmark.generator_table, []

    def spy(*args, **kwargs):
        seen.append(kwargs["repeats"])
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "generator_table", spy)
    base = ["bench", "gen", "--kinds", "dit", "--sizes", "S", "--layouts", "32 tokens", "--no-throughput", "--no-mar"]
    assert main(base) == 0
    assert main([*base, "--repeats", "3"]) == 0
    assert seen == [1, 3]
