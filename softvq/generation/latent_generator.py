"""What every generator of tokenizer latents shares: the shape it takes, the null class of
classifier-free guidance, and the refusal of latents it cannot take.

:class:`~softvq.generation.models.LatentTransformer` (DiT / SiT) and
:class:`~softvq.generation.mar.MaskedAutoregressive` (MAR) derive from it; each names its label
table and the linear layer that first reads the latents.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from softvq.generation.embeddings import LabelEmbedder


class LatentGenerator(nn.Module):
    """Base of the generators: subclasses define :attr:`input_shape`, :attr:`label_embedder` and
    :attr:`input_layer`, and name themselves in errors by :attr:`model_name`."""

    model_name = "generator"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch dimension)."""
        raise NotImplementedError

    @property
    def label_embedder(self) -> LabelEmbedder:
        """The class-label table (with the null class when trained with label dropout)."""
        raise NotImplementedError

    @property
    def input_layer(self) -> nn.Linear:
        """The layer that first reads the latents: its weights' dtype is the one x must have."""
        raise NotImplementedError

    @property
    def null_class(self) -> int:
        """The label index that samples unconditionally (raises if trained without label dropout)."""
        return self.label_embedder.null_class

    def check_input(self, x: Tensor) -> None:
        """Refuse, by name, latents that are no tensor or have another shape or dtype than this
        model's (outside autocast, x must have the weights' dtype)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__} (torch.from_numpy(...) makes one of an "
                            f"array)")
        shape = self.input_shape
        if x.dim() != 1 + len(shape) or tuple(x.shape[1:]) != shape:
            what = "(B, L, D) latent tokens" if len(shape) == 2 else "(B, C, H, W) latent grids"
            raise ValueError(f"this {self.model_name} takes {what} of shape (B, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}; check the tokenizer's num_tokens / latent_dim")
        weights = self.input_layer.weight.dtype
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the {self.model_name}'s weights are {weights}: pass "
                            f"x.to({weights}), or run under torch.autocast for mixed precision")

    def num_parameters(self) -> int:
        """Parameters of the whole model (MAR's diffusion head included)."""
        return sum(p.numel() for p in self.parameters())
