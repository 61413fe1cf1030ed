"""What the pictures show and where their inputs come from, one promise at a time: the curves,
histograms and projections `softvq plot` draws (inspected through their matplotlib objects, with
plots._save replaced so nothing is rasterised), how plot reads a run, the image sources eval
reads (folders, shards, sample packs), its saved state on Ctrl-C, and pretokenize's sources."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from softvq.evaluation import plots


@pytest.fixture
def drawn(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def _visible_panels(fig):
    return {ax.get_title().split("  ")[0]: ax for ax in fig.axes if ax.get_visible()}


# --- plots.plot_reconstructions --------------------------------------------------------------------


def test_reconstruction_grid_shows_the_reconstruction_its_error_map_and_its_psnr(drawn, tmp_path):
    """Columns are original | reconstruction | mean |x - x̂| over RGB in [0, 1]; the xlabel is the
    row's PSNR (data range 1), computed here from the MSE directly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    plots.plot_reconstructions(x, y, tmp_path / "r.png")
    axes = np.asarray(drawn[0].axes[:6]).reshape(2, 3)
    a = x.permute(0, 2, 3, 1).double().numpy() / 255
    b = y.permute(0, 2, 3, 1).double().numpy() / 255
    for i in range(2):
        np.testing.assert_allclose(axes[i, 0].images[0].get_array(), a[i], atol=1e-6)
        np.testing.assert_allclose(axes[i, 1].images[0].get_array(), b[i], atol=1e-6)
        np.testing.assert_allclose(axes[i, 2].images[0].get_array(), np.abs(a[i] - b[i]).mean(-1), atol=1e-6)
        mse = ((a[i] - b[i]) ** 2).mean()
        assert axes[i, 1].get_xlabel() == f"PSNR {10 * math.log10(1 / mse):.2f} dB"


# --- plots.numeric_series / nonfinite_steps / plot_training_curves ---------------------------------


def test_numeric_series_keeps_finite_numbers_only():
    """Only finite numeric values become curves: JSON booleans and inf / NaN floats do not."""
    records = [{"step": 0, "loss": 1.0, "flag": True, "bad": float("inf")},
               {"step": 1, "loss": 0.5, "flag": False, "bad": 2.0}]
    series = plots.numeric_series(records)
    assert set(series) == {"loss", "bad"}
    assert series["bad"][0].tolist() == [1.0] and series["bad"][1].tolist() == [2.0]


def test_nonfinite_steps_include_negative_infinity_as_the_trainers_write_it():
    """The trainers write -inf as the string "-inf": that step is non-finite too."""
    records = [{"step": 3, "loss": "-inf"}, {"step": 4, "loss": "nan"}, {"step": 5, "loss": float("-inf")},
               {"step": 6, "loss": 1.0}]
    assert plots.nonfinite_steps(records) == {"loss": [3.0, 4.0, 5.0]}


def test_learning_rates_and_weights_of_a_term_are_drawn_raw_not_smoothed(drawn, tmp_path):
    """A scheduled value (``*_lr``, ``*_weight``) gets its raw line alone, while a loss of the same
    length gets raw + EMA."""
    records = [{"step": s, "loss": 1 / (s + 1) + 0.1 * (s % 2), "disc_lr": 1e-3 * (1 - s / 20),
                "adv_weight": 0.1 * s} for s in range(12)]
    plots.plot_training_curves(records, tmp_path / "c.png")
    panels = _visible_panels(drawn[0])
    assert len(panels["loss"].lines) == 2
    assert len(panels["disc_lr"].lines) == 1 and len(panels["adv_weight"].lines) == 1


def test_keys_choose_the_panels(drawn, tmp_path):
    """``keys`` limits the figure to those scalars."""
    records = [{"step": s, "loss": 1 / (s + 1), "rec": 2 / (s + 1), "lr": 1e-3 * s} for s in range(5)]
    plots.plot_training_curves(records, tmp_path / "c.png", keys=["rec"])
    assert list(_visible_panels(drawn[0])) == ["rec"]


def test_a_constant_value_with_nonfinite_steps_keeps_its_own_marked_panel(drawn, tmp_path):
    """Non-finite steps are red dotted lines counted in the panel's title: a value otherwise
    constant is not hidden in the text panel, where the marks would be lost."""
    records = [{"step": s, "loss": 1 / (s + 1), "aux": 0.5} for s in range(1, 8)]
    records[3]["aux"] = "nan"
    plots.plot_training_curves(records, tmp_path / "c.png")
    panels = _visible_panels(drawn[0])
    assert panels["aux"].get_title() == "aux  (1 non-finite, red)"
    assert [line.get_xdata()[0] for line in panels["aux"].lines if line.get_linestyle() == ":"] == [4.0]


def test_the_smoothed_line_is_the_bias_corrected_ema_of_the_smoothing_weight(drawn, tmp_path):
    """The solid line over the faint raw one is TensorBoard's bias-corrected EMA with weight
    ``smoothing`` (reference: the explicit weighted mean)."""
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0, 8.0])
    w = 0.8
    plots.plot_training_curves([{"step": s, "loss": float(v)} for s, v in enumerate(values)], tmp_path / "c.png",
                               smoothing=w)
    raw, ema = _visible_panels(drawn[0])["loss"].lines
    expected = [sum((1 - w) * w ** (i - j) * values[j] for j in range(i + 1)) / (1 - w ** (i + 1))
                for i in range(len(values))]
    np.testing.assert_allclose(raw.get_ydata(), values)
    np.testing.assert_allclose(ema.get_ydata(), expected, rtol=1e-12)


def test_values_logged_once_at_different_steps_name_no_single_step(drawn, tmp_path):
    """"logged once, at step N" only when every once-logged value was logged at that one step."""
    plots.plot_training_curves([{"step": 1, "a": 1.0}, {"step": 2, "b": 2.0}], tmp_path / "c.png")
    [panel] = [ax for ax in drawn[0].axes if ax.get_visible()]
    assert panel.get_title() == "logged once"


def test_points_clipped_above_the_percentile_range_are_counted_too(drawn, tmp_path):
    """A signed series with a spike: the axis shows the 1st-99th percentile range (+15% margin)
    and the title counts the points left off the scale, above as well as below."""
    rng = np.random.default_rng(0)
    y = 0.1 * rng.standard_normal(200)
    y[50], y[150] = 30.0, -30.0
    plots.plot_training_curves([{"step": s, "align": float(y[s])} for s in range(200)], tmp_path / "c.png")
    ax = _visible_panels(drawn[0])["align"]
    low, high = np.percentile(y, [1, 99])
    margin = 0.15 * (high - low)
    np.testing.assert_allclose(ax.get_ylim(), (low - margin, high + margin))
    outside = int(((y < low - margin) | (y > high + margin)).sum())
    assert outside >= 2 and f"{outside} outlier(s) off the scale" in ax.get_title()


# --- plots.plot_codebook_usage -------------------------------------------------------------------------


def test_rank_plot_draws_counts_from_the_most_used_code_down_on_log_axes(drawn, tmp_path):
    """Right panel: rank 1..K against the counts sorted in decreasing order (unused codes blank),
    on a log count axis, and a log rank axis for K >= 16."""
    counts = np.zeros(32)
    counts[[3, 7, 20]] = [5, 40, 1]
    plots.plot_codebook_usage(counts, tmp_path / "u.png")
    right = drawn[0].axes[1]
    [line] = right.lines
    assert np.asarray(line.get_xdata()).tolist() == list(range(1, 33))
    y = np.asarray(line.get_ydata(), dtype=float)
    assert y[:3].tolist() == [40.0, 5.0, 1.0] and np.isnan(y[3:]).all()
    assert right.get_yscale() == "log" and right.get_xscale() == "log"
    assert (right.get_xlabel(), drawn[0].axes[0].get_xlabel()) == ("rank", "code index")


# --- plots.plot_latent_projection / plot_codewords -------------------------------------------------------


def _pca_reference(x):
    from sklearn.decomposition import PCA

    return PCA(2).fit_transform(np.asarray(x, dtype=np.float64).reshape(len(x), -1))


def test_latent_projection_puts_features_left_and_latents_right_named_by_label(drawn, tmp_path):
    """ẑ (encoder output) on the left, z (decoder input) on the right, each its own PCA; a point's
    legend entry is ``class_names[label]`` (labels need not be 0..n-1)."""
    rng = np.random.default_rng(3)
    labels = np.array([0, 2, 0, 2, 0, 2, 0, 2])
    feats = rng.standard_normal((8, 5)) * np.arange(5, 0, -1)
    lats = rng.standard_normal((8, 3)) * np.array([4.0, 2.0, 1.0])
    plots.plot_latent_projection(feats, lats, labels, tmp_path / "l.png", class_names=["zero", "one", "two"],
                                 method="pca")
    left, right = drawn[0].axes[:2]
    assert left.get_title().startswith("ẑ (encoder output)") and right.get_title().startswith("z (decoder input)")
    for ax, data in ((left, feats), (right, lats)):
        ref = _pca_reference(data)
        for points, c in zip(ax.collections, (0, 2)):
            np.testing.assert_allclose(np.abs(points.get_offsets()), np.abs(ref[labels == c]), rtol=1e-6, atol=1e-9)
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["zero", "two"]


def test_codewords_are_placed_in_the_tokens_centred_principal_axes(drawn, tmp_path):
    """Both sets use the tokens' PCA basis about the tokens' mean: a codeword equal to a token is
    drawn exactly on that token; never-picked codewords are the grey crosses, counted in the legend."""
    rng = np.random.default_rng(4)
    tokens = rng.standard_normal((20, 4)) * np.array([3.0, 2.0, 1.0, 0.5]) + 5.0
    codewords = tokens[[2, 7, 11]].copy()
    plots.plot_codewords(codewords, tokens, tmp_path / "c.png", counts=np.array([4, 0, 1]))
    ax = drawn[0].axes[0]
    crosses, token_points, picked = ax.collections
    txy = token_points.get_offsets()
    np.testing.assert_allclose(np.abs(txy), np.abs(_pca_reference(tokens)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(crosses.get_offsets(), txy[[7]], atol=1e-9)
    np.testing.assert_allclose(picked.get_offsets(), txy[[2, 11]], atol=1e-9)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "1 codewords never picked" and "2 codewords picked" in labels


# --- plots.plot_rate_quality -------------------------------------------------------------------------------


def test_rate_axis_is_tokens_times_dim_on_a_log2_scale(drawn, tmp_path):
    """Each run's point sits at x = num_tokens * latent_dim (its rate), y = its metric."""
    runs = [{"name": "a", "kind": "vq", "num_tokens": 32, "latent_dim": 8, "rfid": 2.0},
            {"name": "b", "kind": "kl", "num_tokens": 64, "latent_dim": 32, "rfid": 1.0}]
    plots.plot_rate_quality(runs, tmp_path / "r.png")
    [ax] = drawn[0].axes
    points = sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.lines)
    assert points == [(256.0, 2.0), (2048.0, 1.0)]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2


def test_names_of_runs_at_one_rate_are_stacked_from_the_highest_point_down(drawn, tmp_path):
    """Names at one rate form a column from the highest point down: the higher run's name is
    printed above the lower run's."""
    runs = [{"name": "low", "kind": "vq", "num_tokens": 64, "latent_dim": 32, "rfid": 1.0},
            {"name": "high", "kind": "kl", "num_tokens": 64, "latent_dim": 32, "rfid": 9.0}]
    plots.plot_rate_quality(runs, tmp_path / "r.png")
    fig = drawn[0]
    fig.canvas.draw()
    [ax] = fig.axes
    y = {t.get_text(): t.get_window_extent().y0 for t in ax.texts if t.get_text() in ("low", "high")}
    assert y["high"] > y["low"]
    top = ax.transData.transform((2048, 9.0))[1]
    assert abs(ax.texts[[t.get_text() for t in ax.texts].index("high")].get_window_extent().y0 - top) < 20


# --- runs ----------------------------------------------------------------------------------------------------


def _tiny_export(folder, **bottleneck):
    """A small tokenizer saved as a run's export/ (random weights; seeded)."""
    import softvq
    from softvq.config import BottleneckConfig, TokenizerConfig, ViTConfig

    torch.manual_seed(0)
    vit = ViTConfig(width=32, depth=1, heads=2)
    cfg = TokenizerConfig(image_size=32, patch_size=8, num_tokens=8, encoder=vit, decoder=vit,
                          bottleneck=BottleneckConfig(**{"latent_dim": 4, "codebook_size": 16, **bottleneck}))
    model = softvq.Tokenizer(cfg).eval()
    model.save_pretrained(folder / "export")
    return model


def _image_folder(root, classes=("a", "b"), per_class=3, size=40):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_config_without_weights_is_not_taken_for_the_export(tmp_path):
    """An export needs both config.json and the weights: a folder with the config alone is no model."""
    from softvq.evaluation.runs import read_run

    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "config.json").write_text(json.dumps({"config": {"num_tokens": 16}}))
    run = read_run(tmp_path / "run")
    assert run.export is None and run.model_config is None


def test_a_config_yaml_without_a_data_source_trained_on_the_bundled_photos(tmp_path):
    """data.source defaults to "bundled" (as in the training config): its holdout list is read."""
    from softvq.evaluation.runs import read_run
    from softvq.training.config import DataConfig

    assert DataConfig().source == "bundled"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data: {holdout: [chelsea]}\n")
    assert read_run(tmp_path / "run").bundled_holdout == ["chelsea"]


def test_rate_point_takes_the_rate_the_eval_report_measured(tmp_path):
    """num_tokens / latent_dim come from ``softvq eval``'s report where the config lacks them."""
    from softvq.evaluation.runs import rate_point, read_run

    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "eval.json").write_text(json.dumps({"rfid": 3.0, "psnr": 20.0, "num_tokens": 32,
                                                                     "latent_dim": 12}))
    (tmp_path / "run" / "config.yaml").write_text("model: {bottleneck: {kind: vq}}\n")
    point = rate_point(read_run(tmp_path / "run"))
    assert (point["kind"], point["num_tokens"], point["latent_dim"], point["rfid"]) == ("vq", 32, 12, 3.0)


def test_bottleneck_labels_name_learnable_temperature_and_the_codebook_loss():
    """Supp. Tabs. 5-6 rows differ by a learnable τ and the codebook / commitment losses."""
    from softvq.evaluation.runs import bottleneck_label

    assert bottleneck_label({"bottleneck": {"kind": "softvq", "codebook_size": 64, "temperature": 0.07,
                                            "learnable_temperature": True, "codebook_loss": True}}) == \
        "softvq K=64 τ learnable +codebook"
    assert bottleneck_label({"bottleneck": {"kind": "softvq", "codebook_size": 64, "temperature": 0.5,
                                            "learnable_temperature": False, "codebook_loss": True,
                                            "commit_loss": True}}) == "softvq K=64 τ=0.5 +codebook +commit"


def test_reconstruction_rows_take_one_image_per_class_first():
    """Up to n indices, one per class first (in class order), then the others in order."""
    from softvq.evaluation.runs import _first_of_each_class

    assert _first_of_each_class(np.array([0, 0, 0, 1, 1, 2]), 5) == [0, 3, 5, 1, 2]
    assert _first_of_each_class(np.array([1, 0, 1]), 2) == [1, 0]


def _capture(monkeypatch, name):
    """Record the arguments of plots.<name> (and still draw nothing)."""
    calls = []
    monkeypatch.setattr(plots, name, lambda *a, **k: calls.append((a, k)) or a[1])
    return calls


def test_rows_of_other_images_do_not_claim_the_bundled_photos_train_held_out_split(tmp_path, monkeypatch):
    """"held out" / "trained on" names the bundled photos a run trained on; with --images the rows
    are those images' classes, which the run's bundled split says nothing about."""
    from softvq.evaluation.runs import plot_runs

    _tiny_export(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("data: {source: bundled, holdout: [a]}\n")
    images = _image_folder(tmp_path / "imgs", per_class=2)
    calls = _capture(monkeypatch, "plot_reconstructions")
    plot_runs([tmp_path / "run"], tmp_path / "out", images=images, per_class=2, num_reconstructions=2,
              projection="pca", log=lambda m: None)
    assert calls[0][1]["row_labels"] == ["a", "b"]


def test_the_codebook_histogram_draws_the_eval_reports_counts_where_there_are_some(tmp_path, monkeypatch):
    """An eval report's codebook_counts (over its eval images) are the histogram's, not the few plot images'."""
    from softvq.evaluation.runs import plot_runs

    _tiny_export(tmp_path / "run", kind="softvq")
    saved = [[0] * 15 + [7]]
    (tmp_path / "run" / "eval.json").write_text(json.dumps({"psnr": 10.0, "num_images": 7, "codebook_counts": saved}))
    calls = _capture(monkeypatch, "plot_codebook_usage")
    plot_runs([tmp_path / "run"], tmp_path / "out", images=_image_folder(tmp_path / "imgs", per_class=2),
              per_class=2, num_reconstructions=2, projection="pca", log=lambda m: None)
    (counts, _), kwargs = calls[0]
    assert np.asarray(counts).tolist() == saved and kwargs["title"] == "run (7 eval images)"


def test_the_codewords_picture_colours_the_first_codebook_by_its_own_counts(tmp_path, monkeypatch):
    """With S segment codebooks the picture shows segment 1's codewords, so its counts are how often
    argmax picked each of them among segment 1's tokens (the first L/S) of the plot images."""
    from softvq.evaluation.runs import plot_images, plot_runs
    from softvq.evaluation.sources import uint8_to_model

    model = _tiny_export(tmp_path / "run", kind="softvq", segments=2)
    images = _image_folder(tmp_path / "imgs", per_class=3)
    calls = _capture(monkeypatch, "plot_codewords")
    plot_runs([tmp_path / "run"], tmp_path / "out", images=images, per_class=3, num_reconstructions=2,
              projection="pca", log=lambda m: None)
    imgs = plot_images(32, images, per_class=3)[0]
    with torch.no_grad():
        indices = model.encode(uint8_to_model(imgs)).indices
    first = indices[:, : indices.shape[1] // 2].reshape(-1)
    expected = np.bincount(first.numpy(), minlength=16)
    other = np.bincount(indices[:, indices.shape[1] // 2:].reshape(-1).numpy(), minlength=16)
    assert not np.array_equal(expected, other)  # the two segments' counts tell the mutant apart
    assert np.asarray(calls[0][1]["counts"]).tolist() == expected.tolist()


def test_one_class_of_three_or_more_images_still_gets_a_latent_projection(tmp_path, monkeypatch):
    """Only one class of one or two images is too little for a 2D projection; three images of one class are drawn."""
    from softvq.evaluation.runs import plot_runs

    _tiny_export(tmp_path / "run")
    calls = _capture(monkeypatch, "plot_latent_projection")
    plot_runs([tmp_path / "run"], tmp_path / "out", images=_image_folder(tmp_path / "imgs", classes=("cats",)),
              per_class=3, num_reconstructions=2, projection="pca", log=lambda m: None)
    assert len(calls) == 1 and len(calls[0][0][2]) == 3


# --- sources -------------------------------------------------------------------------------------------------


def _npz(path, n=4, h=6, w=5, channels=3):
    pixels = np.random.default_rng(5).integers(0, 256, (n, h, w, channels), dtype=np.uint8)
    np.savez(path, pixels)
    return pixels


def test_sample_batch_rows_read_in_place_honour_the_limit(tmp_path):
    """Row i of arr_0, read in place, is image i; only the first ``limit`` rows are listed."""
    from softvq.evaluation.sources import list_image_refs, sample_batch_refs

    pixels = _npz(tmp_path / "s.npz")
    refs = sample_batch_refs(tmp_path / "s.npz")
    assert [np.asarray(r.open_rgb()).tolist() for r in refs] == [p.tolist() for p in pixels]
    assert len(sample_batch_refs(tmp_path / "s.npz", limit=2)) == 2
    refs, files, root = list_image_refs(tmp_path / "s.npz", 3)
    assert [r.index for r in refs] == [0, 1, 2] and files == [tmp_path / "s.npz"] and root is None


def test_a_sample_batch_cut_short_is_an_unreadable_image_not_a_crash(tmp_path):
    """A row past the file's end reads as ImageReadError naming the row."""
    from softvq.data.images import ImageReadError
    from softvq.evaluation.sources import sample_batch_refs

    _npz(tmp_path / "s.npz")
    refs = sample_batch_refs(tmp_path / "s.npz")
    data = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "s.npz").write_bytes(data[: refs[-1].offset + 3 * 6 * 5 + 10])  # inside row 3
    with pytest.raises(ImageReadError, match=r"s\.npz\[3\]: the file ends inside this image"):
        refs[-1].open_rgb()


def test_a_sample_batch_must_be_rgb(tmp_path):
    """arr_0 must be (N, H, W, 3) uint8: RGBA rows are refused."""
    from softvq.evaluation.sources import sample_batch_refs

    _npz(tmp_path / "s.npz", channels=4)
    with pytest.raises(ValueError, match="a sample batch is"):
        sample_batch_refs(tmp_path / "s.npz")


def _shard(path, names):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name in names:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (len(name) * 20 % 256, 0, 0)).save(buf, "PNG")
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))


def test_the_first_limit_images_and_only_the_files_they_live_in(tmp_path):
    """list_image_refs gives the first ``limit`` images in protocol order and the files they live in:
    for a folder its first files, for shards only the shards those images come from."""
    from softvq.evaluation.sources import list_image_refs

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / f"{i}.png")
    refs, files, root = list_image_refs(tmp_path / "imgs", 2)
    assert files == [tmp_path / "imgs" / "0.png", tmp_path / "imgs" / "1.png"] and len(refs) == 2
    _shard(tmp_path / "s-0.tar", ["a.png", "b.png", "c.png"])
    _shard(tmp_path / "s-1.tar", ["d.png", "e.png"])
    refs, files, _ = list_image_refs(str(tmp_path / "s-{0..1}.tar"), 2)
    assert [r.member for r in refs] == ["a.png", "b.png"] and files == [tmp_path / "s-0.tar"]
    refs, files, _ = list_image_refs(str(tmp_path / "s-{0..1}.tar"), 4)
    assert [r.member for r in refs] == ["a.png", "b.png", "c.png", "d.png"]
    assert files == [tmp_path / "s-0.tar", tmp_path / "s-1.tar"]


def test_a_resumed_tail_of_unreadable_images_is_no_error_when_readability_is_not_required(tmp_path):
    """require_readable=False (the tail of a resumed run): all-unreadable refs yield nothing and are named."""
    from softvq.data.images import ImageReadError
    from softvq.evaluation.sources import ImageRef, readable_batches

    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
    refs = [ImageRef(tmp_path / f"{i}.png") for i in range(2)]
    skipped: list[str] = []
    assert list(readable_batches(refs, 16, 2, 0, skipped, require_readable=False)) == []
    assert len(skipped) == 2
    with pytest.raises(ImageReadError, match="none of the first 2 images"):
        list(readable_batches(refs, 16, 2, 0, []))


def test_uint8_images_map_to_the_tokenizers_minus_one_to_one_range():
    """0 -> -1, 255 -> +1, linearly."""
    from softvq.evaluation.sources import uint8_to_model

    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(uint8_to_model(x).flatten(), torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))


# --- saved_state -----------------------------------------------------------------------------------------------


class _Closable:
    closed = False

    def close(self):
        self.closed = True


def test_kept_work_saves_on_ctrl_c_only_between_updates_and_when_there_is_work(tmp_path):
    """Stopped mid-update (a partial batch) or with no work done, nothing is saved; otherwise the
    loader is closed, the state saved, and the interrupt passed on."""
    from softvq.evaluation.saved_state import KeptWork

    for updating, what, expect in ((True, "3 images", False), (False, None, False), (False, "3 images", True)):
        saves = []
        batches = _Closable()
        kept = KeptWork(tmp_path / "s.pt", lambda: saves.append(1), 1e9, batches)
        with pytest.raises(KeyboardInterrupt):
            with kept.kept_when_stopped(lambda: what):
                kept.updating = updating
                raise KeyboardInterrupt
        assert (bool(saves), batches.closed) == (expect, expect)


def test_kept_work_without_a_state_file_never_saves():
    """state_file None: tick() keeps nothing, however often it is called."""
    from softvq.evaluation.saved_state import KeptWork

    saves = []
    kept = KeptWork(None, lambda: saves.append(1), 0.0, _Closable())
    kept.tick()
    assert saves == []


# --- latent_sources ----------------------------------------------------------------------------------------------


def test_a_single_class_folder_source_puts_every_image_of_the_sub_folders_in_class_0(tmp_path):
    """single_class=True: one class named after the folder, every label 0, whatever the sub-folders."""
    from softvq.generation.latent_sources import folder_source

    root = _image_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=2)
    source = folder_source(root, 16, single_class=True)
    samples = list(source.samples)
    assert source.classes == ["pets"] and source.count == 4 and [s[1] for s in samples] == [0, 0, 0, 0]
    assert source.identity["classes"] == ["pets"]


def test_a_folder_source_resumes_a_slice_from_start_to_stop(tmp_path):
    """resume_from(start, stop): the samples at positions [start, stop), for processes to split a run."""
    from softvq.generation.latent_sources import folder_source

    root = _image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    whole = [s[2] for s in folder_source(root, 16).samples]
    assert [s[2] for s in folder_source(root, 16).resume_from(1, 4)] == whole[1:4]


def test_bundled_source_counts_every_crop_and_refuses_zero_crops():
    """count = photos x crops_per_photo, as many samples as are yielded; crops_per_photo >= 1."""
    from softvq.data.images import bundled_photos
    from softvq.generation.latent_sources import bundled_source

    source = bundled_source(8, crops_per_photo=2)
    assert source.count == 2 * len(bundled_photos()) == len(list(source.samples))
    with pytest.raises(ValueError, match="crops_per_photo must be a whole number of 1 or more"):
        bundled_source(8, crops_per_photo=0)


def test_bundled_crops_draw_from_the_stream_of_their_global_position():
    """Crop k of photo j is sample position j * crops_per_photo + k, drawn with that position's RNG
    (softvq.data.transforms.sample_rng(seed, position)), so two photos' crops are not drawn alike."""
    from softvq.data.images import bundled_photos, load_rgb, to_tensor
    from softvq.data.transforms import random_flip, random_scale_crop, sample_rng
    from softvq.generation.latent_sources import bundled_source

    image, label, name = list(bundled_source(16, crops_per_photo=2, seed=3).resume_from(3, 4))[0]
    photo = bundled_photos()[1]
    rng = sample_rng(3, 3)
    expected = to_tensor(random_flip(random_scale_crop(load_rgb(photo), 16, rng, (0.25, 1.0)), rng))
    assert (label, name) == (1, f"{photo.stem}-0001") and torch.equal(image, expected)


def test_a_flat_image_folder_is_one_class_not_cut_to_per_class(tmp_path):
    """plot_images: per_class limits each class sub-folder; a flat folder gives its first images
    (here all five, with per_class=2) as one class named after the folder."""
    from softvq.evaluation.runs import plot_images

    (tmp_path / "flat").mkdir()
    for i in range(5):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / "flat" / f"{i}.png")
    images, labels, names = plot_images(16, tmp_path / "flat", per_class=2, log=lambda m: None)
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == [0] * 5 and names == ["flat"]


def test_a_shard_that_is_no_tar_is_one_named_unreadable_item(tmp_path):
    """A damaged shard keeps the members read before the damage plus one ref for the rest, which
    reads as unreadable: the damage is skipped and counted, the good shards still read."""
    from softvq.data.images import ImageReadError
    from softvq.evaluation.sources import list_image_refs

    _shard(tmp_path / "s-0.tar", ["a.png", "b.png"])
    (tmp_path / "s-1.tar").write_bytes(b"\x00garbage, not a tar" * 40)
    refs, files, _ = list_image_refs(str(tmp_path / "s-{0..1}.tar"))
    assert [r.member for r in refs[:2]] == ["a.png", "b.png"] and len(refs) == 3
    assert refs[2].path == tmp_path / "s-1.tar"
    with pytest.raises(ImageReadError, match="s-1.tar"):
        refs[2].open_rgb()
