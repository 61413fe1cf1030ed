"""Read training-run folders and draw their pictures: what ``softvq plot RUN_DIR... --out DIR`` does.

A run folder (written by :mod:`softvq.training.trainer`) may hold ``log.jsonl`` (one JSON record
per log step), ``config.yaml`` (the resolved training config; ``model`` is the tokenizer config),
``metrics.json`` (held-out PSNR / LPIPS at the end), ``export/`` (the EMA tokenizer in our
format) and ``eval/eval.json`` (from ``softvq eval``). Every file is optional: what is missing is
skipped with a note. A plain checkpoint folder (``config.json`` + ``model.safetensors``) works too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from softvq.checkpoint.pretrained import CONFIG_NAME, EXPORT_NAME, RUN_CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from softvq.config import CODEBOOK_KINDS, SOFT_KINDS
from softvq.evaluation import plots
from softvq.tokenizer import images_from_softvq_loaders
from softvq.training.logging import HELDOUT_PREFIX

if TYPE_CHECKING:
    from softvq.tokenizer import Tokenizer


@dataclass
class RunFolder:
    """One training run (or checkpoint folder) as ``softvq plot`` reads it: its log records, held-out
    metrics, evaluation, model config, export folder, and notes on what it could not read."""
    path: Path
    name: str
    records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] | None = None
    export: Path | None = None  # export/, or the newest checkpoint of a run still training
    notes: list[str] = field(default_factory=list)
    bundled_holdout: list[str] | None = None  # the bundled photos a run trained on the others kept out


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSONL file and the number of unreadable lines (a crash can cut the last one)."""
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records, bad


def _read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except json.JSONDecodeError as exc:
        notes.append(f"{path.name} is not valid JSON ({exc.msg}); ignored")
        return {}


def read_run(path: str | Path) -> RunFolder:
    """Read a run folder for plotting: what is missing or damaged becomes a note, not an error;
    a path that is no run folder at all is refused by name."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; plot takes run folders (softvq train's -o, or their export/)")
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    resolved = path.resolve()
    # a run's export/ is named after its run: two exports side by side must not both be "export"
    run = RunFolder(path=path, name=resolved.parent.name if resolved.name == EXPORT_NAME else resolved.name)
    if (path / "log.jsonl").exists():
        run.records, bad = read_jsonl(path / "log.jsonl")
        if bad:
            run.notes.append(f"log.jsonl: {bad} unreadable line(s) skipped")
    run.metrics = _read_json(path / "metrics.json", run.notes)
    run.evaluation = _read_json(path / "eval" / "eval.json", run.notes) or _read_json(path / "eval.json", run.notes)
    for candidate in (path / EXPORT_NAME, path):
        if (candidate / CONFIG_NAME).exists() and (candidate / WEIGHTS_NAME).exists():
            run.export = candidate
            meta = _read_json(candidate / CONFIG_NAME, run.notes)
            run.model_config = meta.get("config")
            break
    else:  # a run still training: its newest checkpoint's EMA weights, what export/ will hold
        from softvq.checkpoint.pretrained import newest_run_checkpoint
        from softvq.training.checkpointing import checkpoint_step

        if (newest := newest_run_checkpoint(path)) is not None:
            run.export = newest
            run.notes.append(f"no export/ yet: reconstructions and codebook plots show the EMA weights of its "
                             f"newest checkpoint, step {checkpoint_step(newest)}")
    if (path / RUN_CONFIG_NAME).exists():
        import yaml

        try:
            cfg = yaml.safe_load((path / RUN_CONFIG_NAME).read_text()) or {}
        except yaml.YAMLError:
            cfg = None
            run.notes.append("config.yaml is not valid YAML; ignored")
        if isinstance(cfg, dict):
            if run.model_config is None:
                run.model_config = cfg.get("model")
            data = cfg.get("data")
            data = data if isinstance(data, dict) else {}
            if data.get("source", "bundled") == "bundled":
                run.bundled_holdout = list(data.get("holdout") or [])
    return run


def rate_point(run: RunFolder) -> dict[str, Any]:
    """{name, kind, num_tokens, latent_dim, rfid, psnr_eval, psnr_heldout} from the run's eval report,
    metrics and config: PSNR by both protocols where the run has them (``softvq eval``'s report, and
    training's held-out images), so that a chart can put runs measured alike on one axis."""
    cfg = run.model_config or {}
    ev, me = run.evaluation, run.metrics
    heldout = me.get("psnr")
    if heldout is None:  # a run still training (no metrics.json yet): its last held-out measurement
        logged = [r[f"{HELDOUT_PREFIX}psnr"] for r in run.records
                  if isinstance(r.get(f"{HELDOUT_PREFIX}psnr"), (int, float))]
        heldout = logged[-1] if logged else None
    return {
        "name": run.name,
        "kind": (cfg.get("bottleneck") or {}).get("kind"),
        "num_tokens": ev.get("num_tokens") or cfg.get("num_tokens"),
        "latent_dim": ev.get("latent_dim") or (cfg.get("bottleneck") or {}).get("latent_dim"),
        "rfid": ev.get("rfid"),  # training measures no rFID: only `softvq eval` does
        "psnr_eval": ev.get("psnr"),
        "psnr_heldout": heldout,
    }


def bottleneck_label(model_config: dict[str, Any] | None) -> str | None:
    """The bottleneck in a table cell, with what tells the paper's rows apart (supp. Tabs. 5-6):
    ``softvq K=8192 τ=0.07 G=4``, ``softvq cos K=8192 τ=0.07 S=4 +commit``, ``lfq g=4``."""
    b = (model_config or {}).get("bottleneck") or {}
    if not b.get("kind"):
        return None
    parts = [b["kind"]]
    if b["kind"] in CODEBOOK_KINDS:
        if b.get("distance") == "cosine":
            parts.append("cos")
        parts.append(f"K={b.get('codebook_size')}")
    if b["kind"] in SOFT_KINDS:
        parts.append("τ learnable" if b.get("learnable_temperature") else f"τ={b.get('temperature')}")
    for key, short in (("lfq_groups", "g"), ("groups", "G"), ("residual_levels", "R"), ("segments", "S")):
        if (b.get(key) or 1) > 1:
            parts.append(f"{short}={b[key]}")
    parts += [f"+{loss}" for loss in ("codebook", "commit") if b.get(f"{loss}_loss")]
    return " ".join(parts)


def unique_names(runs: list[RunFolder]) -> list[str]:
    """The runs' names, a repeated one numbered (``name``, ``name-1``, ...): folders and table rows."""
    seen: dict[str, int] = {}
    names = []
    for run in runs:
        n = seen.get(run.name, 0)
        seen[run.name] = n + 1
        names.append(run.name if n == 0 else f"{run.name}-{n}")
    return names


def is_generator_run(run: RunFolder) -> bool:
    """A ``softvq train-generator`` run: its eval report (a generator probe) is no tokenizer's row."""
    return (run.path / "generator" / "config.json").is_file()


def comparison_row(run: RunFolder, name: str | None = None) -> dict[str, Any]:
    """The run's row of ``comparison.md``: its ``softvq eval`` report when it has one, else the
    held-out PSNR / LPIPS-VGG of ``metrics.json`` (another protocol, named in ``measured_on``)."""
    point = rate_point(run)
    tokens = (f"{point['num_tokens']} x {point['latent_dim']}"
              if point["num_tokens"] is not None and point["latent_dim"] is not None else None)
    row: dict[str, Any] = {"name": name or run.name, "kind": bottleneck_label(run.model_config), "tokens": tokens}
    ev, me = run.evaluation, run.metrics
    if ev:
        row.update(ev)
        row["measured_on"] = f"eval, {ev.get('num_images', '?')} images at {ev.get('image_size', '?')} px"
    elif me:
        row.update(psnr=me.get("psnr"), lpips_vgg=me.get("lpips"))
        row["measured_on"] = f"held-out, {me.get('heldout_images', '?')} images at {me.get('image_size', '?')} px"
    row["name"] = name or run.name  # an eval report's "model" / "source" keys must not rename the row
    return row


# --- images to draw with -------------------------------------------------------------------------


def plot_images(size: int, images: str | Path | None = None, *, per_class: int = 8,
                max_classes: int = 12, seed: int = 0, log=print) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """uint8 images (N, 3, size, size), integer labels, class names for the pictures.

    ``images=None``: the bundled photos, ``per_class`` random square crops of each (class = photo);
    a folder with class sub-folders: up to ``per_class`` centre crops per class; a flat folder:
    its first images, one class. Unreadable files are skipped, and ``log`` says how many.
    """
    from PIL import Image

    from softvq.data.images import (ImageReadError, bundled_photos, center_crop_resize, images_by_class, load_rgb,
                                    name_loose_images, why_unreadable)

    if images is None:  # crops as the held-out ones training draws: each photo whole, then at random
        from softvq.data.bundled import heldout_crops
        from softvq.data.images import quantize_to_uint8

        photos = bundled_photos()[:max_classes]
        names = [p.stem for p in photos]
        crops, crop_names = heldout_crops(photos, size, per_class * len(photos), scales=(0.4, 0.9), seed=seed)
        labels = [names.index(name.rsplit("-", 1)[0]) for name in crop_names]
        return quantize_to_uint8(crops), np.asarray(labels), names

    pils: list[Image.Image] = []
    labels = []  # list[int], as in the bundled branch above
    skipped: list[Path] = []

    def add_readable(paths: list[Path], limit: int, label: int) -> None:
        """Centre crops of the first ``limit`` readable ``paths``; unreadable ones are skipped."""
        taken = 0
        for path in paths:
            if taken == limit:
                return
            try:
                pils.append(center_crop_resize(load_rgb(path), size))
            except ImageReadError:
                skipped.append(path)
                continue
            labels.append(label)
            taken += 1

    folder = Path(images)
    by_class, loose = images_by_class(folder)
    if by_class:
        name_loose_images(folder, loose)
        names = list(by_class)[:max_classes]
        if len(by_class) > max_classes:  # a legend of more classes is unreadable: say which are drawn
            log(f"drawing the first {max_classes} of {len(by_class)} classes (sorted by name: {names[0]} to "
                f"{names[-1]}); put the classes to compare in a folder of their own")
        for c, name in enumerate(names):
            add_readable(by_class[name], per_class, c)
    else:
        names = [folder.name]
        add_readable(loose, per_class * max_classes, 0)
    if skipped:
        log(f"skipped {len(skipped)} unreadable image file(s) for the pictures, e.g. {why_unreadable(skipped[0])}")
    if not pils:
        raise FileNotFoundError(f"no images to plot with in {images}")
    arr = np.stack([np.asarray(p, dtype=np.uint8) for p in pils])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), np.asarray(labels), names


@torch.inference_mode()
@images_from_softvq_loaders()
def _encode_all(model: Tokenizer, images: torch.Tensor, batch_size: int, device: torch.device):
    from softvq.evaluation.metrics import codebook_rows
    from softvq.data.images import quantize_to_uint8
    from softvq.evaluation.sources import uint8_to_model

    feats, lats, recs, idx = [], [], [], []
    for chunk in images.split(batch_size):
        x = uint8_to_model(chunk).to(device)
        enc = model.encode(x)
        recs.append(quantize_to_uint8(model.decode(enc.latents, x.shape[-1])).cpu())
        feats.append(enc.features.float().cpu())
        lats.append(enc.latents.flatten(1).float().cpu())
        if enc.indices is not None:
            idx.append(enc.indices.cpu())
    indices = torch.cat(idx) if idx else None
    segments = max(model.config.bottleneck.segments, 1)
    rows = codebook_rows(indices, segments) if indices is not None else None
    return torch.cat(feats), torch.cat(lats), torch.cat(recs), rows  # features (N, L, D_in)


def first_codebook(model: Tokenizer, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(codewords (K, d), tokens (M, d), which) of the model's first codebook and what it reads, as
    its assignment compares them (L2-normalised for the cosine distance): the first of S sequence
    segments (the release's codebooks), the first residual level (it reads ẑ itself), the first of
    G channel groups. None where there is no learned codebook (continuous bottlenecks, LFQ)."""
    from softvq.bottlenecks.product import ProductQuantizer
    from softvq.bottlenecks.residual import ResidualQuantizer
    from softvq.bottlenecks.segments import SegmentCodebooks

    bottleneck: Any = model.bottleneck  # walked down through its compositions to the first codebook
    tokens, which = features, []
    if isinstance(bottleneck, SegmentCodebooks):
        count = len(bottleneck.parts)
        bottleneck, tokens = bottleneck.parts[0], features[:, : features.shape[1] // count]
        which.append(f"segment 1 of {count} (tokens 0-{tokens.shape[1] - 1})")
    if isinstance(bottleneck, ResidualQuantizer):
        which.append(f"level 1 of {len(bottleneck.levels)}")
        bottleneck = bottleneck.levels[0]
    if isinstance(bottleneck, ProductQuantizer):
        which.append(f"group 1 of {bottleneck.groups} (channels 0-{bottleneck.group_dim - 1})")
        bottleneck, tokens = bottleneck.parts[0], tokens[..., : bottleneck.group_dim]
    if not hasattr(bottleneck, "normalized_codebook"):
        return None
    codewords = bottleneck.normalized_codebook().detach().float().cpu()
    tokens = tokens[..., : codewords.shape[1]].reshape(-1, codewords.shape[1]).float()  # GMMVQ: ω's channel off
    if getattr(bottleneck, "distance", "l2") == "cosine":
        tokens = torch.nn.functional.normalize(tokens, dim=-1)
    return codewords, tokens, ", ".join(which) or "the codebook"


def codebook_counts(rows: torch.Tensor, codebook_size: int) -> np.ndarray:
    """(rows, P) indices -> (P, K) counts."""
    from softvq.evaluation.metrics import CodebookUsage

    usage = CodebookUsage(codebook_size, rows.shape[1])
    usage.update(rows)
    return usage.counts.numpy()


def plot_runs(run_dirs: list[str | Path], out: str | Path, *, images: str | Path | None = None,
              num_reconstructions: int = 6, per_class: int = 8, projection: str = "auto",
              device: str | torch.device = "cpu", batch_size: int = 16,
              log=print) -> list[Path]:
    """Every picture the runs allow, under ``out/<run name>/``, plus ``out/rate_quality.png`` and
    ``out/comparison.md`` (a row per run: the rows of a paper table)."""
    from softvq.tokenizer import Tokenizer

    out = Path(out)
    written: list[Path] = []
    runs = [read_run(d) for d in run_dirs]
    run_names = unique_names(runs)
    for run, name in zip(runs, run_names):
        folder = out / name
        for note in run.notes:
            log(f"{name}: {note}")
        if run.records:
            try:
                written.append(plots.plot_training_curves(run.records, folder / "training_curves.png", title=name))
            except ValueError as exc:
                log(f"{name}: no training curves ({exc})")
        else:
            log(f"{name}: no log.jsonl, no training curves")
        if run.export is None:
            generator = is_generator_run(run)
            log(f"{name}: " + ("a generator run: its training curves only" if generator else
                                  "no exported tokenizer (export/), no reconstruction / codebook / latent plots"))
            continue
        try:
            model = Tokenizer.from_pretrained(run.export).to(device).eval()
        except CheckpointError as exc:  # a damaged export, or a checkpoint training has just deleted
            log(f"{name}: no reconstruction / codebook / latent plots: {exc}")
            continue
        size = model.config.image_size
        imgs, labels, names = plot_images(size, images, per_class=per_class, log=log)
        feats, lats, recs, rows = _encode_all(model, imgs, batch_size, torch.device(device))
        first = _first_of_each_class(labels, num_reconstructions)
        rows_named = [names[labels[i]] for i in first]
        if images is None and run.bundled_holdout is not None:  # the run trained on the other bundled photos
            rows_named = [f"{n} ({'held out' if n in run.bundled_holdout else 'trained on'})" for n in rows_named]
        written.append(plots.plot_reconstructions(imgs[first], recs[first], folder / "reconstructions.png",
                                                  max_images=num_reconstructions, title=name,
                                                  row_labels=rows_named))
        saved = run.evaluation.get("codebook_counts")
        # the plot images' own counts: the histogram's without an eval report, and codewords.png's always
        plot_counts = (codebook_counts(rows, model.bottleneck.codebook_size)
                       if rows is not None and model.bottleneck.codebook_size else None)
        if saved is not None:
            counts, where = np.asarray(saved), f"{run.evaluation.get('num_images', '?')} eval images"
        elif plot_counts is not None:
            counts, where = plot_counts, f"{len(imgs)} plot images"
        else:
            counts = None
            log(f"{name}: continuous bottleneck, no codebook plot")
        if counts is not None:
            written.append(plots.plot_codebook_usage(counts, folder / "codebook_usage.png",
                                                     title=f"{name} ({where})"))
        view = first_codebook(model, feats)
        if view is not None:
            codewords, tokens, which = view
            picked = plot_counts[0] if plot_counts is not None else None
            written.append(plots.plot_codewords(codewords, tokens, folder / "codewords.png", counts=picked,
                                                title=f"{name}: {which}, {len(imgs)} plot images"))
        elif counts is not None:  # LFQ: its codes are fixed corners, no learned codewords to place
            log(f"{name}: a lookup-free (fixed) codebook, no codewords picture")
        if len(np.unique(labels)) > 1 or len(labels) > 2:
            written.append(plots.plot_latent_projection(feats.flatten(1), lats, labels, folder / "latents.png",
                                                        class_names=names, method=projection,
                                                        title=name))
        else:  # a 2D projection of one class's one or two points says nothing
            log(f"{name}: no latents.png: {len(labels)} plot image(s) of one class; pass --images with more "
                f"images, or class sub-folders")
    rows = [comparison_row(r, name) for r, name in zip(runs, run_names) if not is_generator_run(r)]
    if any(row.get("measured_on") for row in rows):
        from softvq.atomic import atomic_write
        from softvq.evaluation.report import comparison_markdown

        table = comparison_markdown(rows)
        atomic_write(out / "comparison.md", lambda p: p.write_text(table))
        written.append(out / "comparison.md")
    else:  # an earlier plot's table in the same folder would pass for these runs'
        (out / "comparison.md").unlink(missing_ok=True)
        log("no tokenizer run has an eval report or metrics.json: no comparison.md")
    points = [rate_point(r) for r in runs if not is_generator_run(r)]
    if any(p["rfid"] is not None or p["psnr_eval"] is not None or p["psnr_heldout"] is not None for p in points):
        written.append(plots.plot_rate_quality(points, out / "rate_quality.png"))
    else:
        (out / "rate_quality.png").unlink(missing_ok=True)
        log("no run has rFID or PSNR (run `softvq eval`, or train until a held-out measurement): no rate-quality chart")
    return written


def _first_of_each_class(labels: np.ndarray, n: int) -> list[int]:
    """Up to n indices, one per class first, so the grid shows different images."""
    order: list[int] = []
    for c in np.unique(labels):
        order.append(int(np.flatnonzero(labels == c)[0]))
    order += [i for i in range(len(labels)) if i not in order]
    return order[:n]
