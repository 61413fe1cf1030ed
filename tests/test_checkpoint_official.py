"""The released-checkpoint converter against shared/reference/official-checkpoint-format.md.

A state dict in the release's key layout is built here from the documented shapes (tiny widths,
random values), converted, loaded strictly, and its reconstruction compared with a naive float64
forward pass written from the doc's "forward semantics" section, independent of softvq's modules.
"""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from softvq import Tokenizer, preset
from softvq.checkpoint.official import convert_official, infer_config, load_official, official_key
from softvq.checkpoint.pretrained import CheckpointError, load_pretrained

# --- a state dict in the released layout -------------------------------------------------------


def _block_shapes(prefix: str, width: int, depth: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        b = f"{prefix}.blocks.{i}."
        shapes.update({
            b + "norm1.weight": (width,), b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "ls1.gamma": (width,),
            b + "norm2.weight": (width,), b + "norm2.bias": (width,),
            b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
            b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,),
            b + "ls2.gamma": (width,),
        })
    shapes[f"{prefix}.norm.weight"] = (width,)
    shapes[f"{prefix}.norm.bias"] = (width,)
    return shapes


def released_shapes(*, enc: tuple[int, int], dec: tuple[int, int], image: int, patch: int,
                    tokens: int, dim: int, books: int, codewords: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape exactly as listed in the doc's "Key names" section (S-64 example)."""
    (ew, ed), (dw, dd) = enc, dec
    n = (image // patch) ** 2
    shapes = {
        "encoder.latent_tokens": (1, tokens, ew),
        "encoder.latent_pos_embed": (1, tokens, ew),
        "encoder.model.cls_token": (1, 1, ew),
        "encoder.model.pos_embed": (1, n + 1, ew),
        "encoder.model.patch_embed.proj.weight": (ew, 3, patch, patch),
        "encoder.model.patch_embed.proj.bias": (ew,),
        **_block_shapes("encoder.model", ew, ed),
        "quant_conv.weight": (dim, ew), "quant_conv.bias": (dim,),
        "quantize.embedding": (books, codewords, dim),
        "quantize.codebook_used": (books, 65536),
        "post_quant_conv.weight": (dw, dim), "post_quant_conv.bias": (dw,),
        "decoder.mask_token": (1, 1, dw),
        "decoder.latent_pos_embed": (1, tokens, dw),
        "decoder.model.cls_token": (1, 1, dw),
        "decoder.model.pos_embed": (1, n + 1, dw),
        "decoder.model.patch_embed.proj.weight": (dw, 3, patch, patch),
        "decoder.model.patch_embed.proj.bias": (dw,),
        **_block_shapes("decoder.model", dw, dd),
        "decoder.to_pixel.model.weight": (3 * patch * patch, dw),
        "decoder.to_pixel.model.bias": (3 * patch * patch,),
    }
    return shapes


def random_released_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values at scales that keep every part of the forward pass active."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        if key.endswith("codebook_used"):
            x = torch.randint(0, 100, shape, generator=g).float()
        elif key.endswith("gamma"):
            x = 0.5 + 0.5 * torch.rand(shape, generator=g)  # LayerScale well away from 1e-5
        elif ".norm" in key and key.endswith("weight"):
            x = 1 + 0.1 * x
        elif key.endswith("bias"):
            x = 0.1 * x
        elif key.endswith("weight"):
            x = x / math.sqrt(math.prod(shape[1:]))
        elif key != "quantize.embedding":
            x = 0.5 * x
        state[key] = x.contiguous()
    return state


TINY = dict(enc=(128, 2), dec=(192, 2), image=32, patch=8, tokens=8, dim=4, codewords=16)


SEGMENTS = [1, 4]  # one codebook, or the release's per-sequence-segment codebooks (bottleneck.parts)


def write_release(folder: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def tiny_release(tmp_path: Path, books: int, *, tau: float = 0.07, extras: bool = True,
                 name: str = "release") -> tuple[Path, dict[str, torch.Tensor], dict]:
    state = random_released_state(released_shapes(**TINY, books=books))
    if extras:  # alignment projector and frozen target encoder of an alignment-trained checkpoint
        g = torch.Generator().manual_seed(1)
        state.update({"projection.0.weight": torch.randn(32, 4, generator=g), "projection.0.bias": torch.zeros(32),
                      "repa_model.blocks.0.norm1.weight": torch.ones(16)})
    config = {"image_size": 32, "codebook_size": 16, "codebook_embed_dim": 4, "codebook_l2_norm": True,
              "tau": tau, "num_codebooks": books, "num_latent_tokens": 8, "enc_type": "vit",
              "dec_type": "vit", "enc_patch_size": 8, "dec_patch_size": 8, "vq_mean": 0.25, "vq_std": 1.75}
    return write_release(tmp_path / name, state, config), state, config


# --- an independent naive forward pass from the doc ---------------------------------------------


def _ln(x, sd, key):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * sd[key + ".weight"] + sd[key + ".bias"]


def _linear(x, sd, key):
    return x @ sd[key + ".weight"].t() + sd[key + ".bias"]


def _block(x, sd, key, heads):
    width = x.shape[-1]
    hd = width // heads
    qkv = _linear(_ln(x, sd, key + ".norm1"), sd, key + ".attn.qkv")
    q, k, v = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
    outs = []
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hd), dim=-1)
        outs.append(w @ v[..., s])
    x = x + sd[key + ".ls1.gamma"] * _linear(torch.cat(outs, -1), sd, key + ".attn.proj")
    hidden = _linear(_ln(x, sd, key + ".norm2"), sd, key + ".mlp.fc1")
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + sd[key + ".ls2.gamma"] * _linear(hidden, sd, key + ".mlp.fc2")


def reference_reconstruction(sd: dict[str, torch.Tensor], images: torch.Tensor, *, patch: int,
                             enc_heads: int, dec_heads: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The doc's forward semantics in float64: returns (z_q (n, L, D), image (n, 3, H, W))."""
    sd = {k: v.double() for k, v in sd.items()}
    x = images.double()
    n, c, height, width = x.shape
    gh, gw = height // patch, width // patch
    # patchify with the stride-p conv, row-major patch order
    tiles = x.reshape(n, c, gh, patch, gw, patch)
    w = sd["encoder.model.patch_embed.proj.weight"]
    tok = torch.einsum("ncipjq,ocpq->nijo", tiles, w).reshape(n, gh * gw, -1)
    tok = tok + sd["encoder.model.patch_embed.proj.bias"]
    pos = sd["encoder.model.pos_embed"]
    cls = (sd["encoder.model.cls_token"] + pos[:, :1]).expand(n, -1, -1)
    lat = (sd["encoder.latent_tokens"] + sd["encoder.latent_pos_embed"]).expand(n, -1, -1)
    seq = torch.cat([cls, tok + pos[:, 1:], lat], 1)
    depth = len({k.split(".")[3] for k in sd if k.startswith("encoder.model.blocks.")})
    for i in range(depth):
        seq = _block(seq, sd, f"encoder.model.blocks.{i}", enc_heads)
    length = sd["encoder.latent_tokens"].shape[1]
    z = _linear(_ln(seq, sd, "encoder.model.norm")[:, -length:], sd, "quant_conv")
    # released bottleneck: l2-normalised cosine logits / tau, one codebook per sequence segment
    books = sd["quantize.embedding"]
    seg = length // books.shape[0]
    zq = torch.empty_like(z)
    for s in range(books.shape[0]):
        part = z[:, s * seg:(s + 1) * seg]
        cb = books[s] / books[s].norm(dim=-1, keepdim=True)
        zn = part / part.norm(dim=-1, keepdim=True)
        zq[:, s * seg:(s + 1) * seg] = torch.softmax(zn @ cb.t() / tau, dim=-1) @ cb
    # decoder: [cls, N mask tokens, L latents], keep outputs 1..N
    h = _linear(zq, sd, "post_quant_conv")
    pos = sd["decoder.model.pos_embed"]
    cls = (sd["decoder.model.cls_token"] + pos[:, :1]).expand(n, -1, -1)
    masks = (sd["decoder.mask_token"] + pos[:, 1:]).expand(n, -1, -1)
    seq = torch.cat([cls, masks, h + sd["decoder.latent_pos_embed"]], 1)
    depth = len({k.split(".")[3] for k in sd if k.startswith("decoder.model.blocks.")})
    for i in range(depth):
        seq = _block(seq, sd, f"decoder.model.blocks.{i}", dec_heads)
    out = _linear(_ln(seq, sd, "decoder.model.norm")[:, 1:1 + gh * gw], sd, "decoder.to_pixel.model")
    # unpatchify (n, h, w, p, q, c) -> (n, c, h*p, w*q)
    out = out.reshape(n, gh, gw, patch, patch, c)
    img = torch.einsum("nhwpqc->nchpwq", out).reshape(n, c, gh * patch, gw * patch)
    return zq, img


def test_fixture_has_the_documented_key_counts():
    """The fixture's key inventory matches the doc: S and B 360 keys, BL 528, L 696."""
    common = dict(image=32, patch=8, tokens=8, dim=4, books=4, codewords=16)
    assert len(released_shapes(enc=(64, 12), dec=(64, 12), **common)) == 360
    assert len(released_shapes(enc=(64, 12), dec=(64, 24), **common)) == 528
    assert len(released_shapes(enc=(64, 24), dec=(64, 24), **common)) == 696


@pytest.mark.parametrize("books", SEGMENTS)
def test_converted_release_matches_naive_reference(tmp_path, books):
    torch.manual_seed(0)
    folder, state, _ = tiny_release(tmp_path, books)
    model = load_official(folder)
    assert model.config.bottleneck.segments == books
    assert (model.config.encoder.heads, model.config.decoder.heads) == (2, 3)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ref_z, ref_img = reference_reconstruction(state, images, patch=8, enc_heads=2, dec_heads=3, tau=0.07)
    with torch.inference_mode():
        enc = model.encode(images)
        recon = model.decode(enc.latents)
    # The codebook mixture is far from a single codeword, so this checks the softmax, not just argmax.
    assert ref_z.std() > 0.1
    torch.testing.assert_close(enc.latents.double(), ref_z, atol=2e-5, rtol=0)
    assert recon.std() > 0.1
    torch.testing.assert_close(recon.double(), ref_img, atol=1e-4, rtol=0)


@pytest.mark.parametrize("books", SEGMENTS)
def test_segment_codebooks_are_not_interchangeable(tmp_path, books):
    """Swapping segment codebooks (or permuting the channels of the only one) changes the reference output,
    so the match above really depends on quantize.embedding[s] reaching segment s."""
    _, state, _ = tiny_release(tmp_path, books)
    swapped = dict(state)
    emb = state["quantize.embedding"].clone()
    swapped["quantize.embedding"] = emb.flip(0) if books > 1 else emb.roll(1, dims=2)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    kw = dict(patch=8, enc_heads=2, dec_heads=3, tau=0.07)
    a = reference_reconstruction(state, images, **kw)[1]
    b = reference_reconstruction(swapped, images, **kw)[1]
    assert (a - b).abs().max() > 1e-2


def test_reads_tau_and_latent_statistics_from_config_json(tmp_path):
    folder, _, _ = tiny_release(tmp_path, 1, tau=0.1)
    model = load_official(folder)
    assert model.config.bottleneck.temperature == pytest.approx(0.1)
    assert model.config.bottleneck.distance == "cosine"
    assert model.config.bottleneck.detach_codebook_in_logits is True
    assert model.config.bottleneck.entropy_temperature == pytest.approx(0.01)
    assert (model.latent_mean, model.latent_std) == (0.25, 1.75)
    assert float(model.bottleneck.temperature) == pytest.approx(0.1)


@pytest.mark.parametrize("field, value", [("tau", None), ("vq_mean", None), ("vq_std", "x")])
def test_a_config_json_number_that_is_not_one_is_named(tmp_path, field, value):
    folder, _, config = tiny_release(tmp_path, 1)
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError, match=f"config.json: {field} must be a number, got {json.dumps(value)}"):
        load_official(folder)  # a null was a TypeError traceback; a string named neither file nor field


def test_lists_the_keys_it_ignores(tmp_path):
    folder, _, _ = tiny_release(tmp_path, 1)
    model = load_official(folder)
    assert model.ignored_keys == sorted([
        "decoder.model.patch_embed.proj.bias", "decoder.model.patch_embed.proj.weight",
        "projection.0.bias", "projection.0.weight", "quantize.codebook_used",
        "repa_model.blocks.0.norm1.weight",
    ])


@pytest.mark.parametrize("drop", ["encoder.model.blocks.1.attn.proj.bias", "decoder.to_pixel.model.bias",
                                  "encoder.latent_pos_embed", "post_quant_conv.weight",
                                  "decoder.model.blocks.0.ls2.gamma"])
def test_missing_key_is_named_in_the_release_spelling(tmp_path, drop):
    folder, state, config = tiny_release(tmp_path, 1)
    del state[drop]
    write_release(folder, state, config)
    with pytest.raises(CheckpointError, match=f"'?{drop.replace('.', '[.]')}'?"):
        load_official(folder)


def test_a_mis_shaped_key_is_named_in_the_release_spelling(tmp_path):
    folder, state, config = tiny_release(tmp_path, 1)
    state["post_quant_conv.weight"] = state["post_quant_conv.weight"][:, :2].contiguous()
    write_release(folder, state, config)
    with pytest.raises(CheckpointError, match=r"shape mismatches post_quant_conv[.]weight: file \(192, 2\)"):
        load_official(folder)  # it said from_latent.weight, a name the user's file does not have


@pytest.mark.parametrize("extra", ["encoder.model.blocks.0.attn.q_norm.weight", "discriminator.head.weight"])
def test_unexpected_key_is_named(tmp_path, extra):
    folder, state, config = tiny_release(tmp_path, 1)
    state[extra] = torch.zeros(3)
    write_release(folder, state, config)
    with pytest.raises(CheckpointError, match="unexpected keys " + extra.replace(".", "[.]")):
        load_official(folder)


def test_missing_codebook_is_a_clear_error(tmp_path):
    folder, state, config = tiny_release(tmp_path, 1)
    del state["quantize.embedding"]
    write_release(folder, state, config)
    with pytest.raises(CheckpointError, match="quantize.embedding"):
        load_official(folder)


def test_convert_then_load_ours_is_bit_identical(tmp_path):
    folder, _, _ = tiny_release(tmp_path, 1)
    original = load_official(folder)
    out = convert_official(folder, tmp_path / "ours")
    again = load_pretrained(out)
    a, b = original.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again.latent_mean, again.latent_std) == (0.25, 1.75)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(original.reconstruct(x), again.reconstruct(x))


def test_a_pickled_release_loads_and_a_folder_without_weights_is_named(tmp_path):
    folder, state, _ = tiny_release(tmp_path, 2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    release = load_official(folder)
    assert release.source == f"released SoftVQ-VAE checkpoint {folder}" and "projection.0.weight" in release.ignored_keys
    expected = release.reconstruct(x)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # what PyTorchModelHubMixin wrote before safetensors
    assert torch.equal(load_official(folder).reconstruct(x), expected)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"holds no model.safetensors or pytorch_model.bin \(it holds: config.json\)"):
        load_official(folder)


def test_hub_id_goes_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    folder, _, _ = tiny_release(tmp_path, 1)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: asked.append((repo, allow_patterns)) or str(folder))
    model = Tokenizer.from_official("SoftVQVAE/softvq-test")
    assert asked == [("SoftVQVAE/softvq-test", ["config.json", "model.safetensors", "pytorch_model.bin"])]
    assert model.num_tokens == 8

    def offline(repo, allow_patterns):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="offline") as err:
        Tokenizer.from_official("SoftVQVAE/softvq-test")
    assert "\n" not in str(err.value)


# Shapes of the eight releases, typed in from the doc's table (not read from softvq's presets).
RELEASES = {
    "softvq-s-64": ((384, 12), (384, 12), 256, 16, 64, 32),
    "softvq-s-32": ((384, 12), (384, 12), 256, 16, 32, 64),
    "softvq-b-64": ((768, 12), (768, 12), 256, 16, 64, 32),
    "softvq-b-32": ((768, 12), (768, 12), 256, 16, 32, 64),
    "softvq-bl-64": ((768, 12), (1024, 24), 256, 16, 64, 32),
    "softvq-l-32": ((1024, 24), (1024, 24), 256, 16, 32, 64),
    # 512 px: patch 16 (a 32x32 grid), the size the hub files' byte counts fit (see softvq.config).
    "softvq-bl-64-512": ((768, 12), (1024, 24), 512, 16, 64, 32),
    "softvq-l-32-512": ((1024, 24), (1024, 24), 512, 16, 32, 64),
}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_inferred_config_of_each_release_equals_our_preset(name):
    """Shapes only (meta tensors): the converter recovers exactly our preset from a release layout."""
    enc, dec, image, patch, tokens, dim = RELEASES[name]
    shapes = released_shapes(enc=enc, dec=dec, image=image, patch=patch, tokens=tokens, dim=dim,
                             books=4, codewords=8192)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert infer_config(state, {"tau": 0.07}).to_dict() == preset(name).to_dict()


def test_a_release_cut_after_a_block_is_refused(tmp_path):
    """Depth comes from the highest block number: a file missing S's last encoder block loaded as an
    11-block model, with only a warning."""
    shapes = released_shapes(enc=(384, 11), dec=(384, 12), image=32, patch=16, tokens=4, dim=4, books=1,
                             codewords=8)
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    with pytest.raises(CheckpointError, match="encoder depth 11 and decoder depth 12, but the released model of "
                                              "these widths has 12 and 12: the file lacks whole blocks"):
        infer_config(state)
    assert infer_config(state, other_depths=True).encoder.depth == 11  # a model trained at other depths
    folder = write_release(tmp_path / "cut", random_released_state(shapes), {"tau": 0.07})
    with pytest.raises(CheckpointError, match="the file lacks whole blocks"):
        Tokenizer.from_official(folder)
    assert Tokenizer.from_official(folder, other_depths=True).config.encoder.depth == 11
    assert infer_config(random_released_state(released_shapes(**TINY, books=1))).encoder.depth == TINY["enc"][1]


def test_config_json_shapes_that_contradict_the_weights_are_said(tmp_path, caplog):
    folder, _, config = tiny_release(tmp_path, 1)
    (folder / "config.json").write_text(json.dumps({**config, "codebook_size": 16384, "num_latent_tokens": 32}))
    with caplog.at_level("WARNING"):
        model = load_official(folder)
    assert model.config.bottleneck.codebook_size == 16 and model.num_tokens == 8  # the weights decide
    assert "config.json says codebook_size 16384 but the weights have 16" in caplog.text
    assert "config.json says num_latent_tokens 32 but the weights have 8" in caplog.text


def test_config_json_values_are_checked_as_softvqs_own_are(tmp_path, caplog):
    """Was: vq_std 0 loaded (and divided by zero downstream), image_size "big" ended in a bare
    int() error naming no field, and "8" for 8 warned that the weights disagreed with 8."""
    folder, _, config = tiny_release(tmp_path, 1)
    (folder / "config.json").write_text(json.dumps({**config, "vq_std": 0}))
    with pytest.raises(CheckpointError, match=r"^config.json: vq_mean / vq_std must be a finite mean and a positive "
                                              r"std, got 0.25 and 0.0; fix or remove them"):
        load_official(folder)
    (folder / "config.json").write_text(json.dumps({**config, "image_size": "big", "num_latent_tokens": "8"}))
    with caplog.at_level("WARNING"):
        model = load_official(folder)
    assert model.config.image_size == 32 and (model.latent_mean, model.latent_std) == (0.25, 1.75)
    assert 'config.json says image_size "big" but the position embeddings are for 32 px' in caplog.text
    assert "num_latent_tokens" not in caplog.text
    # the fields that change the forward pass but no tensor: were ignored, so the outputs would be wrong
    for field, value in (("use_rope", True), ("dec_cls_token", False), ("to_pixel", "conv")):
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(CheckpointError, match=f"^config.json: {field} {json.dumps(value)}: this checkpoint's "
                                                  f"forward pass is not the released SoftVQ-VAE's"):
            load_official(folder)
    (folder / "config.json").write_text(json.dumps({**config, "use_rope": False, "use_ape": True, "to_pixel": "linear"}))
    load_official(folder)  # the released values load


def test_one_block_of_another_mlp_width_is_the_block_named(tmp_path):
    """Was: the MLP width came from block 0 alone, so a bad block 0 blamed every other block."""
    folder, state, config = tiny_release(tmp_path, 1)
    state["encoder.model.blocks.0.mlp.fc1.weight"] = torch.zeros(100, 128)
    write_release(folder, state, config)
    with pytest.raises(CheckpointError, match=r"^encoder.model.blocks.0.mlp.fc1.weight has 100 rows where 1 of the "
                                              r"2 blocks have 512"):
        load_official(folder)
    state["encoder.model.blocks.0.mlp.fc1.weight"] = torch.zeros(512, 128)  # one against one: the ratio-4 block stands
    state["encoder.model.blocks.1.mlp.fc1.weight"] = torch.zeros(100, 128)
    write_release(folder, state, config)
    with pytest.raises(CheckpointError, match=r"^encoder.model.blocks.1.mlp.fc1.weight has 100 rows"):
        load_official(folder)


def test_a_file_given_for_its_folder_is_named_as_a_file(tmp_path):
    folder, _, _ = tiny_release(tmp_path, 1)
    with pytest.raises(CheckpointError, match=f"model.safetensors is a file, not a checkpoint folder: pass the folder "
                                              f"that holds it, {re.escape(str(folder))}$"):
        load_official(folder / "model.safetensors")  # was "no checkpoint folder at" a file that is there
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000020.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a training checkpoint file, not a model folder: pass its run folder"):
        load_official(tmp_path / "run" / "checkpoints" / "step-00000020.pt")
    with pytest.raises(CheckpointError, match="step-00000020.pt is corrupt or unreadable"):  # ours loads its EMA
        Tokenizer.from_pretrained(tmp_path / "run" / "checkpoints" / "step-00000020.pt")


def test_training_starts_from_a_release_named_official(tmp_path):
    """run.init_from=official:FOLDER: was "no checkpoint folder at 'official:...'", and the folder
    itself was refused with a Python-only hint and "train the run it names first"."""
    from softvq.training.config import config_from_dict
    from softvq.training.trainer import Trainer
    from test_tokenizer_generative_decoder import TREE

    folder, _, _ = tiny_release(tmp_path, 1)
    release = load_official(folder)
    tree = {**TREE, "model": release.config.to_dict(), "run": {**TREE["run"], "init_from": f"official:{folder}"}}
    trainer = Trainer(config_from_dict(tree), tmp_path / "run")
    start = trainer.unwrapped.state_dict()
    for key, value in release.state_dict().items():
        assert torch.equal(start[key].cpu(), value), key
    trainer.close()
    with pytest.raises(ValueError, match="run.init_from=official: needs a release folder or hub id after it"):
        Trainer(config_from_dict({**tree, "run": {**tree["run"], "init_from": "official:"}}), tmp_path / "run3")
    tree["run"] = {**tree["run"], "init_from": str(folder)}
    with pytest.raises(CheckpointError, match=f"set run.init_from=official:{re.escape(str(folder))}$"):
        Trainer(config_from_dict(tree), tmp_path / "run2")


def test_a_stray_key_of_one_more_block_is_named_as_such(tmp_path):
    folder, state, config = tiny_release(tmp_path, 1)
    state["encoder.model.blocks.2.norm1.weight"] = torch.ones(128)  # TINY's encoder has blocks 0 and 1
    write_release(folder, state, config)
    with pytest.raises(CheckpointError, match=r"encoder.model.blocks.2.\* has 1 of the 14 keys every other block has"):
        load_official(folder)  # it was "missing needed key(s) encoder.model.blocks.2.norm1.bias, ... (+5 more)"


def test_the_commands_name_the_release_keys_they_leave_out(tmp_path, capsys):
    """The format asks a loader to say which keys it ignores; only `info` said it (the library logs
    them at INFO, which a command does not show)."""
    from PIL import Image

    from softvq.cli.main import main

    folder, _, _ = tiny_release(tmp_path, 1)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), (90, 20, 200)).save(tmp_path / "imgs" / "a.png")
    assert main(["encode", str(tmp_path / "imgs"), "--model", f"official:{folder}",
                 "--out", str(tmp_path / "z.safetensors")]) == 0
    err = capsys.readouterr().err
    assert f"softvq: note: {folder}: left out " in err and "quantize.codebook_used (1 key): codebook usage counter" in err
    assert main(["info", f"official:{folder}"]) == 0
    out, err = capsys.readouterr()
    assert "softvq: note:" not in err and "codebook usage counter" in out  # its table lists them once


def test_a_release_config_without_tau_takes_the_released_temperature(tmp_path):
    """The hub's config.json may leave τ out: the release trained with 0.07 (paper Sec. 4.1)."""
    folder, _, config = tiny_release(tmp_path, 1)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "tau"}))
    assert load_official(folder).config.bottleneck.temperature == pytest.approx(0.07)


def test_only_vq_mean_in_config_json_still_sets_the_latent_statistics(tmp_path):
    """A config.json that gives only one of the pair still counts: vq_mean alone gives (mean, std 1.0),
    and a lone vq_std of 0 is refused, not silently dropped."""
    folder, _, config = tiny_release(tmp_path, 1, extras=False)
    only_mean = {k: v for k, v in config.items() if k != "vq_std"}
    (folder / "config.json").write_text(json.dumps(only_mean))
    model = load_official(folder)
    assert (model.latent_mean, model.latent_std) == (0.25, 1.0)
    only_std = {k: v for k, v in config.items() if k != "vq_mean"}
    (folder / "config.json").write_text(json.dumps({**only_std, "vq_std": 0}))
    with pytest.raises(CheckpointError, match="vq_mean / vq_std must be a finite mean and a positive std"):
        load_official(folder)


def test_the_single_codebook_is_named_as_the_releases_first_codebook():
    """official_key gives the release's spelling of our keys: the single codebook is
    quantize.embedding[0] (the release stores it as (1, K, D)), part s is quantize.embedding[s].
    (No loading path reaches this branch today: it is checked on the public function.)"""
    assert official_key("bottleneck.codebook") == "quantize.embedding[0]"
    assert official_key("bottleneck.parts.2.codebook") == "quantize.embedding[2]"
    assert official_key("decoder.to_pixel.weight") == "decoder.to_pixel.model.weight"


def test_a_release_pickle_wrapped_under_model_loads_like_the_flat_one(tmp_path):
    """A pytorch_model.bin that holds {"model": state_dict} (a research training checkpoint's layout)
    is unwrapped, and loads to exactly the weights of the flat release."""
    flat_folder, state, config = tiny_release(tmp_path, 1, extras=False, name="flat")
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    torch.save({"model": state}, wrapped / "pytorch_model.bin")
    (wrapped / "config.json").write_text(json.dumps(config))
    a, b = load_official(flat_folder).state_dict(), load_official(wrapped).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
