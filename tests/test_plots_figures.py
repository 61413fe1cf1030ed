"""Every picture is a real PNG: opened, sized, and not blank; `softvq plot` makes them from run folders."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import softvq
from softvq.cli.main import main
from softvq.evaluation import plots
from softvq.evaluation.report import comparison_markdown
from softvq.evaluation.runs import RunFolder, bottleneck_label, comparison_row, plot_images, plot_runs, read_run


def assert_picture(path, min_size=(300, 200), min_std=8.0):
    """A PNG of at least ``min_size`` pixels whose grey levels vary (a blank canvas has std 0)."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1]
        grey = np.asarray(img.convert("L"), dtype=np.float64)
    assert grey.std() > min_std, f"{path.name} looks blank (std {grey.std():.2f})"


def test_the_blank_check_can_fail(tmp_path):
    Image.new("RGB", (400, 300), "white").save(tmp_path / "blank.png")
    with pytest.raises(AssertionError, match="blank"):
        assert_picture(tmp_path / "blank.png")


def test_reconstruction_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    path = plots.plot_reconstructions(x, y, tmp_path / "grid.png")
    assert_picture(path, min_size=(600, 600))
    with pytest.raises(ValueError, match="same|one shape"):
        plots.plot_reconstructions(x, y[:2], tmp_path / "bad.png")


def test_training_grid_names_its_rows_and_writes_each_psnr_that_fits(tmp_path):
    from softvq.evaluation.metrics import psnr
    from softvq.training.grid import column_captions, reconstruction_grid, save_grid

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    expected = psnr((x + 1) / 2, (y + 1) / 2, data_range=1.0)
    assert column_captions(x, y) == [f"{v:.1f} dB" for v in expected.tolist()]
    # the shorter forms when the long one does not fit under a tile, none when nothing does
    assert column_captions(x, y, fits=lambda t: "dB" not in t) == [f"{v:.1f}" for v in expected.tolist()]
    assert column_captions(x, y, fits=lambda t: False) == []
    grid = reconstruction_grid(x, y)
    tiles = np.asarray(grid)
    # the left margin holds the row names (dark text), the tiles start after it
    margin = grid.width - 3 * (64 + 2) - 2
    assert margin > 20 and tiles[:, :margin].min() < 100
    assert grid.height > 3 * (64 + 2) + 2  # and a strip of PSNRs under the columns
    assert_picture(save_grid(x, y, tmp_path / "grid.png"), min_size=(200, 200))
    # the error row is the channels' mean |x - y| x 4 in grey (per-channel colour read as false hues)
    error_tile = tiles[2 * (64 + 2) + 2:3 * (64 + 2), margin + 2:margin + 2 + 64].astype(int)
    assert (error_tile[..., 0] == error_tile[..., 1]).all() and (error_tile[..., 1] == error_tile[..., 2]).all()
    expected_grey = ((x[0] - y[0]).abs().mean(0) / 2 * 4).clamp(0, 1) * 255
    assert np.abs(error_tile[..., 0] - expected_grey.numpy()).max() <= 1
    titled = reconstruction_grid(x, y, title="step 7: EMA weights on held-out images")
    assert titled.height > grid.height and np.asarray(titled)[:12].min() < 100  # the title's dark text on top
    with pytest.raises(ValueError, match="originals vs"):
        reconstruction_grid(x, y[:2])


def test_training_curves_and_codebook_histogram(tmp_path):
    records = [{"step": s, "time": 0.0, "loss": 1 / (1 + s), "lr": 1e-4, "note": "text"} for s in range(0, 50, 5)]
    assert set(plots.numeric_series(records)) == {"loss", "lr"}  # step/time/strings are not curves
    assert_picture(plots.plot_training_curves(records, tmp_path / "curves.png"))
    counts = np.bincount(np.random.default_rng(0).zipf(1.5, 500) % 64, minlength=64)
    assert_picture(plots.plot_codebook_usage(counts, tmp_path / "usage.png"))
    with pytest.raises(ValueError, match="no code"):
        plots.plot_codebook_usage(np.zeros(8), tmp_path / "none.png")


def test_pca_matches_scikit_learn_up_to_sign():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(1).standard_normal((40, 10)) @ np.diag(np.arange(10, 0, -1.0))
    ours = plots.pca_2d(x)
    ref = PCA(2).fit(x)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref.transform(x)), rtol=1e-8, atol=1e-10)
    # the projection names the share of the variance its two axes explain, as scikit-learn measures it
    first, second = (round(100 * r) for r in ref.explained_variance_ratio_)
    assert plots.project_2d(x, "pca")[1] == f"PCA, {first}% + {second}% of the variance"


def test_latent_projection_and_rate_quality(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 10)
    feats = rng.standard_normal((30, 24)) + labels[:, None] * 3
    lats = feats + 0.1 * rng.standard_normal(feats.shape)
    path = plots.plot_latent_projection(feats, lats, labels, tmp_path / "latents.png",
                                        class_names=["a", "b", "c"], method="pca")
    assert_picture(path)
    runs = [{"name": f"L{t}", "num_tokens": t, "latent_dim": 32, "rfid": 4.0 / t, "psnr_eval": 20 + t / 16}
            for t in (16, 32, 64)]
    assert_picture(plots.plot_rate_quality(runs, tmp_path / "rate.png"))


def test_rate_quality_colours_by_kind_stacks_names_and_names_runs_it_cannot_place(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    runs = [{"name": "vq", "kind": "vq", "num_tokens": 64, "latent_dim": 32, "rfid": 4.0, "psnr_eval": 20.1},
            {"name": "kl", "kind": "kl", "num_tokens": 64, "latent_dim": 32, "rfid": 4.05, "psnr_eval": 20.2},
            {"name": "ae", "kind": "ae", "num_tokens": 64, "latent_dim": 32, "psnr_eval": 20.0}]
    plots.plot_rate_quality(runs, tmp_path / "rate.png")
    rfid_axes, psnr_axes = drawn[0].axes
    assert [t.get_text() for t in rfid_axes.get_legend().get_texts()] == ["vq", "kl"]  # the kinds' fixed order
    assert any("not shown (no rFID, softvq eval): ae" == t.get_text() for t in rfid_axes.texts)
    # a kind keeps its colour whichever runs a chart shows, and the panels share the rate axis
    colour = {line.get_label(): line.get_color() for line in rfid_axes.lines}
    drawn.clear()
    plots.plot_rate_quality(runs[1:], tmp_path / "rate.png")
    assert {line.get_label(): line.get_color() for line in drawn[0].axes[0].lines}["kl"] == colour["kl"]
    assert drawn[0].axes[0].get_xlim() == drawn[0].axes[1].get_xlim()
    drawn.clear()
    plots.plot_rate_quality(runs, tmp_path / "rate.png")
    rfid_axes, psnr_axes = drawn[0].axes
    assert not any("not shown" in t.get_text() for t in psnr_axes.texts)
    # runs at one rate: their names sit one under the other, not on top of each other
    drawn[0].canvas.draw()
    boxes = sorted((t.get_window_extent() for t in rfid_axes.texts if t.get_text() in ("vq", "kl")),
                   key=lambda b: b.y0)
    assert boxes[1].y0 >= boxes[0].y1 - 1


def test_smoothed_curves_are_bias_corrected():
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    w = 0.6
    naive = [sum((1 - w) * w ** (i - j) * values[j] for j in range(i + 1)) / (1 - w ** (i + 1))
             for i in range(len(values))]
    np.testing.assert_allclose(plots._ema(values, w), naive, rtol=1e-12)
    assert plots._ema(np.full(5, 7.0), 0.9).tolist() == pytest.approx([7.0] * 5)  # no pull toward 0 or the start


def make_run(folder, with_eval=True):
    torch.manual_seed(0)
    softvq.Tokenizer.from_preset("softvq-tiny").save_pretrained(folder / "export")
    lines = [json.dumps({"step": s, "loss": 2 / (1 + s / 10), "recon": 1 / (1 + s / 20)}) for s in range(0, 100, 10)]
    (folder / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 100, "lo')  # cut by a crash
    (folder / "metrics.json").write_text(json.dumps({"psnr": 12.5}))
    if with_eval:
        (folder / "eval").mkdir()
        (folder / "eval" / "eval.json").write_text(json.dumps({"rfid": 80.0, "psnr": 12.0, "num_tokens": 16,
                                                                "latent_dim": 8}))


def test_plot_runs_draws_everything_a_run_allows(tmp_path):
    make_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    run = read_run(tmp_path / "run")
    assert len(run.records) == 10 and any("unreadable" in n for n in run.notes)
    messages = []
    written = plot_runs([tmp_path / "run", tmp_path / "empty"], tmp_path / "out", per_class=3,
                        num_reconstructions=3, projection="pca", log=messages.append)
    names = sorted(p.name for p in written)
    assert names == ["codebook_usage.png", "codewords.png", "comparison.md", "latents.png", "rate_quality.png",
                     "reconstructions.png", "training_curves.png"]
    for path in written:
        if path.suffix == ".png":
            assert_picture(path)
    assert any("empty: no log.jsonl" in m for m in messages)
    # a row per run; the eval report wins over metrics.json, and columns nobody has are left out
    lines = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    assert lines[0] == "| run | bottleneck | tokens | measured on | rFID ↓ | PSNR (dB) ↑ |"
    assert lines[2] == "| run | softvq K=256 τ=0.07 | 16 x 8 | eval, ? images at ? px | 80.000 | 12.00 |"
    assert lines[3] == "| empty | – | – | – | – | – |" and len(lines) == 4


def test_comparison_rows_fall_back_to_held_out_metrics_and_name_the_protocol(tmp_path):
    from softvq.evaluation.report import comparison_markdown
    from softvq.evaluation.runs import comparison_row

    make_run(tmp_path / "run", with_eval=False)
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"psnr": 12.5, "lpips": 0.25, "heldout_images": 16,
                                                               "image_size": 32}))
    row = comparison_row(read_run(tmp_path / "run"))
    assert row["measured_on"] == "held-out, 16 images at 32 px" and row["lpips_vgg"] == 0.25
    table = comparison_markdown([row, {"name": "b", "psnr": float("nan"), "rfid": 1.5}])
    assert table.splitlines()[2:] == ["| run | softvq K=256 τ=0.07 | 16 x 8 | held-out, 16 images at 32 px | – | 12.50 | 0.2500 |",
                                      "| b | – | – | – | 1.500 | – | – |"]


def test_rate_quality_puts_psnr_of_one_protocol_on_its_axis(tmp_path, monkeypatch):
    from softvq.evaluation.runs import rate_point

    make_run(tmp_path / "trained", with_eval=False)
    (tmp_path / "trained" / "metrics.json").write_text(json.dumps({"psnr": 12.5, "lpips": 0.25}))
    trained = rate_point(read_run(tmp_path / "trained"))
    assert (trained["psnr_eval"], trained["psnr_heldout"], trained["rfid"]) == (None, 12.5, None)
    (tmp_path / "trained" / "metrics.json").unlink()  # still training: the log's last held-out PSNR (was none)
    (tmp_path / "trained" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 10, "loss": 1.0, "heldout/psnr": 9.5}, {"step": 20, "loss": 0.5, "heldout/psnr": 11.25},
        {"step": 25, "loss": 0.4})) + "\n")
    assert rate_point(read_run(tmp_path / "trained"))["psnr_heldout"] == 11.25

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    # evaluated on other images (14.0) but 11.0 on the held-out ones: beside a run with held-out PSNR
    # alone, both are drawn by the held-out images, or the chart ranks them by how they were measured
    evaluated = dict(trained, name="evaluated", psnr_eval=14.0, psnr_heldout=11.0, rfid=3.0)
    plots.plot_rate_quality([trained, evaluated], tmp_path / "rate.png")
    psnr_axes = drawn[0].axes[1]
    assert sorted(round(line.get_ydata()[0], 1) for line in psnr_axes.lines) == [11.0, 12.5]
    assert psnr_axes.get_ylabel() == "PSNR dB, held-out images (higher is better)"
    drawn.clear()
    plots.plot_rate_quality([evaluated, dict(evaluated, name="other", psnr_eval=15.0)], tmp_path / "rate.png")
    assert sorted(round(line.get_ydata()[0], 1) for line in drawn[0].axes[1].lines) == [14.0, 15.0]
    assert drawn[0].axes[1].get_ylabel() == "PSNR dB, softvq eval (higher is better)"


def test_pictures_skip_unreadable_files_and_take_the_next_readable_ones(tmp_path):
    from softvq.data.images import bundled_photos

    for c, photo in zip("ab", bundled_photos()[:2]):
        (tmp_path / c).mkdir()
        for j in range(3):
            (tmp_path / c / f"{j}.png").write_bytes(photo.read_bytes())
    (tmp_path / "a" / "0.png").write_bytes(b"broken")  # sorts first in its class
    messages = []
    images, labels, names = plot_images(32, tmp_path, per_class=2, log=messages.append)
    assert names == ["a", "b"] and labels.tolist() == [0, 0, 1, 1] and images.shape == (4, 3, 32, 32)
    assert len(messages) == 1 and messages[0].startswith("skipped 1 unreadable image file(s)")
    messages.clear()  # more classes than a legend holds: the ones drawn are named
    names = plot_images(32, tmp_path, per_class=1, max_classes=1, log=messages.append)[2]
    assert names == ["a"] and messages[0].startswith("drawing the first 1 of 2 classes (sorted by name: a to a)")


def test_bundled_picture_images_are_each_photo_whole_then_seeded_crops():
    from PIL import Image

    from softvq.data.images import bundled_photos, load_rgb

    images, labels, names = plot_images(32, per_class=3, max_classes=2, seed=5)
    assert names == [p.stem for p in bundled_photos()[:2]] and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    photo = load_rgb(bundled_photos()[0])  # the first crop: the whole photo's centre square, resized
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    whole = np.asarray(photo.crop((left, top, left + side, top + side)).resize((32, 32), Image.BICUBIC))
    assert np.abs(images[0].permute(1, 2, 0).numpy().astype(int) - whole.astype(int)).max() <= 1
    assert torch.equal(images, plot_images(32, per_class=3, max_classes=2, seed=5)[0])
    assert not torch.equal(images, plot_images(32, per_class=3, max_classes=2, seed=6)[0])


def test_cli_plot(tmp_path, capsys):
    make_run(tmp_path / "run", with_eval=False)
    code = main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--per-class", "2",
                 "--num-reconstructions", "2", "--projection", "pca", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 7 and sum(p.endswith(".png") for p in printed) == 6 and printed[-2].endswith("comparison.md")
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2


def test_cli_plot_asks_for_umap_learn_in_one_line_where_it_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # importing it now fails, installed or not
    make_run(tmp_path / "run", with_eval=False)
    code = main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--per-class", "2",
                 "--num-reconstructions", "2", "--projection", "umap", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install umap-learn" in err and "Traceback" not in err


def test_a_continued_run_replaces_the_logged_steps_of_the_line_it_left():
    steps_losses = [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0), (2, 4.5), (3, 3.5)]  # resumed at step 1
    records = [{"step": s, "loss": v} for s, v in steps_losses] + [{"step": 3, "psnr": 20.0}]
    series = plots.numeric_series(records)
    assert series["loss"][0].tolist() == [1, 2, 3] and series["loss"][1].tolist() == [5.0, 4.5, 3.5]
    assert series["psnr"][0].tolist() == [3]  # a second record of the same step is not a restart


def test_short_logs_draw_their_raw_curve_solid_and_long_ones_add_the_smoothed_line(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    for count in (plots.MIN_POINTS_TO_SMOOTH - 1, plots.MIN_POINTS_TO_SMOOTH):
        plots.plot_training_curves([{"step": s, "loss": 1 / (1 + s)} for s in range(count)], tmp_path / "c.png")
    short, long = (fig.axes[0].lines for fig in drawn)
    assert len(short) == 1 and short[0].get_alpha() in (None, 1.0)  # nothing to smooth: not faint
    raw, ema = long
    assert raw.get_alpha() < 1 and ema.get_alpha() in (None, 1.0)


def test_the_first_codebook_is_compared_with_the_tokens_it_reads():
    """Supp. Fig. 5's picture: the release's segment codebooks read the first L/S tokens,
    L2-normalised for the cosine distance; GMMVQ's ω channel is not a coordinate; a bottleneck
    without one codebook over whole tokens has no such picture."""
    from softvq.config import BottleneckConfig, TokenizerConfig, ViTConfig
    from softvq.evaluation.runs import first_codebook

    vit = ViTConfig(width=32, depth=1, heads=2)

    def model(**bottleneck):
        return softvq.Tokenizer(TokenizerConfig(image_size=32, patch_size=8, num_tokens=8, encoder=vit, decoder=vit,
                                                bottleneck=BottleneckConfig(latent_dim=4, codebook_size=16,
                                                                            **bottleneck)))

    features = torch.randn(3, 8, 4)
    release = model(kind="softvq", segments=4, distance="cosine")
    codewords, tokens, which = first_codebook(release, features)
    part = release.bottleneck.parts[0]
    assert torch.equal(codewords, torch.nn.functional.normalize(part.codebook.detach(), dim=-1))
    assert torch.allclose(tokens, torch.nn.functional.normalize(features[:, :2].reshape(-1, 4), dim=-1))
    assert which == "segment 1 of 4 (tokens 0-1)"
    codewords, tokens, _ = first_codebook(model(kind="gmmvq"), torch.randn(3, 8, 5))
    assert codewords.shape == (16, 4) and tokens.shape == (24, 4)
    assert first_codebook(model(kind="ae"), features) is None
    assert first_codebook(model(kind="lfq", lfq_groups=2), features) is None  # fixed corners, nothing learned
    # PQ: group 1's codebook over the tokens' first D/G channels; RQ: level 1 reads ẑ itself
    pq_rq = model(kind="softvq", groups=2, residual_levels=2)
    codewords, tokens, which = first_codebook(pq_rq, features)
    assert torch.equal(codewords, pq_rq.bottleneck.levels[0].parts[0].codebook.detach())
    assert torch.equal(tokens, features[..., :2].reshape(-1, 2))
    assert which == "level 1 of 2, group 1 of 2 (channels 0-1)"


def test_codewords_picture_refuses_codewords_of_another_width(tmp_path):
    with pytest.raises(ValueError, match="tokens have 4 channels but codewords 3"):
        plots.plot_codewords(torch.randn(5, 3), torch.randn(10, 4), tmp_path / "c.png")
    assert_picture(plots.plot_codewords(torch.randn(5, 4), torch.randn(10, 4), tmp_path / "c.png",
                                        counts=np.array([3, 0, 1, 0, 9])))


def test_codewords_axes_say_what_they_are_whatever_the_title(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.plot_codewords(torch.randn(5, 4), torch.randn(10, 4), tmp_path / "c.png", title="run: 3 of 5 picked")
    ax = drawn[0].axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "run: 3 of 5 picked", "PC 1 of the tokens", "PC 2 of the tokens")


def test_comparison_rows_name_exports_by_their_run_tell_bottlenecks_apart_and_leave_generators_out(tmp_path):
    from softvq.evaluation.runs import bottleneck_label

    for run in ("a", "b"):
        make_run(tmp_path / run)
        (tmp_path / run / "export" / "eval.json").write_text(json.dumps({"psnr": 20.0}))  # eval of the export
    (tmp_path / "gen" / "generator").mkdir(parents=True)  # a train-generator run with a probe report
    (tmp_path / "gen" / "generator" / "config.json").write_text("{}")
    (tmp_path / "gen" / "eval.json").write_text(json.dumps({"linear_probe_top1": 0.5}))
    plot_runs([tmp_path / "a" / "export", tmp_path / "b" / "export", tmp_path / "a" / "export", tmp_path / "gen"],
              tmp_path / "out", per_class=2, num_reconstructions=2, projection="pca", log=lambda m: None)
    names = [line.split(" | ")[0].strip("| ") for line in (tmp_path / "out" / "comparison.md").read_text().splitlines()[2:]]
    assert names == ["a", "b", "a-1"]  # as the picture folders are named; the generator has no row
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "a-1", "b", "comparison.md", "rate_quality.png"]
    assert bottleneck_label({"bottleneck": {"kind": "softvq", "distance": "cosine", "codebook_size": 8192,
                                            "temperature": 0.07, "segments": 4, "commit_loss": True}}) == \
        "softvq cos K=8192 τ=0.07 S=4 +commit"
    assert bottleneck_label({"bottleneck": {"kind": "lfq", "lfq_groups": 4, "groups": 1}}) == "lfq g=4"
    assert bottleneck_label({"bottleneck": {"kind": "ae"}}) == "ae" and bottleneck_label(None) is None


def test_a_plot_without_metrics_removes_the_table_and_chart_an_earlier_plot_left(tmp_path):
    make_run(tmp_path / "run")
    plot_runs([tmp_path / "run"], tmp_path / "out", per_class=2, num_reconstructions=2, projection="pca",
              log=lambda m: None)
    assert (tmp_path / "out" / "comparison.md").is_file() and (tmp_path / "out" / "rate_quality.png").is_file()
    (tmp_path / "run" / "eval" / "eval.json").unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    messages = []
    plot_runs([tmp_path / "run"], tmp_path / "out", per_class=2, num_reconstructions=2, projection="pca",
              log=messages.append)
    assert not (tmp_path / "out" / "comparison.md").exists() and not (tmp_path / "out" / "rate_quality.png").exists()
    assert any("no comparison.md" in m for m in messages)


def test_curves_mark_nonfinite_steps_leave_schedules_unsmoothed_and_tick_whole_steps(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    records = [{"step": s, "loss": 1 / s, "lr": 1e-3 * (1 - s / 40), "bottleneck/temperature": 0.07}
               for s in range(1, 31)]
    records[9]["loss"] = "nan"  # as the trainers write a NaN; the line used to join over it unmarked
    records[19]["loss"] = float("inf")
    plots.plot_training_curves(records, tmp_path / "c.png")
    panels = {ax.get_title().split("  ")[0]: ax for ax in drawn[0].axes if ax.get_visible()}
    assert panels["loss"].get_title() == "loss  (2 non-finite, red)"
    marks = [line for line in panels["loss"].lines if line.get_linestyle() == ":"]
    assert sorted(float(line.get_xdata()[0]) for line in marks) == [10.0, 20.0]
    lr = panels["lr"].lines  # a schedule: its raw line alone (a smoothed lr lagged 19x at a cosine's end)
    assert len(lr) == 1 and np.allclose(lr[0].get_ydata(), [r["lr"] for r in records])
    # a fixed τ is one line of text in a shared panel, not a flat line of its own
    assert "bottleneck/temperature" not in panels and not panels["unchanged over the run"].lines
    assert [t.get_text() for t in panels["unchanged over the run"].texts] == ["bottleneck/temperature = 0.07"]
    plots.plot_training_curves(records[:2], tmp_path / "short.png")
    ticks = drawn[1].axes[0].get_xticks()
    assert np.allclose(ticks, np.round(ticks))  # a two-step run read 0.96 ... 1.04


def test_reconstruction_rows_name_their_photo_and_whether_the_run_trained_on_it(tmp_path, monkeypatch):
    make_run(tmp_path / "run", with_eval=False)
    (tmp_path / "run" / "config.yaml").write_text("data: {source: bundled, holdout: [chelsea, china]}\n")
    seen = {}
    real = plots.plot_reconstructions
    monkeypatch.setattr(plots, "plot_reconstructions",
                        lambda *a, row_labels=None, **k: seen.setdefault("rows", row_labels) and real(*a, **k))
    plot_runs([tmp_path / "run"], tmp_path / "out", per_class=1, num_reconstructions=12, projection="pca",
              log=lambda m: None)
    rows = seen["rows"]
    assert "chelsea (held out)" in rows and "astronaut (trained on)" in rows  # was: unnamed rows, no word


def test_held_out_curves_follow_the_losses_unsmoothed_and_the_title_says_what_they_measure(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    records = []  # as the trainer writes them: a grid's metrics in its step's record, step 0's alone
    for s in range(0, 41):
        record = {"step": s, **({"loss": 1 / s, "rec": 2 / s} if s else {})}
        records.append({**record, **({"heldout/psnr": 10 + s / 4} if s % 4 == 0 else {})})  # 11 points: smoothable
    plots.plot_training_curves(records, tmp_path / "c.png")
    shown = [ax for ax in drawn[0].axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["loss", "heldout/psnr  (dB, higher is better)", "rec"]
    assert len(shown[1].lines) == 1 and np.allclose(shown[1].lines[0].get_ydata(), [10 + s / 4 for s in range(0, 41, 4)])
    assert shown[1].lines[0].get_marker() == "o" and shown[0].lines[0].get_marker() in ("None", None, "")
    assert "heldout/*: the EMA weights on the held-out images" in drawn[0]._suptitle.get_text()


def test_a_spike_does_not_flatten_its_curve_and_the_subtitle_says_only_what_is_drawn(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    rng = np.random.default_rng(0)
    gan = 1.0 + 0.05 * rng.standard_normal(200)
    gan[120] = 40.0  # one GAN spike in a long run
    falling = np.linspace(2.0, 0.05, 200)  # the plateau near the end is what matters
    signed = 0.1 * rng.standard_normal(200)
    signed[50] = -30.0
    plots.plot_training_curves([{"step": s, "adversarial": gan[s], "rec": falling[s], "align": signed[s]}
                                for s in range(200)], tmp_path / "c.png")
    axes = {ax.get_title().split("  ")[0]: ax for ax in drawn[0].axes if ax.get_visible()}
    assert axes["rec"].get_yscale() == "log"  # 40x from start to end
    assert axes["adversarial"].get_yscale() == "log"  # a positive spike: log keeps both in view
    low, high = axes["align"].get_ylim()
    assert low > -1 and high < 1 and "1 outlier(s) off the scale" in axes["align"].get_title()
    assert all(ax.get_xlim() == axes["rec"].get_xlim() for ax in axes.values())
    assert "EMA 0.6" in drawn[0]._suptitle.get_text()
    drawn.clear()  # five records: nothing is smoothed, and the subtitle must not say it is
    plots.plot_training_curves([{"step": s, "rec": 1.0 / (s + 1)} for s in range(5)], tmp_path / "c.png")
    assert "EMA" not in drawn[0]._suptitle.get_text()


def test_codebook_usage_of_several_codebooks_gives_each_its_own_row(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    counts = np.zeros((4, 64))
    counts[np.arange(4), np.arange(4) * 10] = [5, 50, 500, 1]  # codebook j uses code 10 j alone
    plots.plot_codebook_usage(counts, tmp_path / "u.png", title="run")
    left, right = drawn[0].axes[:2]
    [image] = left.images  # a heatmap row per codebook: overlaid outlines hid each other
    data = np.ma.filled(image.get_array().astype(float), np.nan)
    assert data.shape == (4, 64) and np.nanargmax(data, axis=1).tolist() == [0, 10, 20, 30]
    assert np.isnan(data).sum() == 4 * 63  # unused codes are blank, not the lowest colour
    title = drawn[0]._suptitle.get_text()
    assert title == "run: argmax codes: usage 1.6% of 64, perplexity 1.0 (mean of 4 codebooks); 556 tokens"
    assert right.yaxis.get_major_formatter()(20.0, 0) == "20"  # not 2×10¹


def test_a_term_at_weight_one_is_drawn_once(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    records = [{"step": s, "rec": 1 / (s + 1), "rec_weighted": 1 / (s + 1),  # λ = 1: the same numbers
                "align": 2 / (s + 1), "align_weighted": 0.2 / (s + 1)} for s in range(12)]
    plots.plot_training_curves(records, tmp_path / "c.png")
    titles = sorted(ax.get_title().split("  ")[0] for ax in drawn[0].axes if ax.get_visible())
    assert titles == ["align", "align_weighted", "rec"]


def test_too_few_plot_images_for_a_projection_are_named(tmp_path):
    """Was: latents.png left out without the note the help promises (one class of 2 images)."""
    from PIL import Image

    make_run(tmp_path / "run", with_eval=False)
    (tmp_path / "imgs" / "cats").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 90 * i, np.uint8)).save(tmp_path / "imgs" / "cats" / f"{i}.png")
    messages = []
    plot_runs([tmp_path / "run"], tmp_path / "out", images=tmp_path / "imgs", per_class=2, num_reconstructions=2,
              projection="pca", log=messages.append)
    assert not list((tmp_path / "out").rglob("latents.png"))
    assert any("no latents.png: 2 plot image(s) of one class" in m for m in messages), messages


def test_near_constant_and_once_logged_values_are_text_and_four_panels_are_two_by_two(tmp_path, monkeypatch):
    """Were: a held-out PSNR of 7.014727 ± 1e-8 drew an axis "1e-8+7.014727" over its title, a run of
    one log record drew a panel per value on a step axis of -0.045 ... 0.045, and four panels left
    the lower two thirds of the figure blank."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    records = [{"step": s, "loss": 1 / s, "rec": 2 / s, "lr": 1e-3 * (1 - s / 40),
                "heldout/psnr": 7.014727 + 1e-8 * (s % 2)} for s in range(1, 31)]
    plots.plot_training_curves(records, tmp_path / "c.png")
    shown = {ax.get_title().split("  ")[0]: ax for ax in drawn[0].axes if ax.get_visible()}
    assert set(shown) == {"loss", "rec", "lr", "unchanged over the run"}
    assert [t.get_text() for t in shown["unchanged over the run"].texts] == ["heldout/psnr = 7.015"]
    assert drawn[0].axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 2)
    plots.plot_training_curves(records[:1], tmp_path / "one.png")
    shown = [ax for ax in drawn[1].axes if ax.get_visible()]
    assert len(shown) == 1 and shown[0].get_title() == "logged once, at step 1"
    assert shown[0].texts[0].get_text().splitlines()[0] == "heldout/psnr = 7.015"


def test_the_latent_projection_names_its_axes_and_the_rate_chart_has_a_title(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    rng = np.random.default_rng(2)
    plots.plot_latent_projection(rng.standard_normal((12, 6)), rng.standard_normal((12, 6)), np.arange(12) % 3,
                                 tmp_path / "latents.png", method="pca")
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in drawn[0].axes] == [("PC 1", "PC 2")] * 2
    plots.plot_rate_quality([{"name": "a", "num_tokens": 64, "latent_dim": 32, "rfid": 1.0}], tmp_path / "r.png")
    assert drawn[1]._suptitle.get_text() == "reconstruction quality against rate, one point per run"


def _fake_export(folder, bottleneck):
    """An export folder as read_run sees it: config.json of our format and a weights file."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format": "softvq-tokenizer",
                                                    "config": {"num_tokens": 16, "bottleneck": bottleneck}}))
    (folder / "model.safetensors").write_bytes(b"")


def test_an_export_with_weights_but_no_config_is_not_taken_for_the_model(tmp_path):
    """An export/ a killed export left with model.safetensors and no config.json is no model: the
    run stands for its newest checkpoint instead, as while it trains."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "model.safetensors").write_bytes(b"")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-00000004.pt").write_bytes(b"")
    (run / "config.yaml").write_text("model: {num_tokens: 16}\n")
    folder = read_run(run)
    assert folder.export == run / "checkpoints" / "step-00000004.pt"
    assert folder.model_config == {"num_tokens": 16}


def test_a_generator_runs_checkpoints_do_not_stand_in_for_a_tokenizer_export(tmp_path):
    """A train-generator run has checkpoints/ but no config.yaml: its newest checkpoint is a
    generator's, not a tokenizer to draw reconstructions with."""
    run = tmp_path / "gen"
    (run / "generator").mkdir(parents=True)
    (run / "generator" / "config.json").write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-00000002.pt").write_bytes(b"")
    folder = read_run(run)
    assert folder.export is None and not any("no export/ yet" in n for n in folder.notes)
    said = []
    plot_runs([run], tmp_path / "out", log=said.append)  # its curves only; no tokenizer is loaded
    assert any("a generator run: its training curves only" in m for m in said), said


def test_the_exports_model_config_is_not_replaced_by_config_yaml(tmp_path):
    """The export's config.json gives the bottleneck; a config.yaml without a model section (or with
    another) must not replace it."""
    _fake_export(tmp_path / "run" / "export", {"kind": "softvq", "codebook_size": 256, "temperature": 0.07})
    (tmp_path / "run" / "config.yaml").write_text("data: {source: bundled, holdout: [chelsea]}\n")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"psnr": 12.5}))
    run = read_run(tmp_path / "run")
    assert run.model_config["bottleneck"]["codebook_size"] == 256 and run.bundled_holdout == ["chelsea"]
    assert comparison_row(run)["kind"] == "softvq K=256 τ=0.07"


def test_a_learnable_temperature_is_labelled_as_such():
    """A learnable τ is labelled as such, a fixed one by its value."""
    assert bottleneck_label({"bottleneck": {"kind": "softvq", "codebook_size": 8, "temperature": 0.07,
                                            "learnable_temperature": True}}) == "softvq K=8 τ learnable"
    assert bottleneck_label({"bottleneck": {"kind": "softvq", "codebook_size": 8, "temperature": 0.07,
                                            "learnable_temperature": False}}) == "softvq K=8 τ=0.07"


def test_tokens_cell_needs_both_the_token_count_and_the_latent_width(tmp_path):
    """A run whose report gives the token count but no latent width has no "L x D" cell (not "16 x None")."""
    run = RunFolder(path=tmp_path, name="r", evaluation={"num_tokens": 16, "psnr": 20.0})
    assert comparison_row(run)["tokens"] is None
    run = RunFolder(path=tmp_path, name="r", evaluation={"num_tokens": 16, "latent_dim": 8, "psnr": 20.0})
    assert comparison_row(run)["tokens"] == "16 x 8"


def test_measured_on_names_the_image_count_then_the_image_size(tmp_path):
    """comparison.md says "eval, N images at S px", count first."""
    run = RunFolder(path=tmp_path, name="r", evaluation={"num_images": 50, "image_size": 256, "psnr": 20.0})
    assert comparison_row(run)["measured_on"] == "eval, 50 images at 256 px"


def test_comparison_table_separator_has_one_cell_per_column():
    """The separator row of comparison.md has one cell per column."""
    lines = comparison_markdown([{"name": "a", "psnr": 20.0, "rfid": 1.0}]).splitlines()
    columns = lines[0].count("|") - 1
    assert columns == 6 and lines[1] == "|" + "---|" * columns
    assert all(line.count("|") - 1 == columns for line in lines)


def test_a_damaged_export_is_a_note_and_the_other_runs_are_still_drawn(tmp_path):
    make_run(tmp_path / "bad")
    make_run(tmp_path / "good")
    (tmp_path / "bad" / "export" / "model.safetensors").write_bytes(b"cut short")
    said = []
    written = plot_runs([tmp_path / "bad", tmp_path / "good"], tmp_path / "out", per_class=2, num_reconstructions=2,
                        projection="pca", log=said.append)
    assert any(line.startswith("bad: no reconstruction / codebook / latent plots: checkpoint file") and
               "is corrupt or unreadable" in line for line in said), said
    assert {p.parent.name for p in written if p.name == "reconstructions.png"} == {"good"}
    assert (tmp_path / "out" / "bad" / "training_curves.png").exists()
