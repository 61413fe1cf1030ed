"""The tokenizer's architecture (paper Sec. 3.1): shapes, what the encoder keeps, resolution changes."""

import contextlib
import copy
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import softvq
from softvq.config import BottleneckConfig, TokenizerConfig, ViTConfig
from softvq.networks.vit import Attention, patchify, reference_math, resize_grid_embed, unpatchify


def tiny(num_tokens=6, kind="softvq", image_size=32) -> softvq.Tokenizer:
    torch.manual_seed(0)
    return softvq.Tokenizer(TokenizerConfig(
        image_size=image_size, patch_size=8, num_tokens=num_tokens,
        encoder=ViTConfig(32, 2, 2), decoder=ViTConfig(32, 2, 2),
        bottleneck=BottleneckConfig(kind=kind, latent_dim=4, codebook_size=16),
    ))


@pytest.mark.parametrize("num_tokens", [1, 5, 16])
def test_any_number_of_latent_tokens(num_tokens):
    model = tiny(num_tokens)
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.encoding.latents.shape == (2, num_tokens, 4)
    assert out.reconstruction.shape == (2, 3, 32, 32)


def test_encoder_output_is_the_latent_positions_only():
    """Changing a latent token's learned query changes that token's output; the outputs are
    the last L positions of the sequence, not the image positions."""
    model = tiny().eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    enc = model.encoder
    with torch.no_grad():
        h = torch.cat([enc.cls_token + enc.pos_embed[:, :1],
                       enc.patch_embed(x).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:],
                       enc.latent_tokens + enc.latent_pos_embed], dim=1)
        for block in enc.blocks:
            h = block(h)
        expected = enc.norm(h)[:, -model.num_tokens:]
        torch.testing.assert_close(enc(x), expected)


def _values_grads_flops(model, module, forward, plain):
    """forward()'s output, the gradients of its squared sum w.r.t. ``module``'s parameters, and
    the FLOPs both took; with ``plain``, under the reference math (explicit attention, unfused)."""
    with reference_math(model) if plain else contextlib.nullcontext(), FlopCounterMode(display=False) as flops:
        out = forward()
        grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
    return out, grads, flops.get_total_flops()


@pytest.mark.parametrize("plain", [False, True], ids=["fused", "reference-math"])
def test_last_encoder_block_updating_only_the_latents_changes_nothing(plain):
    """The encoder's last block computes only the latent rows; values and gradients must equal
    running every row and slicing afterwards."""
    model = tiny().train()
    enc = model.encoder
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def every_row():
        h = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1),
                       enc.patch_embed(x).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:],
                       (enc.latent_tokens + enc.latent_pos_embed).expand(2, -1, -1)], dim=1)
        for block in enc.blocks:
            h = block(h)
        return enc.norm(h[:, -model.num_tokens:])

    got, grads, pruned = _values_grads_flops(model, enc, lambda: enc(x), plain)
    expected, expected_grads, full = _values_grads_flops(model, enc, every_row, plain)
    assert pruned < full  # the image rows of the last block were not computed
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="encoder.depth must be at least 1"):
        TokenizerConfig(image_size=32, patch_size=8, num_tokens=4, encoder=ViTConfig(32, 0, 2),
                        decoder=ViTConfig(32, 1, 2), bottleneck=BottleneckConfig(latent_dim=4)).validate()


@pytest.mark.parametrize("plain", [False, True], ids=["fused", "reference-math"])
def test_last_decoder_block_updating_only_the_image_tokens_changes_nothing(plain):
    """The decoder's last block computes only the image-token rows (cls and latents stay keys and
    values); pixels and gradients must equal running every row and slicing afterwards, also on a
    grid other than the trained one."""
    model = tiny().train()
    dec = model.decoder
    latents = torch.randn(2, model.num_tokens, model.config.decoder.width)
    for grid in (None, (3, 5)):
        g = grid or dec.grid
        n = g[0] * g[1]

        def every_row():
            pos = resize_grid_embed(dec.pos_embed[:, 1:], g)
            h = torch.cat([(dec.cls_token + dec.pos_embed[:, :1]).expand(2, -1, -1),
                           (dec.mask_token + pos).expand(2, -1, -1),
                           latents + dec.latent_pos_embed], dim=1)
            for block in dec.blocks:
                h = block(h)
            return unpatchify(dec.to_pixel(dec.norm(h)[:, 1:1 + n]), g, dec.patch_size, dec.out_channels)

        got, grads, pruned = _values_grads_flops(model, dec, lambda: dec(latents, grid), plain)
        expected, expected_grads, full = _values_grads_flops(model, dec, every_row, plain)
        assert pruned < full  # cls and latent rows of the last block were not computed
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def naive_bicubic(grid, size):
    """Separable bicubic resampling of (h, w, C) to ``size`` in float64, written out: Keys' cubic
    with a = -0.75 (PyTorch's and OpenCV's), half-pixel centres (align_corners=False), edge pixels
    repeated beyond the border."""
    import math

    def cubic(x, a=-0.75):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    def along(values, axis, out):  # resample one axis
        n = values.shape[axis]
        rows = []
        for i in range(out):
            src = (i + 0.5) * n / out - 0.5
            base = math.floor(src)
            acc = 0
            for k in range(base - 1, base + 3):
                acc = acc + cubic(src - k) * values.select(axis, min(max(k, 0), n - 1))
            rows.append(acc)
        return torch.stack(rows, axis)

    return along(along(grid.double(), 0, size[0]), 1, size[1])


def test_other_resolution_resizes_position_embeddings(monkeypatch):
    from softvq.networks import decoder, encoder

    model = tiny(image_size=32).eval()
    calls = []

    def recording(pos_embed, grid):
        calls.append((tuple(pos_embed.shape), tuple(grid)))
        return resize_grid_embed(pos_embed, grid)

    monkeypatch.setattr(encoder, "resize_grid_embed", recording)
    monkeypatch.setattr(decoder, "resize_grid_embed", recording)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 48, 64) * 2 - 1)
    assert out.reconstruction.shape == (1, 3, 48, 64)
    assert out.encoding.latents.shape == (1, 6, 4)
    # the encoder's and the decoder's trained 4x4 grids (32 px, patch 8) are resized to 6x8
    assert sorted(grid for _, grid in calls) == [(6, 8), (6, 8)]
    assert all(shape[1] == 16 for shape, _ in calls)

    torch.manual_seed(0)
    embed = torch.randn(1, 16, 5)
    resized = resize_grid_embed(embed, (6, 8))
    expected = naive_bicubic(embed.reshape(4, 4, 5), (6, 8)).reshape(1, 48, 5)  # row-major grid
    torch.testing.assert_close(resized.double(), expected, rtol=1e-5, atol=1e-6)
    shrunk = naive_bicubic(embed.reshape(4, 4, 5), (3, 2)).reshape(1, 6, 5)
    torch.testing.assert_close(resize_grid_embed(embed, (3, 2)).double(), shrunk, rtol=1e-5, atol=1e-6)
    assert torch.equal(resize_grid_embed(embed, (4, 4)), embed)  # the trained grid: unchanged


def test_explicit_attention_matches_sdpa():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 10, 32)
    fast = attn(x)
    attn.explicit = True
    torch.testing.assert_close(attn(x), fast, rtol=1e-5, atol=1e-6)


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    # second patch in row-major order is the top row, columns 4..7; channel is the fastest axis
    assert p[0, 1, 0] == x[0, 0, 0, 4] and p[0, 1, 1] == x[0, 1, 0, 4]
    torch.testing.assert_close(unpatchify(p, (2, 3), 4), x)


def test_bad_inputs_give_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="latents of shape"):
        model.decode(torch.rand(1, 7, 4))
    with pytest.raises(ValueError, match="unknown config key"):
        TokenizerConfig.from_dict({"num_tokenz": 3})
    with pytest.raises(KeyError, match="unknown preset"):
        softvq.Tokenizer.from_preset("softvq-xxl")
    with pytest.raises(ValueError, match="positive multiple of the patch size 8"):
        model.decode(torch.rand(1, 6, 4), image_size=36)  # would silently come back 32 px
    with pytest.raises(ValueError, match="slice_size must be a positive"):
        model.enable_slicing(0)  # would silently turn slicing off
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.encode([[0.0]])
    # the usual layout mistakes are named with their fix
    from softvq.data.images import to_pil

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(ValueError, match=r"images.unsqueeze\(0\)"):
        model.encode(x[0])
    with pytest.raises(ValueError, match=r"channels last: images.permute\(0, 3, 1, 2\)"):
        model.encode(x.permute(0, 2, 3, 1))
    with pytest.raises(TypeError, match=r"from a NumPy array .* torch.from_numpy"):
        model.encode(x.numpy())
    with pytest.raises(TypeError, match="from a PIL image: softvq.data.images.to_tensor"):
        model.encode(to_pil(x[0]))
    with pytest.raises(ValueError, match=r"to_pil takes one image \(3, H, W\), got \(2, 3, 32, 32\); for a batch"):
        to_pil(x)  # was a permute error from inside torch


def test_images_in_0_1_are_warned_at_the_users_line_but_not_where_softvq_loaded_them(tmp_path, capsys):
    """[0, 1] images (ToTensor's) are valid [-1, 1] values, so they gave wrong latents without a word."""
    import warnings

    from softvq.cli.main import main
    from softvq.tokenizer import images_from_softvq_loaders

    model = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    unit = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        for call in (model.encode, model.encode_latents, model.reconstruct, model):
            with pytest.warns(softvq.ImageRangeWarning, match=r"pass images \* 2 - 1") as caught:
                call(unit)
            assert caught[0].filename == __file__, call  # the user's line, not softvq's or torch's
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.encode(unit * 2 - 1)
            model.encode(torch.zeros(1, 3, 32, 32))  # a flat grey test batch
            model.encode(torch.rand(1, 3, 32, 32) * 0.5)  # ...or a dim one, no brighter than mid-grey
            with images_from_softvq_loaders():  # softvq's own loaders: a bright batch is just bright
                model.encode(unit)
            model.train().encode(unit)  # training skips the value checks (no host sync per step)
    from softvq.generation.latent_sources import LatentSource
    from softvq.generation.pretokenize import pretokenize

    own = LatentSource(iter([(unit[i], 0, f"{i}.png") for i in range(2)]), ["a"], 2)  # the caller's tensors
    with pytest.warns(softvq.ImageRangeWarning):
        pretokenize(model.eval(), own, tmp_path / "lat", progress=False)
    from PIL import Image  # the CLI reads its images: a white picture is not a mistake

    Image.new("RGB", (32, 32), "white").save(tmp_path / "white.png")
    model.eval().save_pretrained(tmp_path / "tok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["reconstruct", str(tmp_path / "white.png"), "--model", str(tmp_path / "tok"),
                     "--out", str(tmp_path / "out")]) == 0
    assert "ImageRangeWarning" not in capsys.readouterr().err


def test_inference_refuses_8_bit_values_nan_and_empty_batches_but_training_skips_the_read_back():
    model = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    assert not model.training  # from_preset gives eval mode, as from_pretrained does
    pixels = torch.randint(0, 256, (2, 3, 32, 32)).float()
    with pytest.raises(ValueError, match=r"range over \[0, 255\], like 8-bit pixels; .* images / 127.5 - 1"):
        model.encode_latents(pixels)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.encode(torch.full((1, 3, 32, 32), float("nan")))
    imagenet = (torch.rand(1, 3, 32, 32) - 0.45) / 0.225  # mean/std normalised: about [-2, 2.4]
    with pytest.raises(ValueError, match="ImageNet mean/std normalisation must be undone"):
        model.encode(imagenet)
    with pytest.raises(ValueError, match="empty batch"):
        model.encode(torch.zeros(0, 3, 32, 32))
    for mode in (model.eval, model.train):  # an aminmax error in eval mode, a convolution's in training
        with pytest.raises(ValueError, match="image size 0x32 is not a positive multiple of the patch size"):
            mode().encode(torch.zeros(1, 3, 0, 32))
    model.eval()
    with torch.no_grad():
        model.encode(torch.rand(1, 3, 32, 32) * 2.2 - 1.1)  # a resampling overshoot: not refused
        model.train().encode(pixels)  # a training step pays no host sync for the check
    with pytest.raises(ValueError, match="positive multiple of the patch size 8; got 64.0"):
        model.decode(torch.zeros(1, model.num_tokens, model.latent_dim), 64.0)
    # decode checks as encode does (it returned NaN images, an empty batch, decoded integer tensors)
    z = torch.zeros(1, model.num_tokens, model.latent_dim)
    with pytest.raises(ValueError, match="latents contain NaN"):
        model.eval().decode(z * float("nan"))
    with pytest.raises(ValueError, match="empty batch"):
        model.decode(z[:0])
    for dtype, fix in ((torch.uint8, "divide uint8 by 127.5"), (torch.int64, "pass real float images"),
                       (torch.complex64, "pass real float images")):
        with pytest.raises(TypeError, match=f"images must be floating point in \\[-1, 1\\], got {dtype}; {fix}"):
            model.encode(torch.zeros(1, 3, 32, 32, dtype=dtype))
    with pytest.raises(TypeError, match="latents must be floating point, got torch.int64"):
        model.decode(z.long())
    with pytest.raises(TypeError, match="noise must be a float tensor of shape"):
        model.with_generative_decoder(2).decode(z, noise="x")  # was an AttributeError on .shape


def test_a_kl_preset_encodes_the_same_latents_both_ways():
    tok = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, bottleneck={"kind": "kl"})
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tok.encode(x).latents, tok.encode_latents(x))  # the posterior mean, not a sample
    assert not tok.with_generative_decoder(2).training  # the copy keeps the mode


def test_inputs_on_another_device_are_named_and_other_float_dtypes_are_converted(tmp_path):
    model = tiny().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latents(x.double()), model.encode_latents(x))
        latents = model.encode_latents(x)
        torch.testing.assert_close(model.decode(latents.double()), model.decode(latents))
    elsewhere = tiny().to("meta")  # a device the inputs are not on, without needing a GPU
    with pytest.raises(ValueError, match="images are on cpu but the tokenizer is on meta"):
        elsewhere.encode(x)
    with pytest.raises(ValueError, match="latents are on cpu but the tokenizer is on meta"):
        elsewhere.decode(latents)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="cannot write a checkpoint to .*a-file: it is a file"):
        model.save_pretrained(tmp_path / "a-file")


def test_slicing_gives_the_same_latents_and_images():
    model = tiny().eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        full = model(x)
        model.enable_slicing(2)
        sliced = model(x)
    torch.testing.assert_close(sliced.encoding.latents, full.encoding.latents)
    torch.testing.assert_close(sliced.reconstruction, full.reconstruction)
    assert torch.equal(sliced.encoding.indices, full.encoding.indices)


def test_sliced_losses_weight_each_slice_by_its_images():
    # LayerScale 1, not 1e-5: a fresh encoder's output would hardly depend on the image
    model = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, bottleneck={"kind": "kl"},
                                         encoder={"depth": 1, "layerscale_init": 1.0}, decoder={"depth": 1})
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    x[4] *= 0.1  # an image whose KL differs from the others'
    with torch.no_grad():
        full = model.encode(x).losses["kl"]
        sliced = model.enable_slicing(4).encode(x).losses["kl"]  # slices of 4 and 1 images
    # the KL is a mean over images, so the weighted slice average equals it (a plain mean did not)
    torch.testing.assert_close(sliced, full)


@pytest.mark.parametrize("mlp_ratio", [4.0, 1.0])  # 1: every residual W square, so γ on the wrong axis still runs
def test_fused_residual_update_equals_the_plain_block_and_its_gradients(mlp_ratio):
    """x + γ⊙(uWᵀ + b) folded into one in-place GEMM must match the plain block, values and grads."""
    from softvq.networks.vit import Block, reference_math

    torch.manual_seed(0)
    block = Block(32, 4, mlp_ratio=mlp_ratio, layerscale_init=0.7)
    torch.nn.init.normal_(block.ls1.gamma)  # non-uniform: γ scales W's rows (a uniform γ scales
    torch.nn.init.normal_(block.ls2.gamma)  # its columns alike)
    x = torch.randn(2, 9, 32, requires_grad=True)
    fused = block(x)
    grads = torch.autograd.grad(fused.square().sum(), [x, *block.parameters()])
    with reference_math(block):
        plain = block(x)
        plain_grads = torch.autograd.grad(plain.square().sum(), [x, *block.parameters()])
    assert block.fused and not block.attn.explicit  # restored
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, plain_grads):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-5)


def test_inference_path_with_in_place_gelu_equals_the_plain_block_and_leaves_training_alone():
    """Without autograd the MLP's GELU runs in place; values must equal the plain block's, and
    with autograd on, the out-of-place GELU must be used (in place would corrupt backward)."""
    from softvq.networks.vit import Block, reference_math

    torch.manual_seed(0)
    block = Block(32, 4, layerscale_init=0.7).eval()
    x = torch.randn(2, 9, 32)
    calls = []
    block.mlp.act.register_forward_hook(lambda *a: calls.append("out-of-place"))
    with torch.inference_mode():
        fast = block(x)
        assert calls == []  # the in-place kernel ran, not the module
        with reference_math(block):
            plain = block(x)
        assert calls == ["out-of-place"]
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    block(x.requires_grad_()).sum().backward()
    assert calls == ["out-of-place"] * 2


def test_compile_wraps_the_networks_that_encode_and_decode_call():
    """nn.Module.compile alone would wrap only forward(); encode/decode must use compiled ViTs."""
    tok = softvq.Tokenizer.from_preset("softvq-tiny")
    assert tok.compile() is tok
    assert tok.encoder._compiled_call_impl is not None and tok.decoder._compiled_call_impl is not None


@pytest.mark.parametrize("kind", ["softvq", "kl"])
def test_encode_latents_equals_encode_with_and_without_slicing(kind):
    model = tiny(kind=kind).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        expected = model.encode(x).latents
        assert torch.equal(model.encode_latents(x), expected)
        model.enable_slicing(2)
        torch.testing.assert_close(model.encode_latents(x), expected)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.encode_latents(torch.zeros(1, 3, 30, 30))


def test_autocast_runs_the_vits_in_bf16_keeps_the_residual_stream_float32_and_returns_float32():
    model = tiny().eval()
    for block in [*model.encoder.blocks, *model.decoder.blocks]:  # blocks that change their input
        torch.nn.init.constant_(block.ls1.gamma, 0.5)
        torch.nn.init.constant_(block.ls2.gamma, 0.5)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    seen: dict[str, torch.dtype] = {}
    hooks = [model.encoder.blocks[0].attn.qkv, model.encoder.blocks[0], model.decoder.blocks[-1].mlp.fc1]
    for name, module in zip(("qkv", "residual", "decoder fc1"), hooks):
        module.register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out.dtype))
    with torch.inference_mode():
        plain = model.encode(x)
        plain_images = model.decode(plain.latents)
        assert seen == {"qkv": torch.float32, "residual": torch.float32, "decoder fc1": torch.float32}

        assert model.enable_autocast("bf16") is model and model.precision == "bf16"
        mixed = model.encode(x)
        mixed_latents = model.encode_latents(x)
        mixed_images = model.decode(plain.latents)
        assert seen == {"qkv": torch.bfloat16, "residual": torch.float32, "decoder fc1": torch.bfloat16}

        model.disable_autocast()
        again = model.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's own autocast: float32 out as well
            theirs = model.encode(x)
            theirs_images = model.decode(theirs.latents)
    assert (theirs.features.dtype, theirs.latents.dtype, theirs_images.dtype) == (torch.float32,) * 3  # was bf16
    for out in (mixed.latents, mixed.features, mixed_latents, mixed_images):
        assert out.dtype == torch.float32
    assert torch.equal(mixed_latents, mixed.latents)
    # bf16 keeps ~3 significant digits: close to float32, yet not float32 itself.
    for fast, exact in ((mixed.features, plain.features), (mixed_images, plain_images)):
        error = (fast - exact).norm() / exact.norm()
        assert 1e-5 < error < 2e-2, error
    assert torch.equal(again.features, plain.features) and model.precision == "fp32"


def test_enable_autocast_rejects_what_autocast_cannot_run():
    model = tiny()
    with pytest.raises(ValueError, match="unknown precision 'fp64'; use one of fp32, bf16, fp16"):
        model.enable_autocast("fp64")
    with pytest.raises(ValueError, match=r"torch.bfloat16 or torch.float16 \(torch.float32 turns it off\)"):
        model.enable_autocast(torch.float64)
    with pytest.raises(ValueError, match="not None"):
        model.enable_autocast(None)
    assert model.enable_autocast(torch.float16).precision == "fp16"
    assert model.enable_autocast("bfloat16").precision == "bf16"  # torch's name too, not only "bf16"
    assert model.enable_autocast("fp32").precision == "fp32" and model.compute_dtype == torch.float32
    assert model.enable_autocast("bf16").enable_autocast(torch.float32).precision == "fp32"



@pytest.mark.parametrize("hardware", [False, True])
def test_low_precision_on_a_cpu_that_emulates_it_is_warned_once(monkeypatch, caplog, hardware):
    """Without AMX or AVX512-BF16 torch emulates bf16, several times slower than float32: the Python
    API says so at the first low-precision pass, as the CLI does, and once per tokenizer."""
    from softvq import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "cpu_has_matrix_instructions", lambda precision: hardware)
    model = tiny().enable_autocast("bf16")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with caplog.at_level("WARNING", logger="softvq.tokenizer"), torch.no_grad():
        model.decode(model.encode_latents(x))
        model.encode_latents(x)
    said = [r.getMessage() for r in caplog.records if "matrix instructions" in r.getMessage()]
    assert said == ([] if hardware else [said[0]])
    if not hardware:
        assert "no bf16 matrix instructions" in said[0] and "disable_autocast()" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="softvq.tokenizer"), torch.no_grad():
        model.disable_autocast().encode_latents(x)  # float32: nothing emulated
    assert not caplog.records


def test_tensors_made_in_inference_mode_get_a_clear_error_when_gradients_are_on():
    """The README encodes under torch.inference_mode(); feeding those latents (or reconstructions)
    back with gradients on failed deep inside torch ("Inference tensors cannot be saved for backward")."""
    model = tiny()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        z, rec = model.encode_latents(x), model.reconstruct(x)
    with pytest.raises(ValueError, match=r"latents were made under torch.inference_mode\(\).*latents.clone\(\)"):
        model.decode(z)
    with pytest.raises(ValueError, match=r"images were made under torch.inference_mode\(\)"):
        model.encode(rec)
    with torch.no_grad():  # what the error suggests works, and so do clones
        assert torch.equal(model.decode(z), model.decode(z.clone()))
    assert model.decode(z.clone()).requires_grad
    model.requires_grad_(False)  # a frozen tokenizer records nothing: no error
    assert model.decode(z).shape == (2, 3, 32, 32)
    generative = tiny().with_generative_decoder(2)  # its decoder input is a fresh concatenation: it works
    assert generative.decode(z).requires_grad

def test_constructing_from_the_wrong_type_names_the_right_one():
    with pytest.raises(TypeError, match="for a named preset use Tokenizer.from_preset"):
        softvq.Tokenizer("softvq-tiny")
    with pytest.raises(TypeError, match="image_size must be an integer, got '64'"):
        softvq.Tokenizer.from_preset("softvq-tiny", image_size="64")
    with pytest.raises(TypeError, match="encoder must be a ViTConfig, got dict; .*TokenizerConfig.from_dict"):
        softvq.Tokenizer(TokenizerConfig(encoder={"width": 96}))
    with pytest.raises(TypeError, match="config section encoder must be a mapping, got 64"):
        TokenizerConfig.from_dict({"encoder": 64})
    # nested fields are checked too (these used to fail inside torch.randn / empty, or compare a str)
    with pytest.raises(TypeError, match="bottleneck.temperature must be a finite number, got '0.07'"):
        softvq.Tokenizer.from_preset("softvq-tiny", bottleneck={"temperature": "0.07"})
    with pytest.raises(TypeError, match="encoder.norm_eps must be a finite number, got '1e-6'"):
        softvq.Tokenizer.from_preset("softvq-tiny", encoder={"norm_eps": "1e-6"})
    with pytest.raises(ValueError, match="encoder.mlp_ratio and encoder.norm_eps must be positive, got 0"):
        softvq.Tokenizer.from_preset("softvq-tiny", encoder={"mlp_ratio": 0})
    # whole numbers written as floats (as YAML and JSON may) are taken as the integers they are
    tok = softvq.Tokenizer.from_preset("softvq-tiny", bottleneck={"codebook_size": 64.0}, encoder={"width": 96.0})
    assert tok.config.bottleneck.codebook_size == 64 and type(tok.config.encoder.width) is int
    built = TokenizerConfig(encoder=dataclasses.replace(tok.config.encoder, depth=2.0)).validate()
    assert type(built.encoder.depth) is int
    config = softvq.Tokenizer.from_preset("softvq-tiny").config.to_dict()
    assert softvq.Tokenizer(config).config == TokenizerConfig.from_dict(config)  # a dict is taken as its config


@pytest.mark.parametrize("kind", ["softvq", "gmmvq", "vq", "kl", "lfq", "ae"])
def test_latents_and_images_come_back_in_float32_or_in_a_float64_models_precision(kind):
    bottleneck = {"kind": kind, **({"lfq_groups": 2} if kind == "lfq" else {})}
    torch.manual_seed(0)
    model = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, bottleneck=bottleneck,
                                         encoder={"depth": 1}, decoder={"depth": 1})
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = model.encode(x).latents
    wide = copy.deepcopy(model).double()  # float64 for gradient checks: the bottleneck used to drop to float32
    latents = wide.encode(x.double()).latents
    assert latents.dtype == wide.decode(latents).dtype == torch.float64
    torch.testing.assert_close(latents.float(), reference, atol=1e-5, rtol=1e-5)
    narrow = copy.deepcopy(model).bfloat16()  # bf16 weights: the bottleneck (and the LFQ codes) in float32
    latents = narrow.encode(x).latents
    assert latents.dtype == narrow.decode(latents).dtype == torch.float32


def test_every_loader_says_where_the_weights_came_from(tmp_path):
    tok = softvq.Tokenizer.from_preset("softvq-tiny", encoder={"depth": 1}, decoder={"depth": 1})
    assert tok.source == "preset softvq-tiny (random weights, untrained)" and tok.ignored_keys == []
    tok.save_pretrained(tmp_path / "ckpt")
    assert softvq.Tokenizer.from_pretrained(tmp_path / "ckpt").source == f"softvq checkpoint {tmp_path / 'ckpt'}"
    assert tok.with_generative_decoder(2).source == tok.source


def test_code_indices_decode_to_the_images_of_their_latents():
    """VQ and LFQ (WeTok GQ) users keep indices, for an autoregressive model on them."""
    for bottleneck in ({"kind": "vq"}, {"kind": "lfq", "lfq_groups": 2}):
        tok = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, bottleneck=bottleneck)
        with torch.inference_mode():
            enc = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
            torch.testing.assert_close(tok.decode_indices(enc.indices), tok.decode(enc.latents), rtol=0, atol=1e-5)
            with pytest.raises(TypeError, match="for LFQ / VQ code indices use decode_indices"):
                tok.decode(enc.indices)  # was a shape error that hid this hint
    softvq_tok = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32)
    with torch.inference_mode(), pytest.raises(TypeError, match="SoftVQ and GMMVQ latents are softmax-weighted"):
        softvq_tok.decode_indices(softvq_tok.encode(torch.rand(1, 3, 32, 32) * 2 - 1).indices)


def test_a_tokenizer_keeps_its_own_config():
    """Tokenizer(softvq.PRESETS[name]) shared the preset's object: editing tok.config changed the
    preset for every later tokenizer."""
    shared = softvq.PRESETS["softvq-tiny"]
    size = shared.image_size
    tok = softvq.Tokenizer(shared)
    tok.config.image_size = size * 2
    tok.config.encoder.depth += 1
    assert shared.image_size == size and softvq.Tokenizer.from_preset("softvq-tiny").config == shared
