"""Fixed position embeddings and the time / class embedders of DiT and SiT.

* 1D sin-cos positions for the L latent tokens (paper Sec. 4.1 and supp. C.2: "patch size 1 and
  1D absolute position embedding"); 2D sin-cos positions for latent grids (DiT, MAE).
* Timestep embedder: sinusoidal frequencies (256 of them, max period 10^4) followed by a
  two-layer SiLU MLP (DiT Sec. 3.2). DiT feeds integer steps 0..999, SiT feeds t in [0, 1].
* Label embedder with a learned "null" class at index ``num_classes``: during training each label
  is replaced by it with probability ``dropout`` so one network learns both the conditional and
  the unconditional model that classifier-free guidance needs (Ho & Salimans 2022; DiT: 0.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, dim): [sin(p·ω_i), cos(p·ω_i)] with ω_i = 10000^(−2i/dim) (MAE layout)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_sequence(dim: int, length: int) -> Tensor:
    """(length, dim) embeddings of token positions 0..length−1 (the 1D latent layout)."""
    return sincos_1d(dim, torch.arange(length))


def sincos_grid(dim: int, grid: tuple[int, int]) -> Tensor:
    """(h·w, dim) row-major 2D embeddings: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)


def timestep_frequencies(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """(B,) possibly fractional times -> (B, dim) [cos, sin] features (GLIDE / DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs
    features = torch.cat([args.cos(), args.sin()], dim=1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=1)
    return features


class TimestepEmbedder(nn.Module):
    """Scalar time -> width-dim vector: sinusoidal features, Linear, SiLU, Linear (DiT)."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        for layer in self.linears():
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def linears(self) -> tuple[nn.Linear, nn.Linear]:
        """The MLP's two Linear layers (Sequential indexing is typed Module)."""
        return cast(nn.Linear, self.mlp[0]), cast(nn.Linear, self.mlp[2])

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_frequencies(t, self.frequency_dim)
        return self.mlp(features.to(self.linears()[0].weight.dtype))


def class_indices(labels: Tensor | Sequence[int] | int, batch: int | None, device: torch.device,
                  name: str = "y") -> Tensor:
    """Class labels given as a tensor, a list or one int -> a (B,) long tensor on ``device``: one
    label is repeated over a ``batch`` of B (``batch=None``: the labels decide B). Anything but
    integers, or another count than B, is refused by name."""
    value = labels.to(device) if isinstance(labels, Tensor) else torch.as_tensor(labels, device=device)
    if value.numel() == 0 and not isinstance(labels, Tensor):  # [] makes a float tensor
        value = value.long()
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices, got a {value.dtype} tensor; pass {name}.long()")
    if value.numel() == 1 and batch is not None:
        return value.reshape(1).expand(batch).long()
    value = value.reshape(1) if value.dim() == 0 else value
    if value.dim() != 1 or (batch is not None and value.shape[0] != batch):
        per = f"({batch},)" if batch is not None else "(B,)"
        raise ValueError(f"{name} has shape {tuple(value.shape)}: pass one class index per sample, {per}, "
                         f"or a single one for all")
    return value.long()


class LabelEmbedder(nn.Module):
    """Class index -> width-dim vector, with label dropout to the null class for CFG.

    ``num_classes`` real classes use rows 0..num_classes−1; row ``num_classes`` is the null
    ("unconditional") class, present whenever ``dropout > 0`` or ``with_null`` is set.
    """

    def __init__(self, num_classes: int, width: int, dropout: float = 0.1, with_null: bool | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"label dropout must lie in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.dropout = dropout
        self.has_null = dropout > 0 if with_null is None else with_null
        self.table = nn.Embedding(num_classes + int(self.has_null), width)
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def null_class(self) -> int:
        """Row ``num_classes``, the null class of classifier-free guidance; raises if there is none."""
        if not self.has_null:
            raise ValueError("this model was built without a null class (label dropout 0): it cannot do CFG")
        return self.num_classes

    def forward(self, labels: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """Embed ``labels`` (B,). In training mode each is dropped with probability ``dropout``;
        ``force_drop`` (B,) bool drops exactly those entries regardless of mode."""
        highest = self.num_classes if self.has_null else self.num_classes - 1
        if labels.device.type != "meta" and labels.numel() and bool(((labels < 0) | (labels > highest)).any()):
            null = (f"or {self.num_classes} for the null class" if self.has_null else
                    "this model has no null class: it was built without label dropout")
            raise ValueError(f"class labels must lie in [0, {self.num_classes - 1}] ({null}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        drop = None
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
        if force_drop is not None:
            drop = force_drop if drop is None else drop | force_drop
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.table(labels)
