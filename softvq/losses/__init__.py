"""The training objective of SoftVQ-VAE (paper Eq. 7) and its parts."""

from softvq.losses.lpips import LPIPS
from softvq.losses.objective import ObjectiveConfig, TokenizerObjective

__all__ = ["LPIPS", "ObjectiveConfig", "TokenizerObjective"]
