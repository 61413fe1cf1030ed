"""Exponential moving average of a model's weights, used for evaluation and export: the
tokenizer's (the released recipe: decay 0.9999; the paper gives no EMA) and the generators'
(decay 0.9999, as the DiT and SiT codebases keep it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step, kept in float32.

    With ``warmup`` the decay is min(decay, (1 + n) / (10 + n)) after n updates (the
    ``num_updates`` rule of TensorFlow's ExponentialMovingAverage), so short runs are not
    dominated by the random initialisation. It tracks the parameters as the optimizer sees them
    (local shards under FSDP); :meth:`swapped_into` puts the average into the model temporarily,
    which is how evaluation, export and gathering a full state dict use it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self._params(model)]

    def _params(self, model: nn.Module) -> list[torch.nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params] if hasattr(self, "names") else []
        if missing:
            raise KeyError(f"EMA tracks parameters the model does not have: {missing[:4]}")
        return [params[n] for n in self.names]

    def current_decay(self) -> float:
        """The decay of the next update (warm-up rule or the fixed decay)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow ← decay · shadow + (1 − decay) · weights, for every tracked parameter (in float32)."""
        decay = self.current_decay()
        params = [p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
        self.num_updates += 1

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block the model holds the EMA weights; the training weights come back after."""
        params = self._params(model)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        """The shadow weights and the update count."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": dict(zip(self.names, [s.clone() for s in self.shadow]))}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:4]}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(shadow[name])
        self.num_updates = int(state["num_updates"])
