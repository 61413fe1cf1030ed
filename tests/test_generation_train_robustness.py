"""train-generator and generate given what a user may give by mistake: an --out that is not a run of
theirs, settings that make the loss non-finite, a run whose config.json was lost, a run killed mid-write,
and sampling settings that are not numbers a sampler can use."""

import dataclasses
import json
import shutil

import pytest
import torch

from softvq import Tokenizer
from softvq.cli.main import main
from softvq.generation.latent_sources import LatentSource
from softvq.generation.pretokenize import pretokenize
from softvq.generation.train import GeneratorTrainConfig, train_generator

TINY = dict(objective="sit", width=32, depth=1, heads=2, batch_size=4, checkpoint_every=2, keep_checkpoints=3,
            cpu=True)
FLAGS = ["--width", "32", "--depth", "1", "--heads", "2", "--batch-size", "4", "--cpu", "--quiet"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, run): a tiny tokenizer ``root/tok``, its latent set ``root/lat`` and a SiT run ``root/run``
    trained 4 steps. Tests that change a run copy it first."""
    root = tmp_path_factory.mktemp("robust")
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    tok.save_pretrained(root / "tok")
    g = torch.Generator().manual_seed(0)
    samples = [(torch.rand(3, 32, 32, generator=g) * 2 - 1, i % 3, f"img{i}") for i in range(12)]
    pretokenize(tok, LatentSource(iter(samples), ["a", "b", "c"], 12), root / "lat", tokenizer_spec=str(root / "tok"),
                progress=False)
    train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(root / "run"), steps=4, **TINY),
                    progress=False)
    return root, root / "run"


def train_cli(root, out, *extra):
    return main(["train-generator", "--latents", str(root / "lat"), "--out", str(out), *FLAGS, *extra])


def test_out_that_is_not_a_run_of_its_own_is_refused_untouched(made, tmp_path, capsys):
    root, run = made
    shutil.copytree(root / "tok", tmp_path / "tok")
    shutil.copytree(run, tmp_path / "run")
    tokenizer_run = tmp_path / "tokrun"  # softvq train's: config.yaml and checkpoints of a tokenizer
    (tokenizer_run / "checkpoints").mkdir(parents=True)
    (tokenizer_run / "config.yaml").write_text("model: {}\n")
    torch.save({"format": "softvq-train", "model": {"w": torch.zeros(1)}, "ema": {}, "step": 2},
               tokenizer_run / "checkpoints" / "step-00000002.pt")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.json").write_text("[]")
    cases = [
        (tmp_path / "tok", "is a tokenizer, not a train-generator run: training would overwrite its config.json"),
        (tmp_path / "run" / "generator", f"is an exported generator, not a train-generator run: training would "
                                         f"overwrite its config.json; pass a new or empty folder as --out, or its "
                                         f"run {tmp_path / 'run'} to continue that run"),
        (tokenizer_run, "is a tokenizer training run (softvq train's), not a train-generator run"),
        (root / "lat", "is a latent set (meta.json, written by pretokenize), not a train-generator run"),
        (tmp_path / "notes", "is a folder that is not a train-generator run (no config.json of one"),
        (tmp_path / "listed", "is not a train-generator run: its config.json holds a list, not a run's settings"),
    ]
    for out, named in cases:
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert train_cli(root, out, "--steps", "1") == 2, out  # was 0 (overwritten) or a torch traceback
        err = capsys.readouterr().err
        assert f"softvq train-generator: error: --out {out} {named}" in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    assert train_cli(root, tmp_path / "empty", "--steps", "1") == 0
    assert train_cli(root, tmp_path / "run", "--steps", "5") == 0  # its own run continues
