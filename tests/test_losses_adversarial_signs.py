"""Sign and real/fake order of the GAN terms of the tokenizer objective (paper Eq. 7, supp. C.1).

The discriminator is replaced by one whose logit is a known function of the image,
D(x) = a · mean(x) + b, so the hinge losses (Lim & Ye 2017) can be written out by hand:

    L_D   = ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])     (x real, x̂ the reconstruction)
    L_adv = −E[D(x̂)]                                       (the generator's hinge loss, λ2 = 0.2)

DiffAugment, LeCAM and consistency regularisation are switched off so that nothing but the
hinge terms touches the logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

import softvq
from softvq.losses.discriminators import Discriminator
from softvq.losses.objective import ObjectiveConfig, TokenizerObjective

A, B = 1.5, 0.05  # D(x) = A · mean(x) + B
REAL = (0.8, 0.5)    # constant value of each real image (within [-1, 1])
FAKE = (-0.5, -0.9)  # constant value of each reconstruction
SIZE = 64            # softvq-tiny's image size


class MeanDiscriminator(Discriminator):
    """One logit per image: A · (mean pixel value) + B, with A and B trainable."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(A))
        self.offset = nn.Parameter(torch.tensor(B))

    def features(self, x: Tensor) -> list[Tensor]:
        return [x.mean(dim=(1, 2, 3)).unsqueeze(1)]

    def logits(self, features: list[Tensor]) -> Tensor:
        return self.scale * features[0] + self.offset


def _constant_images(values: tuple[float, ...]) -> Tensor:
    return torch.stack([torch.full((3, SIZE, SIZE), v) for v in values])


def _objective() -> tuple[softvq.Tokenizer, TokenizerObjective]:
    torch.manual_seed(0)
    tok = softvq.Tokenizer.from_preset("softvq-tiny")
    cfg = ObjectiveConfig(perceptual_weight=0.0, alignment_weight=0.0, discriminator="patchgan",
                          discriminator_start=0, diffaug=False, lecam_weight=0.0, consistency_weight=0.0)
    obj = TokenizerObjective(cfg, tok)
    obj.discriminator = MeanDiscriminator()
    assert obj.augment is None and obj.lecam is None and obj.consistency_augment is None
    return tok, obj


def _d(value: float) -> float:
    return A * value + B


def test_discriminator_hinge_puts_real_and_fake_on_their_sides() -> None:
    """L_D = ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂))) (hinge loss, supp. C.1), with the logged
    mean logits of the real and the reconstructed images the right way round, and the gradient
    on the discriminator's two parameters equal to the hand-derived one."""
    _, obj = _objective()
    real, fake = _constant_images(REAL), _constant_images(FAKE)
    loss, logs = obj.discriminator_loss(real, fake, step=0)

    d_real = [_d(v) for v in REAL]
    d_fake = [_d(v) for v in FAKE]
    relu = lambda t: max(t, 0.0)
    mean = lambda xs: sum(xs) / len(xs)
    hinge = 0.5 * (mean([relu(1 - d) for d in d_real]) + mean([relu(1 + d) for d in d_fake]))
    assert hinge == pytest.approx(0.5 * (0.2 / 2 + 0.3 / 2))  # the numbers chosen: one sample of each side clips
    assert set(logs) == {"d/hinge", "d/logits_real", "d/logits_fake", "d/loss"}
    assert logs["d/hinge"] == pytest.approx(hinge, rel=1e-6)
    assert logs["d/loss"] == pytest.approx(hinge, rel=1e-6)
    assert loss.item() == pytest.approx(hinge, rel=1e-6)
    assert logs["d/logits_real"] == pytest.approx(mean(d_real), rel=1e-6)
    assert logs["d/logits_fake"] == pytest.approx(mean(d_fake), rel=1e-6)

    # gradient by hand: d relu(1 − D)/dD = −1 where 1 − D > 0, d relu(1 + D)/dD = +1 where 1 + D > 0
    loss.backward()
    active_real = [1.0 if 1 - d > 0 else 0.0 for d in d_real]
    active_fake = [1.0 if 1 + d > 0 else 0.0 for d in d_fake]
    grad_scale = 0.5 * (mean([-k * v for k, v in zip(active_real, REAL)])
                        + mean([k * v for k, v in zip(active_fake, FAKE)]))
    grad_offset = 0.5 * (mean([-k for k in active_real]) + mean(active_fake))
    disc = obj.discriminator
    assert disc.scale.grad.item() == pytest.approx(grad_scale, rel=1e-5, abs=1e-7)
    assert disc.offset.grad.item() == pytest.approx(grad_offset, rel=1e-5, abs=1e-7)


def test_generator_adversarial_term_is_minus_the_fake_logit() -> None:
    """L_adv = −E[D(x̂)] (Eq. 7's adversarial term, hinge generator loss), weighted by λ2 = 0.2 and
    added to the total; its gradient pushes x̂ towards a higher D(x̂), and it leaves the
    discriminator's parameters without gradient."""
    tok, obj = _objective()
    real, fake = _constant_images(REAL), _constant_images(FAKE).requires_grad_()
    with torch.no_grad():
        out = tok(real)
    out = dataclasses.replace(out, reconstruction=fake)
    loss, logs = obj.generator_loss(real, out, step=0)

    d_fake = [_d(v) for v in FAKE]
    adv = -sum(d_fake) / len(d_fake)
    rec = sum((f - r) ** 2 for f, r in zip(FAKE, REAL)) / len(REAL)  # constant images: per-pixel error
    kl = out.encoding.losses["kl"].double().item()
    assert logs["adversarial"] == pytest.approx(adv, rel=1e-6)
    assert logs["adversarial"] > 0  # the reconstructions are scored as fake (D(x̂) < 0)
    assert logs["adversarial_weighted"] == pytest.approx(0.2 * adv, rel=1e-6)
    assert logs["rec"] == pytest.approx(rec, rel=1e-6)
    assert loss.item() == pytest.approx(rec + 0.01 * kl + 0.2 * adv, rel=1e-5)

    # d/dx̂ of rec + 0.2 L_adv per pixel: 2 (x̂ − x) / N − 0.2 A / N, N = every pixel of the batch
    loss.backward()
    n = fake.numel()
    for i, (f, r) in enumerate(zip(FAKE, REAL)):
        expected = 2 * (f - r) / n - 0.2 * A / n
        torch.testing.assert_close(fake.grad[i], torch.full_like(fake.grad[i], expected), rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in obj.discriminator_parameters())


def test_consistency_pairs_each_image_with_its_own_augmentation() -> None:
    """bCR (Zhao et al. 2021): L_cr = mean (D(x) − D(T(x)))² over the real and the reconstructed images,
    each against its own augmentation. With T the identity it is 0; with T adding a constant c to
    every pixel it is (A·c)², whatever the real and fake logits are."""
    tok, obj = _objective()
    obj.cfg = dataclasses.replace(obj.cfg, consistency_weight=4.0)
    real, fake = _constant_images(REAL), _constant_images(FAKE)
    for shift in (0.0, 0.1):
        obj.consistency_augment = lambda r, f, paired, c=shift: (r + c, f + c)
        loss, logs = obj.discriminator_loss(real, fake, step=0)
        assert logs["d/consistency"] == pytest.approx((A * shift) ** 2, rel=1e-5, abs=1e-12)
        assert loss.item() == pytest.approx(logs["d/hinge"] + 4.0 * (A * shift) ** 2, rel=1e-5)
