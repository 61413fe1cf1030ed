"""``softvq info`` on what generation writes: a latent set, and a generator given as its export,
its run folder or one of the run's checkpoints."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest

from softvq.cli.main import main
from softvq.generation.checkpoint import GeneratorMeta, load_generator, save_generator
from softvq.generation.flops import analytic_macs, analytic_mar_macs
from softvq.generation.mar import mar_config
from softvq.generation.models import build_generator, generator_config
from softvq.generation.train import GeneratorTrainConfig, train_generator
from softvq.resume import weights_sha1
from softvq import Tokenizer
from tests.tiny_generation import TINY, tiny_latent_set


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, run): the tiny tokenizer ``root/tok``, its latent set ``root/lat`` and a SiT run
    trained 4 steps with checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("info")
    tiny_latent_set(root)
    run = root / "run"
    train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(run), steps=4, **TINY), progress=False)
    return root, run


def _info(spec, capsys) -> dict[str, str]:
    assert main(["info", str(spec)]) == 0
    out = capsys.readouterr().out
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\S+(?: \S+)*?)\s{2,}(.+)$", out, re.M)}


def test_a_latent_set_is_described_from_its_meta(made, capsys):
    root, _ = made
    meta = json.loads((root / "lat" / "meta.json").read_text())
    rows = _info(root / "lat", capsys)
    assert rows["images"] == "12"
    assert rows["latents (L x D)"] == "16 x 8 per image, of 32 px images"
    assert rows["classes"] == "3: a, b, c; 4 images per class"
    meta["class_counts"] = [5, 4, 3]
    (root / "lat2").mkdir(exist_ok=True)
    (root / "lat2" / "meta.json").write_text(json.dumps(meta))
    assert _info(root / "lat2", capsys)["classes"] == "3: a, b, c; 3 to 5 images per class"
    assert rows["latent mean / std"].startswith(f"{meta['latent_mean']:g} / {meta['latent_std']:g} ")
    sha1 = weights_sha1(Tokenizer.from_pretrained(root / "tok"))
    assert rows["tokenizer"] == f"{root / 'tok'} (weights sha1 {sha1[:10]}), encoded in fp32"
    assert rows["shards"] == str(len(meta["shards"]))


def test_a_generator_is_described_as_export_run_or_checkpoint(made, capsys):
    root, run = made
    model, meta = load_generator(run / "generator")
    # multiply-accumulates, as paper Tab. 1 and bench gen call GFLOPs; the shape formula, not the counter info uses
    gflops = f"{analytic_macs(model.config).total / 1e9:.4g}"
    for spec, step in ((run / "generator", 4), (run, 4), (run / "checkpoints" / "step-00000002.pt", 2)):
        rows = _info(spec, capsys)
        assert rows["generator"] == f"{spec} (step {step})"
        assert rows["objective"] == "SiT: velocity of the cosine interpolant"
        assert rows["input"] == "16 latent tokens x 8 channels (1D)"
        assert rows["transformer"] == "width 32, depth 1, heads 2, MLP ratio 4"
        assert rows["params"] == f"{model.num_parameters() / 1e6:.2f} M ({model.num_parameters():,})"
        assert rows["GFLOPs"] == f"{gflops} per image for one forward pass (multiply-accumulates, as paper Tab. 1 " \
                                 f"and bench gen count them)"
        assert rows["classes"] == "3: a, b, c"
        assert rows["guidance"].startswith("null class 3 (label dropout 0.1)")
        assert rows["latent mean / std"].startswith(f"{meta.latent_mean:g} / {meta.latent_std:g} ")
        assert rows["tokenizer"].startswith(f"{meta.tokenizer} (weights sha1 {meta.tokenizer_sha1[:10]})")


def test_a_generator_checkpoint_is_told_apart_by_name_inside_its_run_or_by_its_contents(made, tmp_path, monkeypatch,
                                                                                      capsys):
    _, run = made
    monkeypatch.chdir(run / "checkpoints")
    assert _info("step-00000002.pt", capsys)["generator"] == "step-00000002.pt (step 2)"
    copied = tmp_path / "kept.pt"  # copied out of its run
    shutil.copy(run / "checkpoints" / "step-00000004.pt", copied)
    assert _info(copied, capsys)["classes"] == "3: a, b, c"


def test_a_run_that_has_not_exported_is_described_by_its_newest_checkpoint(made, tmp_path, capsys):
    _, run = made
    unfinished = tmp_path / "run"
    shutil.copytree(run, unfinished)
    shutil.rmtree(unfinished / "generator")
    rows = _info(unfinished, capsys)
    assert rows["generator"] == f"{unfinished} (step 4, no export yet: its newest checkpoint step-00000004.pt)"
    assert rows["classes"] == "3: a, b, c"
    shutil.rmtree(unfinished / "checkpoints")  # nothing to describe: load_generator's error names the fix
    assert main(["info", str(unfinished)]) == 2
    assert "rerun the same train-generator command to finish it" in capsys.readouterr().err


def test_dit_and_mar_name_their_objectives(tmp_path, capsys):
    dit = build_generator(generator_config("dit", "S", num_tokens=4, latent_dim=2, width=16, depth=1, heads=2,
                                           num_classes=2, class_dropout=0.0))
    save_generator(dit, GeneratorMeta(objective="dit", schedule="linear", diffusion_steps=50), tmp_path / "dit")
    rows = _info(tmp_path / "dit", capsys)
    assert rows["objective"] == "DiT: noise ε and the learned variance, linear schedule, T = 50"
    assert rows["guidance"] == "trained without label dropout: no classifier-free guidance"
    assert rows["tokenizer"] == "not recorded: pass generate --tokenizer"
    assert rows["generator"] == f"{tmp_path / 'dit'}"  # saved without a step

    grid = build_generator(generator_config("sit", "S", layout="2d", grid=4, latent_dim=2, width=16, depth=1,
                                            heads=2, num_classes=2))
    save_generator(grid, GeneratorMeta(objective="sit"), tmp_path / "grid")
    assert _info(tmp_path / "grid", capsys)["input"] == "a 4x4 latent grid of 2 channels, patch 2 -> 4 tokens (2D)"

    cfg = mar_config("B", num_tokens=4, latent_dim=2, width=16, depth=1, heads=2, head_width=8, head_depth=1,
                     num_classes=2, buffer_size=2, diffusion_steps=20)
    save_generator(build_generator(cfg), GeneratorMeta(objective="mar"), tmp_path / "mar", step=7)
    rows = _info(tmp_path / "mar", capsys)
    assert rows["objective"] == "MAR: masked autoregressive, a 1-block diffusion head 8 wide (cosine schedule, T = 20)"
    assert rows["transformer"] == "width 16, depth 1 + 1 (encoder + decoder), heads 2, MLP ratio 4"
    assert rows["GFLOPs"].startswith(f"{analytic_mar_macs(cfg).total / 1e9:.4g} per image for one sampling step "
                                     f"(MAR Tab. 1's convention)")
    assert rows["generator"] == f"{tmp_path / 'mar'} (step 7)"
    assert rows["guidance"].startswith("null class 2 (label dropout 0.1)")
    # MAR keeps its null row without label dropout too, but sampling refuses guidance then
    unguided = dataclasses.replace(cfg, class_dropout=0.0)
    save_generator(build_generator(unguided), GeneratorMeta(objective="mar"), tmp_path / "mar0")
    assert _info(tmp_path / "mar0", capsys)["guidance"] == "trained without label dropout: no classifier-free guidance"


def test_save_and_unfinished_latent_sets_are_refused_by_name(made, tmp_path, capsys):
    root, run = made
    for spec in (root / "lat", run):
        assert main(["info", str(spec), "--save", str(tmp_path / "x")]) == 2
        assert "info describes it as it is (--save and overrides are for tokenizers" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(root / "lat", unfinished)
    (unfinished / "meta.json").unlink()
    (unfinished / "progress.json").write_text("{}")
    assert main(["info", str(unfinished)]) == 2
    assert "is an unfinished latent set (pretokenize was interrupted); rerun the same pretokenize command" \
        in capsys.readouterr().err


def _latent_set(folder, **meta):
    from softvq.generation.latents import FORMAT, META_NAME

    folder.mkdir()
    (folder / META_NAME).write_text(json.dumps({
        "format": FORMAT, "count": 10, "num_tokens": 16, "latent_dim": 8, "image_size": 32,
        "classes": ["a", "b"], "class_counts": [5, 5], "latent_mean": 0.5, "latent_std": 2.0,
        "tokenizer": "softvq-tiny", "shards": ["latents-00000.safetensors"], **meta}))
    return folder


def test_overrides_given_with_a_latent_set_are_refused(tmp_path, capsys):
    """Overrides given with a latent set are refused, not ignored."""
    latents = _latent_set(tmp_path / "lat")
    assert main(["info", str(latents), "model.num_tokens=4"]) == 2
    captured = capsys.readouterr()
    assert "is a latent set: info describes it as it is" in captured.err and "drop them" in captured.err
    assert captured.out == ""


def test_skipped_images_of_a_latent_set_are_reported(tmp_path, capsys):
    """A latent set's skipped (unreadable) images are counted in its images row."""
    rows = _info(_latent_set(tmp_path / "lat", skipped=["x.png: truncated", "y.png: not an image"]), capsys)
    assert rows["images"] == "10 (2 unreadable, skipped)"
    assert _info(_latent_set(tmp_path / "lat2"), capsys)["images"] == "10"
