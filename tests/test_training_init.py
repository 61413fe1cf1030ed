"""Where a run's weights start: DINO weights for the encoder (paper Sec. 4.1, Tab. 4) via
``run.init_encoder``; a whole tokenizer via ``run.init_from`` (tested with the generative decoder)."""

from __future__ import annotations

import pytest
import torch

from softvq.checkpoint.pretrained import CheckpointError
from softvq.config import BottleneckConfig, TokenizerConfig, ViTConfig
from softvq.networks.dinov2 import DinoConfig, DinoViT, dinov2_for_width
from softvq.training.config import config_from_dict, load_config
from softvq.training.trainer import Trainer


def tiny_tree(**run) -> dict:
    vit = ViTConfig(width=64, depth=2, heads=1)  # DINO files give width / 64 heads
    model = TokenizerConfig(image_size=32, patch_size=8, num_tokens=8, encoder=vit, decoder=vit,
                            bottleneck=BottleneckConfig(latent_dim=4, codebook_size=16))
    return {
        "model": model.to_dict(),
        "objective": {"perceptual_weight": 0.0, "adversarial_weight": 0.0, "alignment_weight": 0.0},
        "data": {"source": "bundled", "workers": 0, "num_eval_images": 2, "bundled_crops_per_photo": 2},
        "schedule": {"steps": 1, "batch_size": 2, "warmup_steps": 0},
        "run": {"checkpoint_every": 0, "grid_every": 0, "eval_lpips": False, "tensorboard": False,
                "progress": False, **run},
    }


def saved_dino(path, width=64, heads=1, depth=3):
    torch.manual_seed(1)
    dino = DinoViT(DinoConfig(width=width, depth=depth, heads=heads, patch_size=14, pos_grid=4))
    with torch.no_grad():
        for p in dino.parameters():
            p.normal_(0, 0.1)
    torch.save(dino.state_dict(), path)
    return dino


def test_run_starts_its_encoder_from_dino_weights(tmp_path):
    dino = saved_dino(tmp_path / "dino.pth")
    trainer = Trainer(config_from_dict(tiny_tree(init_encoder=str(tmp_path / "dino.pth"))), tmp_path / "run")
    encoder = trainer.unwrapped.encoder
    dino = dino.to(encoder.cls_token.device)  # the trainer's device (a GPU where there is one)
    for i, block in enumerate(encoder.blocks):  # 2 encoder blocks from the first 2 of 3 DINO blocks
        for name, value in block.state_dict().items():
            assert torch.equal(value, dino.blocks[i].state_dict()[name]), (i, name)
    assert torch.equal(encoder.norm.weight, dino.norm.weight)
    assert torch.equal(encoder.cls_token, dino.cls_token)
    # The decoder is untouched: it starts as a freshly initialised one.
    plain = Trainer(config_from_dict(tiny_tree()), tmp_path / "plain")
    assert torch.equal(trainer.unwrapped.decoder.blocks[0].attn.qkv.weight,
                       plain.unwrapped.decoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(trainer.unwrapped.encoder.blocks[0].attn.qkv.weight,
                           plain.unwrapped.encoder.blocks[0].attn.qkv.weight)


def test_bad_initial_weights_are_named(tmp_path):
    saved_dino(tmp_path / "wide.pth", width=128, heads=2)
    with pytest.raises(ValueError, match="cannot initialise a width-64/1-head encoder from DINO width 128"):
        Trainer(config_from_dict(tiny_tree(init_encoder=str(tmp_path / "wide.pth"))), tmp_path / "a")
    with pytest.raises(ValueError, match="no DINOv2 has the encoder's width 64"):
        Trainer(config_from_dict(tiny_tree(init_encoder="dinov2")), tmp_path / "b")
    with pytest.raises(ValueError, match="init_from and run.init_encoder both set"):
        Trainer(config_from_dict(tiny_tree(init_encoder="dinov2", init_from=str(tmp_path))), tmp_path / "c")
    # found when the config is read, so `softvq info` names it too: the README's WeTok stage 2 left
    # the preset's init_encoder=dinov2 beside init_from and failed only at `train`
    with pytest.raises(ValueError, match=r"both set: .* \(run.init_encoder=null: the SoftVQ presets start from"):
        load_config("softvq-s-64", ["model.decoder_noise_dim=8", f"run.init_from={tmp_path}"])
    assert load_config("softvq-s-64", ["model.decoder_noise_dim=8", f"run.init_from={tmp_path}",
                                       "run.init_encoder=null"]).run.init_from


def test_paper_recipe_and_table4_configs_choose_the_encoder_start():
    # The recipe starts every encoder from the DINOv2 of its width (S/14, B/14, L/14).
    assert load_config("softvq-b-64").run.init_encoder == "dinov2"
    assert [dinov2_for_width(w) for w in (384, 768, 1024)] == ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"]
    # Tab. 4 (SoftVQ-B, 64 tokens): encoder init x alignment target, DINOv2-B in both places.
    expected = {"tab4-none-none": (None, 0.0), "tab4-none-dinov2": (None, 0.1),
                "tab4-dinov2-none": ("dinov2_vitb14", 0.0), "tab4-dinov2-dinov2": ("dinov2_vitb14", 0.1)}
    for name, (init, align) in expected.items():
        cfg = load_config(name)
        assert cfg.model_preset == "softvq-b-64" and cfg.run.init_encoder == init, name
        assert cfg.objective.alignment_weight == align, name
        if align:
            assert cfg.objective.alignment_weights == "dinov2_vitb14", name


def test_an_offline_hub_download_names_the_setting_to_change(tmp_path, monkeypatch):
    """Offline, the paper configs' DINO downloads fail; the error says which key takes a local file."""
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match=r"set run\.init_encoder to that file \(or to null"):
        Trainer(config_from_dict(tiny_tree(init_encoder="dinov2_vits14")), tmp_path / "run")
