"""WeTok's generative decoder (WeTok Sec. 3.3): noise channels next to each latent token, zero
input weights at the start of stage 2, and stage 2 trained from a stage-1 export."""

from __future__ import annotations

import re

import pytest
import torch

from softvq.checkpoint.pretrained import CheckpointError
from softvq.config import BottleneckConfig, TokenizerConfig, ViTConfig, preset
from softvq.tokenizer import Tokenizer
from softvq.training.config import config_from_dict
from softvq.training.trainer import Trainer

NOISE = 4


def tiny_config(width: int = 32) -> TokenizerConfig:
    vit = ViTConfig(width=width, depth=1, heads=2)
    return TokenizerConfig(image_size=32, patch_size=8, num_tokens=8, encoder=vit, decoder=vit,
                           bottleneck=BottleneckConfig(kind="softvq", latent_dim=4, codebook_size=16))


@pytest.fixture
def stage1() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(tiny_config()).eval()


def latents_of(model: Tokenizer, batch: int = 3) -> torch.Tensor:
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        return model.encode(images).latents


def open_residual_branches(model: Tokenizer) -> Tokenizer:
    """LayerScale starts at 1e-5, so a fresh decoder's output barely reads its input (real and random
    latents decode within 5e-7 of each other): set it to 1, as after training."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
    return model


def test_stage_two_starts_as_the_stage_one_decoder(stage1):
    stage1 = open_residual_branches(stage1)
    stage2 = stage1.with_generative_decoder(NOISE).eval()
    latents = latents_of(stage1)
    weight = stage2.from_latent.weight
    assert weight.shape == (32, 4 + NOISE)
    assert torch.equal(weight[:, :4], stage1.from_latent.weight) and not weight[:, 4:].any()
    with torch.no_grad():
        reference = stage1.decode(latents)
        assert not torch.allclose(stage1.decode(torch.randn_like(latents) * 3), reference, atol=1e-3)  # it reads them
        for seed in (0, 1):
            out = stage2.decode(latents, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    # [latents; z] along channels (Eq. 11), in that order: the zero columns are the noise's
    from softvq.networks.generative import decoder_input

    noise = torch.randn(*latents.shape[:-1], NOISE)
    assert torch.equal(decoder_input(latents, NOISE, noise=noise), torch.cat([latents, noise], -1))
    # Everything else is the stage-1 model, value for value.
    old = stage1.state_dict()
    assert all(torch.equal(v, old[k]) for k, v in stage2.state_dict().items() if k != "from_latent.weight")
    # ... and it is used the same way: slicing and compute precision carry over (they were dropped)
    sliced = stage1.enable_slicing(2).enable_autocast("bf16").with_generative_decoder(NOISE)
    assert (sliced.slice_size, sliced.precision) == (2, "bf16")


def test_trained_noise_weights_make_decoding_stochastic_and_seedable(stage1):
    stage2 = stage1.with_generative_decoder(NOISE).eval()
    with torch.no_grad():
        stage2.from_latent.weight[:, 4:].normal_(0, 0.5)
        # Open the residual branches (LayerScale starts at 1e-5) so the image depends on the
        # latent tokens as it does after training.
        for name, param in stage2.decoder.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
        latents = latents_of(stage1)
        a = stage2.decode(latents, generator=torch.Generator().manual_seed(0))
        b = stage2.decode(latents, generator=torch.Generator().manual_seed(0))
        c = stage2.decode(latents, generator=torch.Generator().manual_seed(1))
        # The same draw passed explicitly gives the same images: decode(z, noise) is a function.
        noise = torch.randn(3, 8, NOISE, generator=torch.Generator().manual_seed(0))
        d = stage2.decode(latents, noise=noise)
        sliced = stage2.enable_slicing(1).decode(latents, noise=noise)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    torch.testing.assert_close(d, a)
    torch.testing.assert_close(sliced, a, rtol=1e-5, atol=1e-6)


def test_bad_noise_is_named(stage1):
    latents = latents_of(stage1, batch=2)
    with pytest.raises(ValueError, match="with_generative_decoder"):
        stage1.decode(latents, noise=torch.zeros(2, 8, NOISE))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 8, 4\)"):
        stage1.with_generative_decoder(NOISE).decode(latents, noise=torch.zeros(2, 8, 3))
    with pytest.raises(ValueError, match="must exceed"):
        stage1.with_generative_decoder(0)
    with pytest.raises(ValueError, match="decoder_noise_dim"):
        TokenizerConfig(decoder_noise_dim=-1).validate()


def test_saved_generative_decoder_loads_back(stage1, tmp_path):
    stage2 = stage1.with_generative_decoder(NOISE).eval()
    with torch.no_grad():
        stage2.from_latent.weight[:, 4:].normal_(0, 0.5)
    stage2.save_pretrained(tmp_path / "gd")
    loaded = Tokenizer.from_pretrained(tmp_path / "gd").eval()
    assert loaded.config.decoder_noise_dim == NOISE
    latents = latents_of(stage1)
    noise = torch.randn(3, 8, NOISE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latents, noise=noise), stage2.decode(latents, noise=noise))


TREE = {
    "model": tiny_config().to_dict(),
    "objective": {"perceptual_weight": 0.0, "adversarial_weight": 0.0, "alignment_weight": 0.0},
    "data": {"source": "bundled", "workers": 0, "num_eval_images": 2, "bundled_crops_per_photo": 2},
    "schedule": {"steps": 3, "batch_size": 4, "warmup_steps": 1},
    "optim": {"lr": 3e-3, "scale_lr": False},
    "run": {"log_every": 1, "checkpoint_every": 0, "grid_every": 0, "eval_lpips": False,
            "tensorboard": False, "progress": False},
}


def test_stage_two_run_starts_from_the_stage_one_export(tmp_path):
    torch.set_num_threads(1)
    Trainer(config_from_dict(TREE), tmp_path / "stage1").fit()
    export = Tokenizer.from_pretrained(tmp_path / "stage1" / "export")

    tree = {**TREE, "model": {**TREE["model"], "decoder_noise_dim": NOISE},
            "run": {**TREE["run"], "init_from": str(tmp_path / "stage1" / "export")},
            "schedule": {**TREE["schedule"], "seed": 5}}  # another seed: the init must come from the file
    trainer = Trainer(config_from_dict(tree), tmp_path / "stage2")
    start = {k: v.cpu() for k, v in trainer.unwrapped.state_dict().items()}  # on a GPU the model is there
    for key, value in export.state_dict().items():
        if key == "from_latent.weight":
            assert torch.equal(start[key][:, :4], value) and not start[key][:, 4:].any()
        else:
            assert torch.equal(start[key], value), key
    trainer.fit()
    # The reconstruction loss reaches the noise inputs: stage 2 learns to use the noise.
    trained = Tokenizer.from_pretrained(tmp_path / "stage2" / "export")
    assert trained.config.decoder_noise_dim == NOISE
    assert trained.from_latent.weight[:, 4:].abs().max() > 1e-5


def test_init_from_another_architecture_names_the_mismatch(tmp_path):
    Tokenizer(tiny_config(width=64)).save_pretrained(tmp_path / "wide")
    tree = {**TREE, "run": {**TREE["run"], "init_from": str(tmp_path / "wide")}}
    with pytest.raises(CheckpointError, match="shape mismatches .*encoder") as error:
        Trainer(config_from_dict(tree), tmp_path / "run")
    assert "encoder.width 64 (this config: 32)" in str(error.value)
    missing = {**TREE, "run": {**TREE["run"], "init_from": str(tmp_path / "nowhere")}}
    with pytest.raises(CheckpointError, match="^run.init_from: no checkpoint folder at") as error:  # the setting is named
        Trainer(config_from_dict(missing), tmp_path / "run2")
    assert "relative to" not in str(error.value) and "train the run it names first" in str(error.value)


def test_a_relative_init_from_that_is_missing_says_where_it_looked(tmp_path, monkeypatch):
    # wetok-gd-s-64 ships run.init_from=runs/wetok-gq-s-64/export: found only from stage 1's directory
    monkeypatch.chdir(tmp_path)
    missing = {**TREE, "run": {**TREE["run"], "init_from": "runs/stage1/export"}}
    with pytest.raises(CheckpointError, match=f"relative to {re.escape(str(tmp_path))}\\); train the run it names"):
        Trainer(config_from_dict(missing), tmp_path / "run")


def test_stage_two_of_another_bottleneck_names_the_overrides_to_repeat():
    """Stage 2 takes the stage-1 model's settings again; one left out is named as an override."""
    lfq = tiny_config()
    lfq.bottleneck = BottleneckConfig(kind="lfq", latent_dim=4, lfq_groups=2)
    stage2 = tiny_config()
    stage2.decoder_noise_dim = NOISE
    with pytest.raises(CheckpointError, match=r"missing keys .*bottleneck\.codebook") as error:
        Tokenizer(stage2).load_weights_of(Tokenizer(lfq), "run.init_from stage1")
    message = str(error.value)
    assert "bottleneck.kind 'lfq' (this config: 'softvq')" in message
    assert "model.bottleneck.kind=lfq" in message and "model.bottleneck.lfq_groups=2" in message
    assert "decoder_noise_dim" not in message  # the one setting stage 2 is meant to change


def test_stage_two_of_a_preset_model_suggests_the_preset_not_a_partial_list():
    """A stage-1 model of the tiny preset, stage 2 configured from the S preset: six and more keys
    differ, and the one override that fixes them all is the preset."""
    stage1 = Tokenizer.from_preset("softvq-tiny")
    stage2 = preset("softvq-s-64")
    stage2.decoder_noise_dim = NOISE
    with pytest.raises(CheckpointError) as error:
        Tokenizer(stage2).load_weights_of(stage1, "run.init_from stage1")
    assert str(error.value).endswith("repeat the overrides that made it: model.preset=softvq-tiny")


def test_the_suggested_overrides_reach_stage_one_when_the_config_sets_model_keys_itself(tmp_path):
    """demo.yaml sets the encoder depth, LayerScale and distance itself, which model.preset= does
    not replace: the suggestion repeats them, and applied as given it loads stage 1."""
    from softvq.training.config import load_config

    stage1 = load_config("ablation-pq4", ["model.preset=softvq-tiny"]).model
    Tokenizer(stage1).save_pretrained(tmp_path / "stage1")
    stage2 = ["model.decoder_noise_dim=8", f"run.init_from={tmp_path / 'stage1'}", "run.tensorboard=false",
              "run.progress=false"]
    with pytest.raises(CheckpointError) as error:
        Trainer(load_config("demo", stage2), tmp_path / "run")
    suggested = str(error.value).split("repeat the overrides that made it: ")[1].split()
    assert "model.encoder.depth=4" in suggested and "model.bottleneck.distance=l2" in suggested
    trainer = Trainer(load_config("demo", stage2 + suggested), tmp_path / "run2")
    theirs = Tokenizer.from_pretrained(tmp_path / "stage1").state_dict()
    ours = trainer.tokenizer.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if ours[k].shape == theirs[k].shape)


def test_decode_names_a_generator_that_is_not_one_and_noise_given_with_a_generator():
    from softvq import Tokenizer

    tok = Tokenizer.from_preset("softvq-tiny").with_generative_decoder(4)
    z = torch.zeros(1, tok.num_tokens, tok.latent_dim)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got str"):
        tok.decode(z, generator="seed")
    noise = torch.zeros(1, tok.num_tokens, 4)
    with pytest.raises(ValueError, match="pass noise or generator, not both"):
        tok.decode(z, noise=noise, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok.decode(z, noise=noise), tok.decode(z, noise=noise))


def test_decode_continues_across_batch_sizes_only_without_decoder_noise(stage1, tmp_path, capsys):
    """A generative decoder draws each batch's noise from (seed, batch start): another --batch-size
    would make other images beside the first ones, so it stays refused; a deterministic decoder's
    images do not depend on it (see tests/test_cli_encode_decode.py)."""
    import numpy as np
    from PIL import Image

    from softvq.cli.main import main

    stage2 = stage1.with_generative_decoder(NOISE).eval()
    with torch.no_grad():
        stage2.from_latent.weight[:, 4:].normal_(0, 0.5)
    stage2.save_pretrained(tmp_path / "gd")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    latents = str(tmp_path / "z.safetensors")
    assert main(["encode", str(folder), "--model", str(tmp_path / "gd"), "--out", latents]) == 0
    assert main(["decode", latents, "--out", str(tmp_path / "out"), "--batch-size", "1"]) == 0
    capsys.readouterr()
    assert main(["decode", latents, "--out", str(tmp_path / "out"), "--batch-size", "2"]) == 2
    assert "holds a decode of other latents or options (batch_size 1 -> 2)" in capsys.readouterr().err
