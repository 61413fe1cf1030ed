"""Linear probing of a DiT / SiT's block features (paper Fig. 3(b)): the hooked block output, the
noise, the null label, the report, and the clear errors."""

import json
import math

import pytest
import torch

from softvq.evaluation.generator_probe import (block_output, check_probe_target, generator_features, image_noise,
                                               labelled_latents, noised)
from softvq.generation.checkpoint import GeneratorMeta, save_generator
from softvq.generation.models import GeneratorConfig, build_generator


def tiny(kind="sit", depth=3, tokens=4, dim=2, classes=3):
    """A tiny DiT / SiT with every weight random: at DiT's adaLN-Zero initialisation every block is
    the identity, and the output of any block would equal any other's."""
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(kind=kind, width=16, depth=depth, heads=2, num_tokens=tokens,
                                            latent_dim=dim, num_classes=classes))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def by_hand(model, x, t, y, layer):
    """The tokens after ``layer`` blocks, running the blocks one by one (the reference)."""
    h = model.x_embed(x) + model.pos_embed
    cond = model.t_embed(t) + model.y_embed(y)
    for block in model.blocks[:layer]:
        h = block(h, cond)
    return h


def test_the_hook_returns_exactly_the_output_of_block_layer_and_stops_there():
    model = tiny()
    x, t, y = torch.randn(5, 4, 2), torch.rand(5), torch.tensor([0, 1, 2, 0, 3])
    calls = []
    model.final.register_forward_hook(lambda *args: calls.append("final"))
    outputs = []
    with torch.no_grad():
        for layer in (1, 2, 3):
            got = block_output(model, x, t, y, layer)
            assert torch.equal(got, by_hand(model, x, t, y, layer)), layer
            outputs.append(got)
        assert not calls  # the head never ran: the pass stops at the block
        assert all(not torch.allclose(a, b) for a, b in zip(outputs, outputs[1:]))  # the layers do differ
        model(x, t, y)
        assert calls == ["final"] and not model.blocks[0]._forward_hooks  # hooks removed after use


def test_features_use_the_null_label_so_no_label_leaks_in():
    model = tiny()
    meta = GeneratorMeta(objective="sit", path="cosine", latent_mean=0.5, latent_std=2.0)
    z = torch.randn(6, 4, 2)
    model.train()  # label dropout would draw at random in training mode
    feats = generator_features(model, meta, z, layer=2, t=0.3, seed=7, batch_size=4, progress=False)
    assert model.training  # given back in its mode
    # the reference: normalise, SiT's cosine path at t = 0.3 by hand, the null class, mean over tokens
    x = (z - 0.5) / 2.0
    x_t = math.cos(math.pi * 0.3 / 2) * x + math.sin(math.pi * 0.3 / 2) * image_noise(range(6), (4, 2), 7)
    t = torch.full((6,), 0.3)
    with torch.no_grad():
        model.eval()
        null = by_hand(model, x_t, t, torch.full((6,), model.null_class), 2).mean(1)
        labelled = [by_hand(model, x_t, t, torch.full((6,), c), 2).mean(1) for c in range(3)]
    torch.testing.assert_close(feats, null)
    assert all(not torch.allclose(null, f, atol=1e-3) for f in labelled)  # a true label would change them
    # per-image noise: the batch size changes nothing, and each image's noise is its own
    again = generator_features(model, meta, z, layer=2, t=0.3, seed=7, batch_size=1, progress=False)
    torch.testing.assert_close(again, feats)
    assert not torch.allclose(generator_features(model, meta, z, layer=2, t=0.3, seed=8, progress=False), feats)


def test_dit_latents_are_noised_by_the_cosine_forward_process_at_step_round_t_times_T():
    meta = GeneratorMeta(objective="dit", schedule="cosine", diffusion_steps=1000)
    x, noise = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    x_t, step = noised(x, meta, 0.25, noise)
    assert step.tolist() == [250, 250, 250] and step.dtype == torch.long
    # IDDPM Eq. 17 (no β clipping at k = 250): ᾱ_k = Π_{i ≤ k} (1 − β_i) = f(k + 1) / f(0)
    f = lambda s: math.cos((s / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = f(251) / f(0)
    torch.testing.assert_close(x_t, math.sqrt(alpha_bar) * x + math.sqrt(1 - alpha_bar) * noise)
    assert noised(x, meta, 1.0, noise)[1].tolist() == [999] * 3  # the last step, not T


def test_a_layer_past_the_depth_a_mar_or_a_noise_level_outside_0_1_is_named():
    model = tiny(depth=3)
    sit = GeneratorMeta(objective="sit")
    with pytest.raises(ValueError, match=r"probe layer 20 is not a block of this generator, which has depth 3: pass a "
                                         r"layer from 1 to 3"):
        check_probe_target(model, sit, 20, 0.5)
    with pytest.raises(ValueError, match="probe layer 0 is not a block"):
        check_probe_target(model, sit, 0, 0.5)
    with pytest.raises(ValueError, match=r"noise level in \[0, 1\]"):
        check_probe_target(model, sit, 2, 1.5)
    with pytest.raises(ValueError, match="takes a DiT or SiT .*this is a MAR generator"):
        check_probe_target(model, GeneratorMeta(objective="mar"), 2, 0.5)
    with pytest.raises(ValueError, match=r"latents are \(3, 2\) per image but the generator takes \(4, 2\)"):
        generator_features(model, sit, torch.randn(2, 3, 2), layer=2, progress=False)

