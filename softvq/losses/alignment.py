"""Representation alignment of the latent space (paper Sec. 3.3, Eq. 5–6).

Eq. 5 repeats each of the L latent tokens N/L times, so token l stands for the image positions
l·N/L … (l+1)·N/L − 1 (row-major):

    z_r = [z⁰ … z⁰, z¹ … z¹, …]            (each N/L times)

Eq. 6 aligns an MLP projection of z_r with frozen pre-trained features y* at the N positions:

    L_align = 1/N Σ_n sim(y*[n], MLP(z_r[n]))

The paper writes "sim"; as a loss to *minimise* the release uses the negative cosine
similarity (REPA's form), which is ``form="neg_cos"`` here (the default); ``form="one_minus_cos"``
is 1 − cos (same gradient, non-negative). Averaged over positions and the batch.

Because the MLP acts on each token separately, MLP(repeat(z)) = repeat(MLP(z)); we project the
L tokens and then repeat, N/L times cheaper and numerically the same (tested).

The aligned tokens are the bottleneck's output z (after SoftVQ), so the gradient reaches the
encoder, the codebook (z = q·C) and the projector. The projector is the release's MLP
d → h → h → h with SiLU, where h is the target's feature width (1024 for DINOv2-L as released).

Targets (frozen, computed under ``torch.no_grad``):

* :class:`DinoV2Target` — DINOv2 patch features (final norm). The image is resized to
  (grid_h·p, grid_w·p) so DINOv2 (patch p = 14) sees the tokenizer's own N-position grid, e.g.
  224 px -> 16x16 = 256 for a 256-px patch-16 tokenizer. (The release instead runs DINOv2-L at
  patch 16 with a resampled patch kernel on the 256-px image; ``patch_size=16`` does that here
  via :func:`softvq.networks.dinov2.resample_patch_kernel`.)
* :class:`VGGTarget` — the offline fallback: ImageNet VGG16 relu4_3 features (512-d) average-
  pooled to the N-grid. Not in the paper; used (and logged) when no DINOv2 weights are given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softvq.losses.frozen import FrozenHolder
from softvq.networks.dinov2 import DinoViT, resample_patch_kernel
from softvq.networks.vgg import LPIPS_SCALE, LPIPS_SHIFT, FeatureStack, pretrained_features

log = logging.getLogger(__name__)

DEFAULT_DINOV2 = "dinov2_vitl14"  # the release aligns with DINOv2 ViT-L (torch-hub name; online only)
VGG_TARGET_TAP = 22  # relu4_3


def repeat_tokens(latents: Tensor, num_positions: int) -> Tensor:
    """Eq. 5: (B, L, D) -> (B, N, D), each token repeated N/L times in order."""
    length = latents.shape[1]
    if num_positions % length:
        raise ValueError(
            f"alignment needs N/L to be an integer: {num_positions} image positions for {length} "
            f"latent tokens; choose num_tokens dividing the patch count"
        )
    return latents.repeat_interleave(num_positions // length, dim=1)


def cosine_alignment(prediction: Tensor, target: Tensor, form: str = "neg_cos") -> Tensor:
    """Mean over batch and positions of −cos (release) or 1 − cos."""
    cos = F.cosine_similarity(prediction.float(), target.float(), dim=-1)
    if form == "neg_cos":
        return -cos.mean()
    if form == "one_minus_cos":
        return (1 - cos).mean()
    raise ValueError(f"unknown alignment loss form {form!r}; use 'neg_cos' or 'one_minus_cos'")


class Projector(nn.Sequential):
    """The release's alignment MLP: Linear(d, h) SiLU Linear(h, h) SiLU Linear(h, out)."""

    def __init__(self, latent_dim: int, hidden: int, out: int) -> None:
        super().__init__(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out))


class AlignmentTarget(FrozenHolder):
    """Frozen features y* of images (B, 3, H, W) in [−1, 1] at a grid of positions: (B, N, C)."""

    feature_dim: int

    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        raise NotImplementedError


class DinoV2Target(AlignmentTarget):
    """DINOv2 patch features on the tokenizer's grid (see the module docstring)."""

    def __init__(self, dino: DinoViT, *, patch_size: int | None = None) -> None:
        super().__init__()
        if patch_size is not None and patch_size != dino.patch_size:
            with torch.no_grad():
                weight = dino.patch_embed.proj.weight
                new = nn.Conv2d(3, dino.width, patch_size, patch_size)
                new.weight.copy_(resample_patch_kernel(weight, patch_size))
                assert new.bias is not None and dino.patch_embed.proj.bias is not None  # both built with bias
                new.bias.copy_(dino.patch_embed.proj.bias)
            dino.patch_embed.proj = new
            dino.patch_size = patch_size
        self.hold("backbone", dino)
        self.feature_dim = dino.width

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        dino: DinoViT = self.frozen("backbone")  # type: ignore[assignment]
        p = dino.patch_size
        size = (grid[0] * p, grid[1] * p)
        x = images.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=x.shape[-1] > size[1])
        return dino(dino.normalize(x))["patches"]


class VGGTarget(AlignmentTarget):
    """Offline fallback: VGG16 relu4_3 (512-d), average-pooled to the grid."""

    feature_dim = 512
    shift: Tensor  # buffers registered in __init__
    scale: Tensor

    def __init__(self, vgg: FeatureStack) -> None:
        super().__init__()
        self.hold("backbone", vgg)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1), persistent=False)

    @staticmethod
    def pool(feature_map: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, C, h, w) -> (B, N, C) on ``grid``."""
        return F.adaptive_avg_pool2d(feature_map.float(), grid).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int], relu4_3: Tensor | None = None) -> Tensor:
        """``relu4_3``: the activation if the caller already has it (e.g. from LPIPS on the
        same image with the same scaling), so VGG is not run twice."""
        if relu4_3 is None:
            vgg: FeatureStack = self.frozen("backbone")  # type: ignore[assignment]
            relu4_3 = vgg((images - self.shift.to(images.dtype)) / self.scale.to(images.dtype), (VGG_TARGET_TAP,))[0]
        return self.pool(relu4_3, grid)


def build_alignment_target(
    kind: str,
    weights: str | Path | None = None,
    *,
    vgg: FeatureStack | None = None,
    patch_size: int | None = None,
) -> AlignmentTarget:
    """``dinov2`` (weights: local file / torch-hub name / HF id; default the release's ViT-L),
    ``vgg`` (offline), or ``auto``: dinov2 when ``weights`` are given, else vgg (logged)."""
    if kind == "auto":
        if weights is None:
            log.warning(
                "no DINOv2 weights given (objective.alignment_weights): aligning the latents with "
                "VGG16 relu4_3 features instead of the paper's DINOv2; pass a dinov2_vit*14 "
                "checkpoint file or hub id to use DINOv2"
            )
            kind = "vgg"
        else:
            kind = "dinov2"
    if kind == "dinov2":
        from softvq.networks.dinov2 import load_dino

        return DinoV2Target(load_dino(weights or DEFAULT_DINOV2,
                                      "set objective.alignment_weights to that file (or objective.alignment_target=vgg)"),
                            patch_size=patch_size)
    if kind == "vgg":
        return VGGTarget(vgg if vgg is not None else pretrained_features("vgg", weights))
    raise ValueError(f"unknown alignment target {kind!r}; use 'dinov2', 'vgg' or 'auto'")


class RepresentationAlignment(nn.Module):
    """Eq. 5–6 with a trainable projector; the target is held by the caller (frozen)."""

    def __init__(self, latent_dim: int, target_dim: int, *, hidden_dim: int | None = None, form: str = "neg_cos") -> None:
        super().__init__()
        if form not in ("neg_cos", "one_minus_cos"):
            raise ValueError(f"unknown alignment loss form {form!r}; use 'neg_cos' or 'one_minus_cos'")
        self.form = form
        self.projector = Projector(latent_dim, hidden_dim or target_dim, target_dim)

    def forward(self, latents: Tensor, target: Tensor) -> Tensor:
        """latents (B, L, D), target (B, N, C) -> scalar loss."""
        n, length = target.shape[1], latents.shape[1]
        if n % length:
            repeat_tokens(latents, n)  # raises the explanatory error
        projected = self.projector(latents)
        return cosine_alignment(projected.repeat_interleave(n // length, dim=1), target, self.form)
