"""A train-generator run's files given to generate / eval: checkpoints by any spelling, moved, missing
or copied out of their run, and the run's milestones and config.json after a continuation."""

import json
import shutil

import pytest
import torch

from softvq import Tokenizer
from softvq.checkpoint.pretrained import CheckpointError
from softvq.cli.main import main
from softvq.generation.checkpoint import load_generator
from softvq.generation.latent_sources import LatentSource
from softvq.generation.pretokenize import pretokenize
from softvq.generation.train import GeneratorTrainConfig, train_generator
from softvq.training.checkpointing import checkpoint_path

TINY = dict(objective="sit", width=32, depth=1, heads=2, batch_size=4, checkpoint_every=2, keep_checkpoints=3,
            cpu=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, run): a tiny tokenizer, its latent set ``root/lat`` and a SiT run trained 4 steps with
    checkpoints at 2 and 4 and a milestone export at 2. Tests that change the run copy it first."""
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    tok.save_pretrained(root / "tok")
    g = torch.Generator().manual_seed(0)
    samples = [(torch.rand(3, 32, 32, generator=g) * 2 - 1, i % 3, f"img{i}") for i in range(12)]
    pretokenize(tok, LatentSource(iter(samples), ["a", "b", "c"], 12), root / "lat", tokenizer_spec=str(root / "tok"),
                progress=False)
    run = root / "run"
    train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(run), steps=4, export_at=[2], **TINY),
                    progress=False)
    return root, run


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_checkpoint_given_by_a_bare_relative_name_loads(made, monkeypatch, tmp_path, capsys):
    root, run = made
    final, _ = load_generator(run / "generator")
    monkeypatch.chdir(run / "checkpoints")
    for name in ("step-00000004.pt", "./step-00000004.pt"):  # were "a file that is not a generator checkpoint"
        assert same_weights(load_generator(name)[0], final)
    assert main(["generate", "step-00000004.pt", "--out", str(tmp_path / "s"), "--classes", "0", "--per-class", "1",
                 "--steps", "2", "--device", "cpu"]) == 0, capsys.readouterr().err
