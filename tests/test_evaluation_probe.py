"""Linear probing (paper C.3): LAMB, the parameter-free BN + linear probe, the folder pipeline."""

import math
import random

import pytest
import torch

import softvq
from softvq.config import TokenizerConfig, preset
from softvq.data.images import ImageReadError, bundled_photos, load_rgb
from softvq.evaluation.probe import Lamb, LinearProbe, probe_folder, stratified_split, train_probe


def test_lamb_step_matches_the_algorithm():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
    w.grad = torch.tensor([1.0, -2.0])
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    opt.step()
    # t = 1: m̂ = g, v̂ = g², so the Adam direction is g / (|g| + eps); add decoupled decay λw.
    g = torch.tensor([1.0, -2.0])
    update = g / (g.abs() + 1e-6) + 0.01 * torch.tensor([3.0, 4.0])
    trust = 5.0 / update.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * update)


def test_probe_has_no_normalisation_parameters():
    probe = LinearProbe(10, 3)
    names = {n for n, _ in probe.named_parameters()}
    assert names == {"head.weight", "head.bias"}


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    train, val = stratified_split(labels, 0.2, seed=1)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert len(train) + len(val) == len(labels)
    assert sorted(labels[val].tolist()) == [0, 0, 1, 2]
    assert set(labels[train].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_separable_features_are_learned(optimizer):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(200) % 4
    x = centres[labels] + torch.randn(200, 16, generator=g) + 50.0  # offset: BN must handle it
    train, val = stratified_split(labels, 0.25)
    r = train_probe(x[train], labels[train], x[val], labels[val], epochs=5, batch_size=64,
                    optimizer=optimizer, min_steps=600)
    assert r.top1 >= 0.95 and r.train_top1 >= 0.95
    assert r.num_classes == 4 and r.feature_dim == 16


def test_the_probe_is_seeded_by_its_seed_and_leaves_the_global_stream_alone():
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(40, 8, generator=g), torch.arange(40) % 2
    results = []
    for caller_seed in (123, 999):
        torch.manual_seed(caller_seed)
        expected_next = torch.rand(3, generator=torch.Generator().manual_seed(caller_seed))
        results.append(train_probe(x[:30], labels[:30], x[30:], labels[30:], epochs=1, min_steps=5))
        assert torch.equal(torch.rand(3), expected_next)  # was overwritten by manual_seed(seed)
    assert results[0] == results[1]  # the same seed, the same probe, whatever the caller's stream


def test_probe_on_a_labelled_folder_beats_chance(tmp_path):
    """Three classes = random crops of three different photos; a frozen random tokenizer whose
    blocks are not muted (LayerScale 1) separates them linearly well above chance (1/3)."""
    rng = random.Random(0)
    for photo in bundled_photos()[:3]:
        img = load_rgb(photo)
        w, h = img.size
        folder = tmp_path / photo.stem
        folder.mkdir()
        for j in range(16):
            side = int(min(w, h) * rng.uniform(0.5, 0.9))
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
            img.crop((left, top, left + side, top + side)).resize((64, 64)).save(folder / f"{j:02d}.png")
    cfg = preset("softvq-tiny").to_dict()
    cfg["encoder"]["layerscale_init"] = 1.0
    torch.manual_seed(0)
    model = softvq.Tokenizer(TokenizerConfig.from_dict(cfg))
    r = probe_folder(model, tmp_path, val_fraction=0.25, progress=False)
    assert r.num_classes == 3 and r.num_val == 12 and r.num_train == 36
    assert r.feature_dim == model.num_tokens * model.latent_dim  # flattened L x D latents
    assert r.top1 >= 0.75


def test_unreadable_labelled_images_are_left_out_with_their_labels(tmp_path):
    from softvq.evaluation.probe import readable_features, tokenizer_features

    photos = bundled_photos()[:2]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, photo in enumerate(photos):
        load_rgb(photo).resize((64, 64)).save(tmp_path / "ab"[i] / "1.png")
        load_rgb(photo).resize((64, 64)).rotate(90).save(tmp_path / "ab"[i] / "3.png")
    (tmp_path / "a" / "2.png").write_bytes(b"broken")
    paths = [tmp_path / "a" / "1.png", tmp_path / "a" / "2.png", tmp_path / "b" / "1.png", tmp_path / "b" / "3.png"]
    model = softvq.Tokenizer.from_preset("softvq-tiny")
    skipped = []
    feats, labels = readable_features(model, paths, torch.tensor([0, 0, 1, 1]), skipped, batch_size=2, progress=False)
    assert skipped == [paths[1]] and labels.tolist() == [0, 1, 1]
    readable = tokenizer_features(model.train(), [paths[0], paths[2], paths[3]], batch_size=3, progress=False)
    torch.testing.assert_close(feats, readable, rtol=1e-5, atol=1e-6)
    assert model.training  # the caller's model is given back in its mode (it was left in eval mode)
    with pytest.raises(ImageReadError, match="2.png"):
        tokenizer_features(model, paths, progress=False)  # without a list to count them in, it is an error
    r = probe_folder(model, tmp_path, val_fraction=0.5, epochs=1, progress=False)
    assert r.skipped_images == 1 and r.num_train + r.num_val == 4  # 5 files, one unreadable


def test_folder_without_classes_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="two class sub-folders"):
        probe_folder(softvq.Tokenizer.from_preset("softvq-tiny"), tmp_path, progress=False)


def _two_class_folder(root, per_class=6):
    for c, photo in enumerate(bundled_photos()[:2]):
        (root / "ab"[c]).mkdir(parents=True)
        img = load_rgb(photo)
        for j in range(per_class):
            img.rotate(15 * j).resize((32, 32)).save(root / "ab"[c] / f"{j}.png")
    return root


def test_images_beside_the_class_folders_are_named_as_left_out(tmp_path, caplog):
    from softvq.evaluation.probe import labelled_images

    root = _two_class_folder(tmp_path / "data", per_class=2)
    load_rgb(bundled_photos()[0]).resize((32, 32)).save(root / "loose.png")
    with caplog.at_level("WARNING", logger="softvq"):
        paths, labels, names = labelled_images(root)
    assert len(paths) == 4 and names == ["a", "b"]  # the classes alone, as before
    assert "left out 1 image(s) directly in" in caplog.text and "(e.g. loose.png)" in caplog.text  # was silent


def test_stopped_feature_extraction_continues_from_its_saved_rows(tmp_path):
    """Ctrl-C in the third batch keeps the first two in the state file; the rerun encodes only the
    rest and gives the same features as one uninterrupted pass; other weights are refused."""
    from softvq.evaluation.probe import labelled_images, tokenizer_features

    paths, _, _ = labelled_images(_two_class_folder(tmp_path / "data"))
    torch.manual_seed(0)
    model = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    whole = tokenizer_features(model, paths, batch_size=4, progress=False)
    state = tmp_path / "probe-train.pt"
    encode, calls = model.encode, []

    def stopping(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(x)

    model.encode = stopping
    with pytest.raises(KeyboardInterrupt):
        tokenizer_features(model, paths, batch_size=4, progress=False, state_file=state)
    assert state.is_file()
    calls.clear()
    model.encode = lambda x: (calls.append(len(x)), encode(x))[1]
    again = tokenizer_features(model, paths, batch_size=4, progress=False, state_file=state)
    assert calls == [4] and torch.equal(again, whole)  # only the third batch was encoded
    with torch.no_grad():
        model.to_latent.weight.add_(1.0)
    with pytest.raises(ValueError, match="interrupted evaluation of other weights"):
        tokenizer_features(model, paths, batch_size=4, progress=False, state_file=state)


def test_eval_with_a_probe_stopped_in_the_probe_keeps_the_finished_evaluation(tmp_path, capsys, monkeypatch):
    """The evaluation's report waits in eval-state.pt while the probe runs: a stop in the probe
    costs the probe's unfinished rows only, and the rerun leaves no state behind."""
    import json

    import softvq.evaluation.probe as probe
    from softvq.cli.main import main

    data = _two_class_folder(tmp_path / "data")
    torch.manual_seed(0)
    softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1},
                                 decoder={"depth": 1}).save_pretrained(tmp_path / "tok")
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tmp_path / "tok"), "--images", str(data / "a"), "--probe", str(data),
            "--probe-epochs", "1", "--no-fid", "--no-lpips", "--no-flops", "--batch-size", "4", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    fit = probe.fit_probe

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe, "fit_probe", stop)
    assert main(argv) == 130
    assert (out / "eval-state.pt").is_file() and (out / "probe-train.pt").is_file()
    monkeypatch.setattr(probe, "fit_probe", fit)
    monkeypatch.setattr("softvq.evaluation.evaluate.uint8_to_model", None)  # the evaluation must not run again
    monkeypatch.setattr(softvq.Tokenizer, "encode", None)  # nor the probe's extraction
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["num_images"] == 6 and 0 <= report["linear_probe_top1"] <= 1
    assert any("had finished before the run was stopped" in note for note in report["notes"])
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md"]
    # a finished report kept in a state is given back once, and the state goes when nobody keeps it
    from softvq.evaluation.evaluate import EvalOptions, evaluate_tokenizer

    monkeypatch.undo()
    options = EvalOptions(num_images=6, batch_size=4, fid=False, lpips_nets=(), progress=False, count_flops=False)
    model = softvq.Tokenizer.from_pretrained(tmp_path / "tok")
    state = tmp_path / "state.pt"
    first = evaluate_tokenizer(model, data / "a", options, state_file=state, keep_state=True)
    assert state.is_file()
    again = evaluate_tokenizer(model, data / "a", options, state_file=state)
    assert again["psnr"] == first["psnr"] and not state.exists()  # was left behind


def test_a_class_left_without_readable_images_cannot_make_a_one_class_probe(tmp_path):
    data = _two_class_folder(tmp_path / "data")
    for path in (data / "b").iterdir():
        path.write_bytes(b"broken")
    model = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    with pytest.raises(ValueError, match="at least two classes, and 1 class"):
        probe_folder(model, data, epochs=1, progress=False)  # was top-1 100% on a single class


def test_a_class_with_no_readable_image_is_left_out_and_named(tmp_path, caplog):
    """Was: still counted (num_classes 3, one output never trained), and named nowhere."""
    from PIL import Image

    data = _two_class_folder(tmp_path / "data")
    (data / "a-broken").mkdir()  # sorts between a and b: b's label moves down to fill its place
    for j in range(3):
        (data / "a-broken" / f"{j}.png").write_bytes(b"broken")
    val = _two_class_folder(tmp_path / "val", per_class=2)
    (val / "a-broken").mkdir()
    Image.new("RGB", (32, 32)).save(val / "a-broken" / "0.png")  # readable, but of a class nothing trained on
    model = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    with caplog.at_level("WARNING", logger="softvq.evaluation.probe"):
        r = probe_folder(model, data, epochs=1, progress=False)
    assert r.num_classes == 2 and r.empty_classes == ["a-broken"] and r.skipped_images == 3
    assert "left out 1 class(es) with no readable training image: a-broken" in caplog.text
    r = probe_folder(model, data, val_folder=val, epochs=1, progress=False)
    assert (r.num_classes, r.num_train, r.num_val, r.empty_classes) == (2, 12, 4, ["a-broken"])
    from softvq.cli.eval import add_probe

    report: dict = {"notes": []}
    add_probe(report, r, epochs=1)  # eval's report says it too
    assert "linear probe: left out 1 class(es) with no readable training image: a-broken" in report["notes"]


def test_the_probe_lr_follows_a_cosine_from_its_peak_over_the_steps(monkeypatch):
    from softvq.evaluation import probe

    seen = []
    step = probe.Lamb.step

    def recording(self, closure=None):
        seen.append(self.param_groups[0]["lr"])
        return step(self, closure)

    monkeypatch.setattr(probe.Lamb, "step", recording)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    train_probe(x, y, x, y, epochs=1, batch_size=40, lr=1e-2, min_steps=10)
    assert seen == pytest.approx([0.5 * 1e-2 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])


def test_top5_counts_a_label_anywhere_in_the_five_highest():
    from softvq.evaluation.probe import _accuracy

    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1]] * 2)
    labels = torch.tensor([4, 5])  # fifth and sixth highest
    assert _accuracy(logits, labels) == 0.0 and _accuracy(logits, labels, 5) == 0.5
