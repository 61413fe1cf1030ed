"""Pictures of a tokenizer and its training: each function draws one PNG and returns its path.

* :func:`plot_reconstructions`  original | reconstruction | error map, one row per image;
* :func:`plot_training_curves`  every logged scalar of ``log.jsonl`` against the step;
* :func:`plot_codebook_usage`   code counts in index order and sorted (rank plot), usage and
  perplexity in the title (WeTok Tab. 3 reports usage);
* :func:`plot_latent_projection` 2D projection of ẑ (encoder output) and z (decoder input)
  coloured by class, as paper Fig. 4 (UMAP there; PCA built in, UMAP when ``umap-learn`` is
  installed);
* :func:`plot_rate_quality`     tokens x dim against rFID and PSNR across runs.

Matplotlib is imported inside the functions (``import softvq`` stays fast) and only through
``matplotlib.figure.Figure`` with the Agg canvas: no pyplot state, no GUI backend.
"""

from __future__ import annotations

import math
import textwrap
import typing
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from softvq.config import BottleneckKind
from softvq.data.images import to_unit_interval
from softvq.evaluation.metrics import entropy_of_weights, psnr
from softvq.training.logging import HELDOUT_PREFIX  # measured at each grid, not noisy: unsmoothed

DPI = 100


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _to_unit(images: Tensor) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] (B, 3, H, W) -> float (B, H, W, 3) in [0, 1]."""
    x = images.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else to_unit_interval(x)
    return x.permute(0, 2, 3, 1).numpy()


def plot_reconstructions(originals: Tensor, reconstructions: Tensor, path: str | Path, *,
                         max_images: int = 8, title: str | None = None,
                         row_labels: Sequence[str] | None = None) -> Path:
    """Rows of original | reconstruction | per-pixel error (mean |difference| over RGB, in [0, 1]
    units, one colour scale for the whole figure) with each row's PSNR and, given, its label (the
    image's name, and whether the model trained on it)."""
    if originals.shape != reconstructions.shape or originals.dim() != 4:
        raise ValueError(f"need two (B, 3, H, W) batches of one shape, got {tuple(originals.shape)} "
                         f"and {tuple(reconstructions.shape)}")
    a = _to_unit(originals[:max_images])
    b = _to_unit(reconstructions[:max_images])
    err = np.abs(a - b).mean(-1)
    vmax = max(float(err.max()), 1e-3)
    n = len(a)
    fig = _figure(7.5, 2.5 * n + 0.4)
    axes = np.atleast_2d(fig.subplots(n, 3))
    scores = psnr(torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2), data_range=1.0)
    for i in range(n):
        axes[i, 0].imshow(a[i])
        axes[i, 1].imshow(b[i])
        im = axes[i, 2].imshow(err[i], cmap="magma", vmin=0, vmax=vmax)
        axes[i, 1].set_xlabel(f"PSNR {float(scores[i]):.2f} dB", fontsize=8)
        if row_labels is not None and i < len(row_labels):
            axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], ("original", "reconstruction", "|error|")):
        ax.set_title(name, fontsize=10)
    fig.colorbar(im, ax=axes[:, 2].tolist(), shrink=0.6, label="mean |x - x̂| (0..1)")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def numeric_series(records: Sequence[dict[str, Any]], skip: Sequence[str] = ("step", "time", "epoch")) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (steps, values)} for every finite numeric key of the log records.

    A run continued from an earlier checkpoint logs steps it had logged before; from the point
    where the steps go back, the new line of training replaces the old one's records."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    last_step = -math.inf
    for i, rec in enumerate(records):
        step = rec.get("step", i)
        if step < last_step:  # (records of one step with different keys are not a restart)
            for xs, ys in series.values():
                while xs and xs[-1] >= step:
                    xs.pop()
                    ys.pop()
        last_step = step
        for key, value in rec.items():
            if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(float(step))
            ys.append(float(value))
    return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in series.items()}


def nonfinite_steps(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """{key: steps} where a logged value was NaN or infinite (the trainers write those as the
    strings "nan" / "inf" / "-inf", JSON having no such numbers)."""
    out: dict[str, list[float]] = {}
    for i, rec in enumerate(records):
        for key, value in rec.items():
            bad = (isinstance(value, float) and not math.isfinite(value)) or value in ("nan", "inf", "-inf")
            if bad:
                out.setdefault(key, []).append(float(rec.get("step", i)))
    return out


MIN_POINTS_TO_SMOOTH = 10  # below this an EMA mostly shows its own lag
# Set by a schedule or counted, not noisy: an EMA would only misstate them (a smoothed lr lags by
# an order of magnitude at the end of a cosine decay).
UNSMOOTHED = ("lr", "ema_decay", "temperature", "nonfinite_steps", "skipped_files", "epoch")


def _smoothable(key: str) -> bool:
    last = key.rsplit("/", 1)[-1]
    return not (key.startswith(HELDOUT_PREFIX) or last in UNSMOOTHED or last.endswith(("_lr", "_weight")))


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Bias-corrected EMA (as TensorBoard draws it): the start is not pulled toward the first value."""
    out = np.empty_like(values, dtype=np.float64)
    acc = 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path, *,
                         keys: Sequence[str] | None = None, smoothing: float = 0.6,
                         title: str | None = None) -> Path:
    """One panel per logged scalar of the training batches against the step: from ten log records
    on, raw (faint) and a bias-corrected EMA (``smoothing``); with fewer, ``smoothing=0``, a
    scheduled or counted value (:data:`UNSMOOTHED`: lr, EMA decay, ...) or a held-out measurement
    (``heldout/*``, after the losses), the raw line alone, solid.
    Steps where a value was NaN or infinite are red dotted lines, counted in the panel's title.
    Values that never changed over two or more records (a loss not switched on, no skipped files)
    share one last panel as ``name = value`` lines instead of a flat line each, and a
    ``<term>_weighted`` equal to its ``<term>`` at every step (weight 1) is not drawn twice."""
    from matplotlib.ticker import MaxNLocator

    series = numeric_series(records)
    broken = nonfinite_steps(records)
    if keys is not None:
        series = {k: series[k] for k in keys if k in series}
    # a term logged at weight 1 (the reconstruction's) repeats its unweighted panel: one is enough
    def repeats_its_term(name: str) -> bool:
        term = name.removesuffix("_weighted")
        return term != name and term in series and all(map(np.array_equal, series[name], series[term]))

    series = {k: v for k, v in series.items() if not repeats_its_term(k)}
    if not series:
        raise ValueError("the log has no numeric values to plot")
    # equal to a millionth (a PSNR of 7.014727 ± 1e-8 drew an offset axis over its title), or logged
    # once: a line of text, not a panel of its own whose axis spans nothing
    constant = {k: float(y[0]) for k, (_, y) in series.items()
                if not broken.get(k) and np.allclose(y, y[0], rtol=1e-6, atol=0)}
    once = {k: int(series[k][0][0]) for k in constant if len(series[k][1]) == 1}
    names = sorted((k for k in series if k not in constant),
                   key=lambda k: (not k.startswith("loss"), not k.startswith(HELDOUT_PREFIX), k))
    panels = len(names) + bool(constant)
    cols = 2 if panels == 4 else min(3, panels)  # four panels as 2 x 2, not 3 + 1 over a blank row
    rows = math.ceil(panels / cols)
    fig = _figure(4.2 * cols, 2.8 * rows + 0.3)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax in axes[1:len(names)]:
        ax.sharex(axes[0])  # one step range for every panel; each keeps its own tick labels
    any_smoothed = False
    for ax, name in zip(axes, names):
        x, y = series[name]
        smoothed = len(y) >= MIN_POINTS_TO_SMOOTH and smoothing > 0 and _smoothable(name)
        any_smoothed |= smoothed
        if len(y) < 3:  # a line through one or two log records is invisible: mark the points
            ax.plot(x, y, color="tab:blue", marker="o", linewidth=0.8)
        elif name.startswith(HELDOUT_PREFIX):  # measured at a few grids: the points, not a trend between them
            ax.plot(x, y, color="tab:blue", marker="o", markersize=4, linewidth=1.2)
        elif smoothed:  # faint under its EMA
            ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8)
        else:  # nothing drawn over it: a faint line alone reads as missing data
            ax.plot(x, y, color="tab:blue", linewidth=1.5)
        if smoothed:
            ax.plot(x, _ema(y, smoothing), color="tab:blue", linewidth=1.5)
        for step in broken.get(name, []):
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1.0)
        bad = len(broken.get(name, []))
        clipped = _clip_outliers(ax, y)
        notes = [note for note in (PANEL_UNITS.get(name), f"{bad} non-finite, red" if bad else None,
                                   f"{clipped} outlier(s) off the scale" if clipped else None) if note]
        ax.set_title(name + (f"  ({'; '.join(notes)})" if notes else ""), fontsize=9,
                     color="tab:red" if bad else "black")
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 0.96 in a short run
        ax.tick_params(which="both", labelsize=7)  # a log scale labels minor ticks too
        if ax.get_yscale() == "linear":
            ax.ticklabel_format(axis="y", useOffset=False)  # "1e-8+7.01" printed over the title
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if constant:
        ax = axes[len(names)]
        ax.set_visible(True)
        ax.axis("off")
        steps = set(once.values())
        ax.set_title("unchanged over the run" if len(once) < len(constant) else
                     "logged once" + (f", at step {steps.pop()}" if len(steps) == 1 else ""), fontsize=9)
        shown = sorted(constant)[:14]
        lines = [f"{k} = {constant[k]:.4g}" + (f" (once, step {once[k]})" if k in once and len(once) < len(constant)
                                               else "") for k in shown]
        if len(constant) > len(shown):
            lines.append(f"... and {len(constant) - len(shown)} more")
        ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, fontsize=8, va="top", family="monospace")
    what = "training batches, as logged" + (f"; EMA {smoothing:g} over the faint raw line" if any_smoothed else "")
    if any(name.startswith(HELDOUT_PREFIX) for name in names):
        what += f"; {HELDOUT_PREFIX}*: the EMA weights on the held-out images"
    fig.suptitle(f"{title}\n{what}" if title else what, fontsize=10)
    return _save(fig, path)


# What a panel's number is, where its name does not say.
PANEL_UNITS = {f"{HELDOUT_PREFIX}psnr": "dB, higher is better", f"{HELDOUT_PREFIX}lpips": "lower is better"}


def _clip_outliers(ax, y: np.ndarray) -> int:
    """Scale a panel so that a few spikes do not flatten the curve: a positive series spanning more
    than 10x is drawn on a log scale; otherwise, when the whole range is over 4x the 1st-99th
    percentile range, the axis shows that range (plus a margin) and the count of points left off
    the scale is returned for the title."""
    finite = y[np.isfinite(y)]
    if finite.size < 10:
        return 0
    if (finite > 0).all() and finite.max() / finite.min() > 10:
        ax.set_yscale("log")
        return 0
    low, high = np.percentile(finite, [1, 99])
    if high <= low or finite.max() - finite.min() <= 4 * (high - low):
        return 0
    margin = 0.15 * (high - low)
    ax.set_ylim(low - margin, high + margin)
    return int(((finite < low - margin) | (finite > high + margin)).sum())


def plot_codebook_usage(counts: Tensor | np.ndarray, path: str | Path, *, title: str | None = None) -> Path:
    """Argmax code counts (K,) or (P, K) of P codebooks: per code index (left: a filled outline for
    one codebook, a row per codebook of a heatmap for several) and sorted by frequency (right, log)."""
    c = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    if c.sum() <= 0:
        raise ValueError("no code was counted; encode some images first")
    k = c.shape[1]
    usage = float((c > 0).mean())
    perplexity = float(torch.exp(entropy_of_weights(torch.from_numpy(c))).mean())
    fig = _figure(10 if len(c) == 1 else 11.5, 3.4)  # room for the heatmap's colour bar
    left, right = fig.subplots(1, 2)
    if len(c) == 1:  # one filled outline, not K bar patches: 8192 bars took seconds to draw
        left.stairs(c[0], np.arange(k + 1) - 0.5, fill=True)
        left.set_ylabel("count")
    else:  # overlaid outlines of several codebooks hid each other: a row each, unused codes blank
        from matplotlib.colors import LogNorm

        shown = np.where(c > 0, c, np.nan)
        image = left.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                            norm=LogNorm(vmin=max(np.nanmin(shown), 1), vmax=max(np.nanmax(shown), 1)),
                            extent=(-0.5, k - 0.5, len(c) - 0.5, -0.5))
        fig.colorbar(image, ax=left, label="count (blank: unused)")
        left.set_ylabel("codebook")
        left.set_yticks(range(len(c)))
    for j, row in enumerate(c):
        ranked = np.sort(row)[::-1]
        right.plot(np.arange(1, k + 1), np.where(ranked > 0, ranked, np.nan),
                   label=f"codebook {j}" if len(c) > 1 else None)
    left.set_xlabel("code index")
    right.set_xlabel("rank")
    right.set_ylabel("count")
    right.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    right.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 2, 20, not 2×10⁰
    right.yaxis.set_minor_formatter(NullFormatter())
    if k >= 16:  # a log axis over a handful of codes (LFQ's small groups) only shows odd tick labels
        right.set_xscale("log")
    else:
        from matplotlib.ticker import MaxNLocator

        for ax in (left, right):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if len(c) > 1:
        right.legend(fontsize=7, loc="upper right")
    books = f" (mean of {len(c)} codebooks)" if len(c) > 1 else ""
    heading = (f"argmax codes: usage {usage:.1%} of {k}, perplexity {perplexity:.1f}{books}; "
               f"{int(c.sum())} tokens")
    fig.suptitle(f"{title}: {heading}" if title else heading, fontsize=10)
    return _save(fig, path)


def pca_2d(x: Tensor | np.ndarray) -> np.ndarray:
    """First two principal components (centred data, SVD), (N, 2)."""
    return _principal_components(x)[0]


def _principal_components(x: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components (N, 2) and the share of the variance each explains (2,)."""
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    a = a - a.mean(0)
    if len(a) < 2:
        raise ValueError("need at least 2 points to project")
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    total = float((s ** 2).sum())
    share = np.pad((s[:2] ** 2) / total if total > 0 else np.zeros(min(2, len(s))), (0, max(0, 2 - len(s))))
    out = u[:, :2] * s[:2]
    return (out if out.shape[1] == 2 else np.pad(out, ((0, 0), (0, 2 - out.shape[1])))), share


def project_2d(x: Tensor | np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2D embedding by ``pca``, ``umap`` (needs ``umap-learn``) or ``auto`` (UMAP if installed), and
    its name: "UMAP", or "PCA, 31% + 12% of the variance" (what the two axes explain: a picture of
    a few percent shows little of the latent space)."""
    if method not in ("auto", "pca", "umap"):
        raise ValueError(f"unknown projection {method!r}; use auto, pca or umap")
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                # ValueError: the option cannot be met on this install, a one-line error in the CLI
                raise ValueError("UMAP projection needs `pip install umap-learn`; or use --projection pca") from None
        else:
            a = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
            neighbours = max(2, min(15, len(a) - 1))
            return umap.UMAP(n_neighbors=neighbours, random_state=seed).fit_transform(a), "UMAP"
    xy, share = _principal_components(x)
    return xy, f"PCA, {share[0]:.0%} + {share[1]:.0%} of the variance"


def plot_latent_projection(features: Tensor | np.ndarray, latents: Tensor | np.ndarray,
                           labels: Sequence[int] | np.ndarray, path: str | Path, *,
                           class_names: Sequence[str] | None = None, method: str = "auto",
                           title: str | None = None) -> Path:
    """ẑ (left) and z (right), one point per image (its L x D values flattened), coloured by class."""
    labels = np.asarray(labels)
    if not (len(features) == len(latents) == len(labels)):
        raise ValueError(f"features, latents and labels differ in length: {len(features)}, {len(latents)}, {len(labels)}")
    fig = _figure(10, 4.6)
    axes = fig.subplots(1, 2)
    classes = np.unique(labels)
    cmap = _class_colours(len(classes))
    for ax, data, name in ((axes[0], features, "ẑ (encoder output)"), (axes[1], latents, "z (decoder input)")):
        xy, used = project_2d(data, method)
        for i, c in enumerate(classes):
            mask = labels == c
            label = class_names[int(c)] if class_names is not None else str(c)
            ax.scatter(xy[mask, 0], xy[mask, 1], s=14, color=cmap[i], label=label, alpha=0.85, linewidths=0)
        ax.set_title(f"{name}, {used}", fontsize=10)
        axis = "PC" if used.startswith("PCA") else "UMAP"
        ax.set_xlabel(f"{axis} 1", fontsize=8)
        ax.set_ylabel(f"{axis} 2", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_codewords(codewords: Tensor | np.ndarray, tokens: Tensor | np.ndarray, path: str | Path, *,
                   counts: np.ndarray | None = None, title: str | None = None) -> Path:
    """Supp. Fig. 5: the codewords among the encoder's tokens, in the tokens' first two principal
    components (both sets projected with the tokens' basis, so the axes are the data's). Tokens are
    orange; codewords are coloured by how often argmax picked them (``counts``), never-picked ones
    drawn as grey crosses. A codebook spread over the whole token cloud is what the paper shows
    for SoftVQ; codewords off to one side, or a few used ones, is collapse."""
    t = np.asarray(tokens, dtype=np.float64).reshape(len(tokens), -1)
    c = np.asarray(codewords, dtype=np.float64).reshape(len(codewords), -1)
    if t.shape[1] != c.shape[1]:
        raise ValueError(f"tokens have {t.shape[1]} channels but codewords {c.shape[1]}")
    if len(t) < 2:
        raise ValueError("need at least 2 tokens to project")
    centre = t.mean(0)
    _, _, vt = np.linalg.svd(t - centre, full_matrices=False)
    basis = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 2 - vt.shape[0])))
    txy, cxy = (t - centre) @ basis, (c - centre) @ basis
    fig = _figure(6, 5)
    ax = fig.subplots()
    used = np.ones(len(c), bool) if counts is None else np.asarray(counts) > 0
    # unused codewords below the tokens, the used ones on top: what the eye should find first;
    # thousands of unused ones (K = 8192) are drawn small and faint so the tokens still show
    many = (~used).sum() > 1000
    ax.scatter(cxy[~used, 0], cxy[~used, 1], s=3 if many else 9, marker="x", color="0.35",
               linewidths=0.3 if many else 0.5, alpha=0.4 if many else 1.0,
               label=f"{(~used).sum()} codewords never picked")
    ax.scatter(txy[:, 0], txy[:, 1], s=7, color="tab:orange", alpha=0.35, linewidths=0, label=f"{len(t)} tokens ẑ")
    if counts is None:
        ax.scatter(cxy[:, 0], cxy[:, 1], s=12, color="tab:blue", linewidths=0, label=f"{len(c)} codewords")
    else:
        from matplotlib.colors import LogNorm

        picked = np.asarray(counts)[used]
        points = ax.scatter(cxy[used, 0], cxy[used, 1], s=16, c=picked, cmap="viridis", linewidths=0,
                            norm=LogNorm(vmin=max(picked.min(), 1), vmax=max(picked.max(), picked.min() + 1)),
                            label=f"{used.sum()} codewords picked")
        from matplotlib.ticker import FuncFormatter

        bar = fig.colorbar(points, ax=ax, label="times picked (argmax)")
        counts_label = FuncFormatter(lambda value, _: f"{value:g}")  # 12, 50, 100: not 1.2×10¹
        bar.ax.yaxis.set_major_formatter(counts_label)
        if picked.max() < 10 * picked.min():  # within a decade the minor ticks are the only labels
            bar.ax.yaxis.set_minor_formatter(counts_label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("PC 1 of the tokens", fontsize=8)  # a title given replaces the default's "(PCA ...)"
    ax.set_ylabel("PC 2 of the tokens", fontsize=8)
    ax.legend(fontsize=7, loc="upper right", markerscale=2)
    ax.set_title(textwrap.fill(title or "codewords among the tokens (PCA of the tokens)", 90), fontsize=9)
    return _save(fig, path)


def _class_colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:  # tab20 pairs a dark and a light shade of each hue: the ten dark ones first
        return [colormaps["tab20"](2 * i if i < 10 else 2 * (i - 10) + 1) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def plot_rate_quality(runs: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Rate (tokens x dim per image) against rFID and PSNR, one labelled point per run, coloured
    by bottleneck kind (the same colour for a kind in every chart).

    Each run: ``{"name", "num_tokens", "latent_dim", "kind"?, "rfid"?, "psnr_eval"?, "psnr_heldout"?}``
    (:func:`softvq.evaluation.runs.rate_point`). The PSNR panel uses one protocol for every point:
    ``softvq eval``'s where every run has it, else training's held-out images; mixing the two ranked
    runs by how they were measured. A run without a panel's metric is named under that panel; names
    of runs at the same rate are stacked, so they do not print over each other; both panels share
    the rate axis.
    """
    from matplotlib.text import OffsetFrom

    with_psnr = [r for r in runs if r.get("psnr_eval") is not None or r.get("psnr_heldout") is not None]
    psnr_on = "eval" if with_psnr and all(r.get("psnr_eval") is not None for r in with_psnr) else "held-out"
    psnr_key = "psnr_eval" if psnr_on == "eval" else "psnr_heldout"
    metrics = [(m, key) for m, key in (("rfid", "rfid"), ("psnr", psnr_key)) if any(r.get(key) is not None for r in runs)]
    if not metrics:
        raise ValueError("no run has rFID or PSNR to plot")
    fig = _figure(5 * len(metrics), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharex=True))
    labels = {"rfid": "rFID, softvq eval (lower is better)",
              "psnr": f"PSNR dB, {'softvq eval' if psnr_on == 'eval' else 'held-out images'} (higher is better)"}
    known: list[str] = list(typing.get_args(BottleneckKind))  # a kind's colour does not depend on the runs drawn
    kinds = known + sorted({str(r.get("kind") or "?") for r in runs} - set(known))
    colours = dict(zip(kinds, _class_colours(len(kinds))))
    for ax, (metric, key) in zip(axes, metrics):
        shown = [r for r in runs if r.get(key) is not None and r.get("num_tokens") and r.get("latent_dim")]
        at_rate: dict[int, list[dict[str, Any]]] = {}
        for r in shown:
            at_rate.setdefault(r["num_tokens"] * r["latent_dim"], []).append(r)
        for x, group in at_rate.items():
            group.sort(key=lambda r: -float(r[key]))
            # names of runs at one rate form a column from the highest point down, each tied to its point
            column = OffsetFrom(ax.transData, (x, float(group[0][key])))
            for row, r in enumerate(group):
                y, kind = float(r[key]), str(r.get("kind") or "?")
                ax.plot([x], [y], "o", color=colours[kind], label=kind)
                ax.annotate(r.get("name", "?"), (x, y), xytext=(8, 3 - 10 * row), textcoords=column, fontsize=7,
                            va="center", arrowprops=dict(arrowstyle="-", color="silver", linewidth=0.5,
                                                         shrinkA=0, shrinkB=3))
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
        if handles:
            ordered = sorted(handles, key=kinds.index)
            ax.legend([handles[k] for k in ordered], ordered, fontsize=7, title="bottleneck", title_fontsize=7)
        ax.margins(x=0.25, y=0.12)
        missing = [str(r.get("name", "?")) for r in runs if not any(r is s for s in shown)]
        if missing:
            ax.text(0.0, -0.2, f"not shown (no {labels[metric].split(' (')[0]}): {', '.join(missing)}",
                    transform=ax.transAxes, fontsize=7, color="dimgray", va="top")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens x dim per image")
        ax.set_ylabel(labels[metric])
        ax.grid(alpha=0.3)
    fig.suptitle(title or "reconstruction quality against rate, one point per run", fontsize=11)
    return _save(fig, path)
