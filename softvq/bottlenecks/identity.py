"""The plain auto-encoder bottleneck (AE baseline of paper Tab. 3): latents = ẑ, no loss."""

from __future__ import annotations

from torch import Tensor

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput, check_count, full_precision


class Identity(Bottleneck):
    """Pass-through: the decoder reads the encoder projection unchanged."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        check_count("latent_dim", latent_dim)
        self.input_dim = self.latent_dim = latent_dim

    def forward(self, z: Tensor) -> BottleneckOutput:
        """The input unchanged (in float32) as the latents; no losses."""
        self.check_input(z)
        return BottleneckOutput(latents=full_precision(z))  # float32 like every other kind
