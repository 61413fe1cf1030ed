"""Optimizers (supplementary C.1): AdamW(β 0.9/0.95, weight decay 1e-4) as in the paper, or torch
Adam as in the released code; and which parameters get weight decay.

AdamW applies no decay to parameters that are not weight matrices: norms, biases, LayerScale
gains (all 1-D), and the learned vectors a ViT tokenizer treats as embeddings: cls / mask /
latent tokens, position embeddings, codebooks and (learnable) temperatures. Decaying those would
pull codewords and positions towards zero, which is not what weight decay is for.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

NO_DECAY_NAMES = ("token", "pos_embed", "codebook", "embedding", "temperature")


def wants_decay(name: str, param: torch.Tensor, no_decay_names: tuple[str, ...] = NO_DECAY_NAMES) -> bool:
    """True for weight matrices / conv kernels; False for norms, biases, gains, and parameters whose
    name contains one of ``no_decay_names`` (the tokenizer's embeddings and codebooks)."""
    if param.ndim <= 1:
        return False
    leaf = name.rsplit(".", 1)[-1]
    return not any(key in leaf for key in no_decay_names) and not name.endswith("bias")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 no_decay_names: tuple[str, ...] = NO_DECAY_NAMES) -> list[dict]:
    """Two AdamW groups: decayed weight matrices and everything else at weight decay 0.
    ``no_decay_names=()`` decays every tensor of two or more dimensions, embeddings included (MAE / MAR)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if wants_decay(name, p, no_decay_names) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], *, name: str, lr: float, betas: list[float],
                    weight_decay: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """``adamw``: decoupled decay on weight matrices only. ``adam``: the release's torch Adam, whose
    ``weight_decay`` is an L2 term added to the gradient of every parameter."""
    named = list(named)
    beta1, beta2 = betas  # two numbers (TrainConfig.validate); torch's Adam unpacks them the same way
    if name == "adamw":
        return torch.optim.AdamW(param_groups(named, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps)
    if name == "adam":
        params = [p for _, p in named if p.requires_grad]
        return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use 'adamw' (paper) or 'adam' (release)")
