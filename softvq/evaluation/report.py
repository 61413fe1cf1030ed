"""The report of an evaluation: ``eval.json`` with everything, ``eval.md`` with the headline
numbers as a markdown table, the protocol and the notes; and one table comparing several runs'
reports, a row per run, as the paper's tables do (Tab. 3, supp. Tab. 6)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor


# (key, label, format) in the order of the printed table.
TABLE_ROWS = (
    ("rfid", "rFID ↓", "{:.3f}"),
    ("gfid", "gFID ↓", "{:.3f}"),
    ("inception_score", "Inception Score ↑", "{:.2f}"),
    ("precision", "precision ↑", "{:.3f}"),
    ("recall", "recall ↑", "{:.3f}"),
    ("psnr", "PSNR (dB) ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("lpips_vgg", "LPIPS-VGG ↓", "{:.4f}"),
    ("lpips_alex", "LPIPS-Alex ↓", "{:.4f}"),
    ("codebook_usage", "codebook usage", "{:.2%}"),
    ("codebook_perplexity", "codebook perplexity", "{:.1f}"),
    ("soft_perplexity", "soft-posterior perplexity", "{:.1f}"),
    ("latent_mean", "latent mean", "{:.4f}"),
    ("latent_std", "latent std", "{:.4f}"),
    ("linear_probe_top1", "linear probe top-1", "{:.2%}"),
    ("encoder_gmacs", "encoder GMACs / image", "{:.3g}"),  # 3 significant digits: tiny models too
    ("decoder_gmacs", "decoder GMACs / image", "{:.3g}"),
    ("encode_images_per_s", "encode throughput (img/s)", "{:.1f}"),
    ("decode_images_per_s", "decode throughput (img/s)", "{:.1f}"),
)


def to_markdown(report: dict[str, Any]) -> str:
    """A markdown table of the headline numbers, then the protocol in one line and the notes."""
    precision = report.get("compute_precision", "fp32")
    lines = [f"### {report.get('model', 'tokenizer')} on {report.get('num_images', '?')} images "
             f"at {report.get('image_size', '?')} px" + ("" if precision == "fp32" else f", {precision}"),
             "", "| metric | value |", "|---|---|"]
    for key, label, fmt in TABLE_ROWS:
        value = report.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        lines.append(f"| {label} | {fmt.format(value)} |")
    protocol = report.get("protocol", {})
    if protocol:
        # the protocol's num_images counts the files considered, unreadable ones included
        shown = {("files considered" if k == "num_images" else k): v for k, v in protocol.items()}
        lines += ["", "Protocol: " + "; ".join(f"{k} = {v}" for k, v in shown.items())]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``eval.json`` (everything) and ``eval.md`` (the table) into ``out_dir``."""
    from softvq.atomic import atomic_write, write_json

    out = Path(out_dir)
    json_path, md_path = out / "eval.json", out / "eval.md"
    _say_what_is_replaced(json_path, report)
    write_json(json_path, report, default=_jsonable)
    atomic_write(md_path, lambda p: p.write_text(to_markdown(report)))
    return json_path, md_path


def _say_what_is_replaced(json_path: Path, report: dict[str, Any]) -> None:
    """Reports are written afresh (README), but an earlier one of another model or image count is
    named as it goes: a 10-image check must not silently stand where a 1500-image result was."""
    import json
    import logging

    try:
        old = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(old, dict):
        return
    # weights, where both reports name them: the same weights by another path are the same model,
    # other weights at the same path (trained further) are not
    key = "weights_sha1" if old.get("weights_sha1") and report.get("weights_sha1") else "model"
    # a samples report (gFID) has no model: its reference images are what make two of them comparable
    compared = (key, "num_images", "reference", "num_reference", "num_samples")
    if all(old.get(name) == report.get(name) for name in compared):
        return
    def measured(r: dict[str, Any]) -> str:
        if "samples" in r:
            return f"{r.get('num_samples')} samples against {r.get('num_reference')} images of {r.get('reference')}"
        return f"model {r.get('model')}, {r.get('num_images')} images"

    logging.getLogger("softvq.evaluation").warning(
        f"replacing {json_path} ({measured(old)}) with this evaluation ({measured(report)}); give another --out to "
        f"keep both")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table with a row per run: ``name``, ``bottleneck``, ``tokens`` (L x D) and
    ``measured on`` (which protocol gave the numbers), then a column for every :data:`TABLE_ROWS`
    metric that at least one row has; a row without it shows ``–``. Runs measured with different
    protocols or image counts are not comparable: the ``measured on`` column says which is which."""
    present = [(key, label, fmt) for key, label, fmt in TABLE_ROWS
               if any(_number(row.get(key)) is not None for row in rows)]
    head = ["run", "bottleneck", "tokens", "measured on"] + [label for _, label, _ in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.get(key) or "–") for key in ("name", "kind", "tokens", "measured_on")]
        for key, _, fmt in present:
            value = _number(row.get(key))
            cells.append("–" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: Any) -> float | None:
    """A finite number, or None (missing, NaN, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)
