"""The generator's training objective: SiT velocity matching, DiT's hybrid diffusion loss, or
MAR's masked diffusion loss (computed inside :class:`softvq.generation.mar.MaskedAutoregressive`,
whose forward draws the mask and returns the loss terms).

Both take normalised latents x = (z − mean) / std and class labels; label dropout for guidance
happens inside the model's label embedder (training mode). Loss weights live here:
``vlb_weight`` scales DiT's L_t term (see :mod:`softvq.generation.diffusion`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from softvq.generation.diffusion import GaussianDiffusion
from softvq.generation.transport import Interpolant, velocity_loss


@dataclass
class GenerationObjectiveConfig:
    """kind: ``sit`` | ``dit`` | ``mar``. path: SiT interpolant (``cosine`` per supp. C.2, or ``linear``).
    schedule / diffusion_steps / vlb_weight: DiT (cosine schedule per supp. C.2, T = 1000, λ = 1
    on the per-step L_t, i.e. IDDPM's λ = 0.001 on Σ_t L_t)."""

    kind: Literal["sit", "dit", "mar"] = "sit"
    path: Literal["cosine", "linear"] = "cosine"
    schedule: Literal["cosine", "linear"] = "cosine"
    diffusion_steps: int = 1000
    vlb_weight: float = 1.0


class GenerationObjective:
    """``objective(model, x, y) -> {"loss": scalar, ...per-term means}``."""

    def __init__(self, config: GenerationObjectiveConfig, channel_dim: int = -1, sigma_learned: bool = True) -> None:
        self.config = config
        if config.kind == "mar":
            pass  # the model computes its own loss
        elif config.kind == "sit":
            self.path = Interpolant(config.path)
        elif config.kind == "dit":
            self.diffusion = GaussianDiffusion.from_schedule(config.schedule, config.diffusion_steps,
                                                             variance="learned" if sigma_learned else "fixed-large",
                                                             channel_dim=channel_dim)
        else:
            raise ValueError(f"unknown objective {config.kind!r}; choose 'sit', 'dit' or 'mar'")
        self.sigma_learned = sigma_learned

    def check_model(self, model: nn.Module) -> None:
        """A model of this objective's kind (and, for DiT, its variance head): another failed inside
        torch with a shape error."""
        config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model
        kind = getattr(config, "kind", None)
        if kind is not None and kind != self.config.kind:
            raise ValueError(f"a {self.config.kind!r} objective on a {kind!r} generator: build the objective with "
                             f"GenerationObjectiveConfig({kind!r}, ...)")
        if kind == "dit" and config is not None and config.sigma_learned != self.sigma_learned:
            raise ValueError(f"the objective has sigma_learned={self.sigma_learned} but the DiT's variance head is "
                             f"{'there' if config.sigma_learned else 'absent'}: pass "
                             f"sigma_learned=model.config.sigma_learned")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        self.check_model(model)
        if self.config.kind == "mar":
            return model(x, y)
        if self.config.kind == "sit":
            loss = velocity_loss(lambda x_t, t: model(x_t, t, y), x, self.path).mean()
            return {"loss": loss}
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        terms = self.diffusion.training_losses(lambda x_t, tt: model(x_t, tt, y), x, t,
                                               vlb_weight=self.config.vlb_weight)
        return {k: v.mean() for k, v in terms.items()}
