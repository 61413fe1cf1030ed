"""Our DINOv2/DINO ViT against a naive float64 forward written from the state dict, its key
layouts, the patch-kernel resampling and the encoder initialisation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import softvq
from softvq.checkpoint.pretrained import CheckpointError
from softvq.networks.dinov2 import (
    DinoConfig, DinoViT, dino_from_state_dict, init_encoder_from_dino, load_dino, resample_patch_kernel,
)


def _random_dino(**kw) -> DinoViT:
    torch.manual_seed(0)
    cfg = DinoConfig(**{"width": 128, "depth": 2, "heads": 2, "patch_size": 14, "pos_grid": 4, **kw})
    model = DinoViT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "gamma" in name else 0.05) + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model.eval()


def _naive_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, registers: int) -> torch.Tensor:
    """Final-normed patch tokens, float64, straight from the official key layout."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    w = sd["patch_embed.proj.weight"]
    c, p = w.shape[0], w.shape[-1]
    b, _, h, wd = x.shape
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
    t = patches @ w.reshape(c, -1).t() + sd["patch_embed.proj.bias"]
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1) + sd["pos_embed"]
    if registers:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)
    d = c // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        g = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(t, (c,), g("norm1.weight"), g("norm1.bias"), 1e-6)
        q, k, v = (y @ g("attn.qkv.weight").t() + g("attn.qkv.bias")).split(c, dim=-1)
        split = lambda z: z.reshape(b, -1, heads, d).transpose(1, 2)  # noqa: E731
        att = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ split(v)
        att = att.transpose(1, 2).reshape(b, -1, c) @ g("attn.proj.weight").t() + g("attn.proj.bias")
        t = t + g("ls1.gamma") * att
        y = F.layer_norm(t, (c,), g("norm2.weight"), g("norm2.bias"), 1e-6)
        if f"blocks.{i}.mlp.w12.weight" in sd:  # ViT-g's SwiGLU
            a, gate = (y @ g("mlp.w12.weight").t() + g("mlp.w12.bias")).chunk(2, dim=-1)
            y = (F.silu(a) * gate) @ g("mlp.w3.weight").t() + g("mlp.w3.bias")
        else:
            y = F.gelu(y @ g("mlp.fc1.weight").t() + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").t() + g("mlp.fc2.bias")
        t = t + g("ls2.gamma") * y
    t = F.layer_norm(t, (c,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return t[:, 1 + registers:]


@pytest.mark.parametrize("registers", [0, 4])
def test_forward_matches_naive_float64(registers: int) -> None:
    model = _random_dino(registers=registers)
    x = torch.randn(2, 3, 56, 56)
    ours = model(x)
    assert ours["patches"].shape == (2, 16, 128) and ours["registers"].shape == (2, registers, 128)
    ref = _naive_forward(model.state_dict(), x, heads=2, registers=registers)
    torch.testing.assert_close(ours["patches"].double(), ref, rtol=1e-4, atol=1e-4)


def test_swiglu_forward_matches_naive_float64() -> None:
    """ViT-g's SwiGLU blocks run (they have no hidden / fc2 split for the fused residual)."""
    model = _random_dino(swiglu=True)
    x = torch.randn(2, 3, 56, 56)
    ref = _naive_forward(model.state_dict(), x, heads=2, registers=0)
    torch.testing.assert_close(model(x)["patches"].double(), ref, rtol=1e-4, atol=1e-4)


def test_official_file_round_trip_with_ignored_keys(tmp_path: Path) -> None:
    model = _random_dino(registers=4)
    state = {**model.state_dict(), "mask_token": torch.zeros(1, 128)}
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(state, path)
    loaded = load_dino(path)
    assert loaded.config.registers == 4 and loaded.config.depth == 2 and loaded.config.pos_grid == 4
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(loaded(x)["patches"], model(x)["patches"])


def test_transformers_layout_maps_to_the_same_network() -> None:
    model = _random_dino()
    sd = model.state_dict()
    hf = {
        "embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": torch.zeros(1, 128),
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
    }
    for i in range(2):
        b = f"blocks.{i}."
        e = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3, dim=0)
            hf[e + f"attention.attention.query.{kind}"] = q
            hf[e + f"attention.attention.key.{kind}"] = k
            hf[e + f"attention.attention.value.{kind}"] = v
            hf[e + f"attention.output.dense.{kind}"] = sd[b + f"attn.proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[e + f"{n}.{kind}"] = sd[b + f"{n}.{kind}"]
        hf[e + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        hf[e + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    loaded = dino_from_state_dict(hf)
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(loaded(x)["patches"], model(x)["patches"])


def test_dino_v1_layout_without_layerscale_and_intermediate_taps() -> None:
    model = _random_dino(layerscale=False, patch_size=16, pos_grid=14)
    assert not any("ls1" in k for k in model.state_dict())
    loaded = dino_from_state_dict({f"backbone.{k}": v for k, v in model.state_dict().items()})
    assert not loaded.config.layerscale
    taps = loaded.intermediate(torch.randn(1, 3, 224, 224), (-1, 0, 1))
    assert [t.shape for t in taps] == [(1, 197, 128)] * 3


def test_position_embedding_resize_keeps_constants_and_grid() -> None:
    model = _random_dino()
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.7
    pe = model.position_embedding((6, 5))
    assert pe.shape == (1, 31, 128)
    torch.testing.assert_close(pe[:, 1:], torch.full_like(pe[:, 1:], 0.7))
    assert model.position_embedding((4, 4)) is model.pos_embed


def test_resampled_patch_kernel_preserves_responses() -> None:
    kernel = torch.randn(5, 3, 14, 14)
    new = resample_patch_kernel(kernel, 16)
    x = torch.randn(7, 3, 14, 14)
    up = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torch.einsum("bchw,ochw->bo", up, new), torch.einsum("bchw,ochw->bo", x, kernel),
                               rtol=1e-4, atol=1e-4)


def test_encoder_initialisation_copies_blocks() -> None:
    tok = softvq.Tokenizer.from_preset("softvq-tiny")  # width 96, 3 heads, 4 blocks, patch 8
    dino = DinoViT(DinoConfig(width=96, depth=5, heads=3, patch_size=14, pos_grid=4))
    torch.nn.init.normal_(dino.blocks[2].attn.qkv.weight)
    copied = init_encoder_from_dino(tok.encoder, dino)
    assert "blocks.3" in copied and "blocks.4" not in copied
    torch.testing.assert_close(tok.encoder.blocks[2].attn.qkv.weight, dino.blocks[2].attn.qkv.weight)
    assert tok.encoder.patch_embed.weight.shape == (96, 3, 8, 8)
    assert tok.encoder.pos_embed.shape == (1, 1 + 64, 96)
    with pytest.raises(ValueError, match="same width"):
        init_encoder_from_dino(tok.encoder, _random_dino())


def test_missing_weights_message() -> None:
    with pytest.raises(CheckpointError, match="torch-hub name"):
        load_dino("no-such-file.pth")


def test_inputs_in_minus_one_to_one_are_normalised_with_imagenet_statistics():
    """[-1, 1] images → [0, 1] → (x − mean) / std with ImageNet's constants, DINOv2's preprocessing;
    the alignment target and the DINO discriminator both read images through it."""
    from softvq.networks.dinov2 import DinoConfig, DinoViT

    model = DinoViT(DinoConfig(width=128, depth=1, heads=2, patch_size=14, pos_grid=4))
    x = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = ((torch.tensor([0.0, 0.5, 1.0]) - mean) / std).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(model.normalize(x), expected)


def test_position_embeddings_resize_as_dinov2s_interpolate_pos_encoding():
    """DINOv2 resizes its M x M grid by a scale factor of (h + 0.1) / M, bicubic, without aligned
    corners; written out here on a random embedding (a constant one is the same under any resize)."""
    from softvq.networks.dinov2 import DinoConfig, DinoViT

    torch.manual_seed(0)
    model = DinoViT(DinoConfig(width=128, depth=1, heads=2, patch_size=14, pos_grid=4))
    with torch.no_grad():
        model.pos_embed.normal_()
    h, w, m = 6, 5, 4
    grid = model.pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    reference = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
    got = model.position_embedding((h, w))
    torch.testing.assert_close(got[:, 1:], reference.permute(0, 2, 3, 1).reshape(1, -1, 128))
    plain = F.interpolate(grid, size=(h, w), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 128)
    assert not torch.allclose(got[:, 1:], plain)  # the 0.1 offset changes the result
