"""Discriminators for the adversarial term L_adv of paper Eq. 7.

Supplementary C.1: "Instead of using the common PatchGAN and StyleGAN architecture, we adopted
the frozen DINO-S discriminator with a similar architecture to StyleGAN, as in [99] (VAR)".
Three choices, one interface (``features`` = frozen part, ``logits`` = trainable heads):

* :class:`DinoDiscriminator` — the paper's: a frozen DINO ViT-S/16, input brought to 224 px,
  token features after the patch embedding and after blocks 2, 5, 8, 11, each read out as
  patch + cls token and scored per token by its own trainable head (five heads).
* :class:`VGGDiscriminator` — the offline substitute (no DINO weights exist on this machine):
  frozen ImageNet VGG16 activations relu2_2, relu3_3, relu4_3, relu5_3 with one trainable
  2-D head each. Not in the paper; same recipe with a backbone that is available.
* :class:`PatchGAN` — Isola et al. (2017) 70x70 PatchGAN, fully trainable, as in VQGAN.

Heads (VAR's DINO discriminator): spectral-normalised conv (kernel 1) -> norm -> LeakyReLU(0.2),
then a residual block of the same with a wider kernel (9, circular, on token sequences; 3 on
feature maps), summed with the input and scaled by 1/√2, then a spectral-normalised conv to one
logit per position. The norm is batch norm over virtual batches of 8 samples without running
statistics (VAR's "bn" option; its default SyncBatchNorm has the same statistics in one process).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from softvq.losses.frozen import FrozenHolder
from softvq.networks.dinov2 import DinoViT
from softvq.networks.vgg import LPIPS_SCALE, LPIPS_SHIFT, FeatureStack


class VirtualBatchNorm(nn.Module):
    """Per-channel normalisation over groups of ``virtual_batch`` samples and all positions:
    training-mode batch norm (biased variance, no running statistics) applied to each group.

    Each group goes through ATen's fused batch norm. Written out as mean, var and element-wise
    passes over a (groups, n, C, positions) view, forward and backward of the first VGG head
    (8 x 128 x 128 x 128) took 525 ms on the project's CPU instead of 122 ms, with the same
    float32 accuracy against float64.
    """

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.virtual_batch = virtual_batch
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        groups = math.ceil(b / self.virtual_batch)
        while b % groups:
            groups += 1
        # torch.batch_norm rather than F.batch_norm: a group of one sample at one position is
        # legal here (its output is the bias), where F.batch_norm refuses it.
        parts = [torch.batch_norm(group, self.weight, self.bias, None, None, True, 0.0, self.eps,
                                  torch.backends.cudnn.enabled)
                 for group in x.float().split(b // groups)]
        return (parts[0] if groups == 1 else torch.cat(parts)).to(x.dtype)


class Residual(nn.Module):
    """(f(x) + x) / √2."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) * (1 / math.sqrt(2))


def _conv(dims: int, cin: int, cout: int, kernel: int, circular: bool = False) -> nn.Module:
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
    pad_mode: Literal["circular", "zeros"] = "circular" if circular else "zeros"
    return spectral_norm(conv_cls(cin, cout, kernel, padding=kernel // 2, padding_mode=pad_mode))


def _conv_norm_act(dims: int, cin: int, cout: int, kernel: int, circular: bool) -> nn.Sequential:
    return nn.Sequential(_conv(dims, cin, cout, kernel, circular), VirtualBatchNorm(cout), nn.LeakyReLU(0.2))


def scoring_head(dims: int, channels: int, width: int, kernel: int, circular: bool) -> nn.Sequential:
    """One trainable head: features (B, C, *positions) -> logits (B, 1, *positions)."""
    return nn.Sequential(
        _conv_norm_act(dims, channels, width, 1, circular),
        Residual(_conv_norm_act(dims, width, width, kernel, circular)),
        _conv(dims, width, 1, 1),
    )


class Discriminator(FrozenHolder):
    """Interface: ``features(x)`` (frozen part; may be the image itself) and ``logits(features)``
    (trainable part) -> (B, M) logits; ``forward`` composes them."""

    heads: nn.ModuleList  # built by the subclasses that use this logits()

    def features(self, x: Tensor) -> list[Tensor]:
        """The frozen part: a list of feature maps of images x (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def logits(self, features: list[Tensor]) -> Tensor:
        """The trainable part: (B, M) logits from :meth:`features`, one block per head."""
        b = features[0].shape[0]
        return torch.cat([head(f).reshape(b, -1) for head, f in zip(self.heads, features)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, M) logits of images x."""
        return self.logits(self.features(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters, what the discriminator optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]


class DinoDiscriminator(Discriminator):
    """Frozen DINO ViT + five token heads (supplementary C.1, VAR's DINO-S discriminator)."""

    def __init__(
        self,
        dino: DinoViT,
        *,
        taps: tuple[int, ...] = (2, 5, 8, 11),
        input_size: int = 224,
        kernel_size: int = 9,
        random_crop: bool = True,
    ) -> None:
        super().__init__()
        self.random_crop = random_crop
        if max(taps) >= dino.config.depth:
            raise ValueError(f"DINO model has {dino.config.depth} blocks; taps {taps} are out of range")
        self.hold("backbone", dino)
        self.taps = (-1,) + tuple(taps)  # -1: right after the patch embedding
        self.input_size = input_size
        c = dino.width
        self.heads = nn.ModuleList(scoring_head(1, c, c, kernel_size, circular=True) for _ in self.taps)

    def features(self, x: Tensor) -> list[Tensor]:
        dino: DinoViT = self.frozen("backbone")  # type: ignore[assignment]
        s = self.input_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            # As in VAR/the release: larger images are, half the time in training, cropped at a
            # random place (one crop for the batch); otherwise resized (area down, bicubic up).
            if self.random_crop and self.training and h > s and w > s and torch.rand(()) < 0.5:
                top = int(torch.randint(0, h - s + 1, ()))
                left = int(torch.randint(0, w - s + 1, ()))
                x = x[..., top:top + s, left:left + s].float()
            else:
                x = F.interpolate(x.float(), size=(s, s), mode="area" if w > s else "bicubic")
        tokens = dino.intermediate(dino.normalize(x), self.taps)
        skip = 1 + dino.num_registers
        # Readout as in VAR: every patch token plus the cls token, channels first for Conv1d.
        return [(t[:, skip:] + t[:, :1]).transpose(1, 2) for t in tokens]


class VGGDiscriminator(Discriminator):
    """Frozen ImageNet VGG16 + one trainable 2-D head per tapped depth (offline substitute)."""

    shift: Tensor  # buffers registered in __init__
    scale: Tensor

    def __init__(
        self,
        vgg: FeatureStack,
        *,
        taps: tuple[int, ...] = (8, 15, 22, 29),
        width: int = 128,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.hold("backbone", vgg)
        self.taps = taps
        channels = {t: c for t, c in zip(vgg.taps, vgg.tap_channels)}
        if any(t not in channels for t in taps):
            raise ValueError(f"VGG taps must be among {vgg.taps}, got {taps}")
        self.heads = nn.ModuleList(scoring_head(2, channels[t], width, kernel_size, circular=False) for t in taps)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1), persistent=False)

    def features(self, x: Tensor) -> list[Tensor]:
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"the VGG discriminator needs images of at least 16x16, got {tuple(x.shape[-2:])}")
        vgg: FeatureStack = self.frozen("backbone")  # type: ignore[assignment]
        return vgg((x - self.shift.to(x.dtype)) / self.scale.to(x.dtype), self.taps)


class PatchGAN(Discriminator):
    """Isola et al. (2017) PatchGAN: ``layers`` stride-2 4x4 convs (64, 128, 256, ... channels),
    one stride-1 conv, then a 1-channel conv; batch norm and LeakyReLU(0.2); DCGAN init."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(width * mult), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @property
    def min_side(self) -> int:
        """Smallest image side that leaves the last conv at least one output pixel."""
        convs = [m for m in self.net if isinstance(m, nn.Conv2d)]
        side = 1
        while not self._fits(side, convs):
            side += 1
        return side

    @staticmethod
    def _fits(side: int, convs: list[nn.Conv2d]) -> bool:
        for conv in convs:
            assert not isinstance(conv.padding, str)  # PatchGAN's convs take numeric padding
            side = (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
            if side < 1:
                return False
        return True

    def features(self, x: Tensor) -> list[Tensor]:
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(f"this PatchGAN needs images of at least {self.min_side}x{self.min_side}, got "
                             f"{tuple(x.shape[-2:])}; use larger images, or another discriminator")
        return [x]

    def logits(self, features: list[Tensor]) -> Tensor:
        return self.net(features[0]).flatten(1)
