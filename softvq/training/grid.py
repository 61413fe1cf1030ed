"""Reconstruction grids: originals, reconstructions and their absolute error, one row each."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from softvq.atomic import atomic_write
from softvq.data.images import to_pil


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, *, error_gain: float = 4.0,
                        pad: int = 2) -> Image.Image:
    """A PIL image with three rows for images in [-1, 1]: x, x̂, and |x − x̂| per channel shown as
    ``error_gain`` x the error on a [0, 1] scale (so gain 4 saturates at a quarter of the range)."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"grid: {tuple(originals.shape)} originals vs {tuple(reconstructions.shape)} reconstructions")
    x, y = originals.detach().float().cpu().clamp(-1, 1), reconstructions.detach().float().cpu().clamp(-1, 1)
    error = ((x - y).abs() / 2 * error_gain).clamp(0, 1) * 2 - 1
    rows = [x, y, error]
    n, _, h, w = x.shape
    canvas = Image.new("RGB", (n * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for i in range(n):
            canvas.paste(to_pil(row[i]), (pad + i * (w + pad), pad + r * (h + pad)))
    return canvas


def save_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    grid = reconstruction_grid(originals, reconstructions)
    atomic_write(path, lambda p: grid.save(p, format="PNG"))
    return path
