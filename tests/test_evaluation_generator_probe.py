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


def tiny(kind="sit", depth=3, tokens=4, dim=2, classes=3, class_dropout=0.1):
    """A tiny DiT / SiT with every weight random: at DiT's adaLN-Zero initialisation every block is
    the identity, and the output of any block would equal any other's."""
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(kind=kind, width=16, depth=depth, heads=2, num_tokens=tokens,
                                            latent_dim=dim, num_classes=classes, class_dropout=class_dropout))
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


def test_stopped_generator_features_continue_from_the_saved_rows(tmp_path):
    model = tiny()
    meta = GeneratorMeta(objective="sit", path="cosine", latent_mean=0.5, latent_std=2.0)
    z = torch.randn(6, 4, 2)
    whole = generator_features(model, meta, z, layer=2, t=0.3, batch_size=2, progress=False)
    forward, calls = model.forward, []

    def stopping(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(*args)

    model.forward = stopping
    state = tmp_path / "probe-train-block.pt"
    with pytest.raises(KeyboardInterrupt):
        generator_features(model, meta, z, layer=2, t=0.3, batch_size=2, progress=False, state_file=state)
    calls.clear()
    model.forward = lambda *args: (calls.append(1), forward(*args))[1]
    again = generator_features(model, meta, z, layer=2, t=0.3, batch_size=2, progress=False, state_file=state)
    assert len(calls) == 2 and torch.equal(again, whole)  # the first batch came from the state
    with pytest.raises(ValueError, match=r"t 0.3 -> 0.5"):  # other settings: refused by name
        generator_features(model, meta, z, layer=2, t=0.5, batch_size=2, progress=False, state_file=state)


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
    with pytest.raises(ValueError, match=r"the probe gives the generator the null \(unconditional\) label, .* this "
                                         r"generator has none: it was trained with --class-dropout 0"):
        check_probe_target(tiny(class_dropout=0.0), sit, 2, 0.5)  # was "it cannot do CFG"
    with pytest.raises(ValueError, match=r"latents are \(3, 2\) per image but the generator takes \(4, 2\)"):
        generator_features(model, sit, torch.randn(2, 3, 2), layer=2, progress=False)


def _labelled_folder(root, per_class=6):
    """Two classes of flat-colour 32 px images (dark and light), with a little noise."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, (name, level) in enumerate((("dark", 40), ("light", 210))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (level + 30 * torch.rand(32, 32, 3, generator=g)).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_eval_probe_generator_writes_the_probe_into_the_report(tmp_path, capsys):
    from softvq import Tokenizer
    from softvq.cli.main import main
    from softvq.generation.latent_sources import folder_source
    from softvq.generation.pretokenize import pretokenize

    torch.manual_seed(0)
    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    tok.save_pretrained(tmp_path / "tok")
    images = _labelled_folder(tmp_path / "labelled")
    pretokenize(tok, folder_source(images, 32), tmp_path / "lat", tokenizer_spec=str(tmp_path / "tok"),
                progress=False)
    model = tiny(depth=2, tokens=tok.num_tokens, dim=tok.latent_dim, classes=2)
    data = json.loads((tmp_path / "lat" / "meta.json").read_text())
    meta = GeneratorMeta(objective="sit", tokenizer=str(tmp_path / "tok"), latent_mean=data["latent_mean"],
                         latent_std=data["latent_std"], classes=["dark", "light"])
    gen = save_generator(model, meta, tmp_path / "gen")

    # images encoded by the generator's tokenizer are the latent set pretokenize made of them
    from_images = labelled_latents(images, tok, progress=False)
    from_set = labelled_latents(tmp_path / "lat", progress=False)
    torch.testing.assert_close(from_images[0], from_set[0], atol=1e-5, rtol=1e-5)
    assert from_images[1].tolist() == from_set[1].tolist() and from_images[2] == from_set[2]

    for data_folder in (images, tmp_path / "lat"):
        out = tmp_path / f"eval-{data_folder.name}"
        assert main(["eval", "--probe-generator", str(gen), "--probe", str(data_folder), "--probe-layer", "2",
                     "--probe-t", "0.3", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
        report = json.loads((out / "eval.json").read_text())
        assert 0.0 <= report["linear_probe_top1"] <= 1.0 and report["linear_probe"]["feature_dim"] == 16
        assert report["linear_probe"]["which"] == "sit block 2 at t=0.3, null label"
        assert report["protocol"]["probe layer"] == 2 and report["image_size"] == 32
        assert "linear probe top-1" in (out / "eval.md").read_text()
    capsys.readouterr()

    def error(*argv):
        assert main(["eval", *argv, "--device", "cpu"]) == 2
        return capsys.readouterr().err.strip()

    assert "which has depth 2: pass a layer from 1 to 2" in error("--probe-generator", str(gen), "--probe", str(images))
    assert "--probe-layer applies only to --probe-generator GEN: pass it, or drop it" in error(
        "--model", "softvq-tiny", "--images", str(images), "--probe-layer", "3")
    assert "needs --probe FOLDER" in error("--probe-generator", str(gen))
    # eval takes a tokenizer as --model (generate's --tokenizer is no flag of eval's)
    assert f"{tmp_path / 'tok'} is a tokenizer, not a generator; pass it as --model, and a generator" in \
        error("--probe-generator", str(tmp_path / "tok"), "--probe", str(images))
    moved = save_generator(model, GeneratorMeta(**{**meta.to_dict(), "tokenizer": str(tmp_path / "gone")}),
                           tmp_path / "moved")
    assert f"{moved} records its latents' tokenizer as {tmp_path / 'gone'}, which does not load: no checkpoint " \
           f"folder at" in (err := error("--probe-generator", str(moved), "--probe", str(images), "--probe-layer", "1"))
    assert err.endswith("pass --model SPEC with that tokenizer where it is now")
    assert "drop --images" in error("--probe-generator", str(gen), "--probe", str(images), "--images", str(images))
    assert "pass --images DATA" in error("--model", "softvq-tiny")


def test_a_class_with_no_readable_image_is_left_out_of_the_generator_probe_too(tmp_path, caplog):
    """The tokenizer probe's fix, in its sibling: the class was counted, and named nowhere."""
    from softvq import Tokenizer
    from softvq.evaluation.generator_probe import probe_generator

    torch.manual_seed(0)
    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    images = _labelled_folder(tmp_path / "labelled")
    (images / "broken").mkdir()  # sorts first: the other classes' labels move down
    for i in range(3):
        (images / "broken" / f"{i}.png").write_bytes(b"not a png")
    model = tiny(depth=2, tokens=tok.num_tokens, dim=tok.latent_dim, classes=2)
    meta = GeneratorMeta(objective="sit", tokenizer="tok", classes=["dark", "light"])
    with caplog.at_level("WARNING", logger="softvq.evaluation.probe"):
        result = probe_generator(model, meta, images, tokenizer=tok, layer=1, epochs=1, progress=False)
    assert (result.num_classes, result.empty_classes, result.skipped_images) == (2, ["broken"], 3)
    assert "left out 1 class(es) with no readable training image: broken" in caplog.text
