"""Reconstruction grids: originals, reconstructions and their absolute error, one labelled row each,
with each reconstruction's PSNR under its column."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from softvq.atomic import atomic_write
from softvq.captions import draw_beside, draw_under, ink_box, text_width, tile_font
from softvq.data.images import to_pil
from softvq.training.heldout import heldout_psnr


def row_labels(error_gain: float) -> list[str]:
    """The names written left of the grid's three rows."""
    return ["original", "reconstruction", f"|error| x{error_gain:g}"]


def column_captions(originals: torch.Tensor, reconstructions: torch.Tensor,
                    fits=lambda text: True) -> list[str]:
    """Each reconstruction's PSNR (:func:`~softvq.training.heldout.heldout_psnr`, whose mean training
    logs): "21.3 dB", else "21.3" or "21" when ``fits`` refuses the longer
    form for some column; [] when none fits (tiles too narrow for any)."""
    values = heldout_psnr(originals, reconstructions).tolist()
    for form in ("{:.1f} dB", "{:.1f}", "{:.0f}"):
        captions = [form.format(value) for value in values]
        if all(map(fits, captions)):
            return captions
    return []


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, *, error_gain: float = 4.0,
                        pad: int = 2, title: str | None = None) -> Image.Image:
    """A PIL image with three rows for images in [-1, 1]: x, x̂, and |x − x̂| averaged over the
    channels, in grey, as ``error_gain`` x the error on a [0, 1] scale (gain 4 turns white at a
    quarter of the range; per-channel errors in colour read as false cyan and red). The rows are
    named in a left margin, each column's PSNR is written under it and ``title`` above, so a grid
    read alone (in TensorBoard, in a paper draft) says what it shows."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"grid: {tuple(originals.shape)} originals vs {tuple(reconstructions.shape)} reconstructions")
    x, y = originals.detach().float().cpu().clamp(-1, 1), reconstructions.detach().float().cpu().clamp(-1, 1)
    error = ((x - y).abs().mean(1, keepdim=True) / 2 * error_gain).clamp(0, 1).expand_as(x) * 2 - 1
    rows = [x, y, error]
    n, _, h, w = x.shape
    font = tile_font(h, largest=14)
    labels = row_labels(error_gain)
    captions = column_captions(x, y, fits=lambda text: text_width([text], font) <= w)
    margin = int(text_width(labels, font)) + 3 * pad
    _, upper, _, lower = ink_box("0123456789 dB", font)  # one line for every caption
    strip = int(lower - upper) + 2 * pad if captions else 0
    header = int(lower - upper) + 2 * pad if title else 0
    canvas = Image.new("RGB", (margin + n * (w + pad) + pad, header + len(rows) * (h + pad) + pad + strip),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad - upper), title, fill=(0, 0, 0), font=font)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = header + pad + r * (h + pad)
        draw_beside(draw, label, pad, top, h, font)
        for i in range(n):
            canvas.paste(to_pil(row[i]), (margin + pad + i * (w + pad), top))
    for i, caption in enumerate(captions):
        draw_under(draw, caption, margin + pad + i * (w + pad), w, header + len(rows) * (h + pad) + pad - upper, font)
    return canvas


def save_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path, *,
              title: str | None = None) -> Path:
    """:func:`reconstruction_grid` written atomically as a PNG at ``path``."""
    path = Path(path)
    grid = reconstruction_grid(originals, reconstructions, title=title)
    atomic_write(path, lambda p: grid.save(p, format="PNG"))
    return path
