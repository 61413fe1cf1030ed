"""WeTok's generative decoder (GD; WeTok Sec. 3.3, Eq. 11) on 1D latent tokens.

WeTok samples z ~ N(0, I), concatenates it with the quantised latents along the channel axis and
feeds the result to the decoder, whose first layer (``conv_in``) is widened for the new channels.
The GAN loss becomes an expectation over z (Eq. 11), so the decoder models the distribution of
images given the tokens instead of one deterministic image. Training has two stages: stage 1 is
the ordinary tokenizer; stage 2 starts from it with the weights of the new input channels at zero,
so at its start the decoder computes exactly the stage-1 function (Sec. 3.3, Tab. 2, Tab. 10).

Mapping onto this tokenizer: the latents are 1D tokens (B, L, D) and the first layer that reads
them is ``Tokenizer.from_latent`` (the release's ``post_quant_conv``). The noise is therefore
(B, L, noise_dim), concatenated per token, and ``from_latent`` takes D + noise_dim inputs, the
last noise_dim of them initialised to zero. ``TokenizerConfig.decoder_noise_dim`` sets noise_dim
(0: the deterministic decoder of SoftVQ-VAE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from softvq.randomness import standard_normal

# The decoder input layer whose columns grow for the noise channels.
NOISE_INPUT_WEIGHT = "from_latent.weight"


def decoder_input(latents: Tensor, noise_dim: int, noise: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """[latents; z] along channels, z ~ N(0, I) of shape (B, L, noise_dim) unless ``noise`` is given.

    With ``noise_dim == 0`` the latents are returned unchanged and ``noise`` must be None.
    """
    if noise_dim == 0:
        if noise is not None:
            raise ValueError("this tokenizer's decoder is deterministic (decoder_noise_dim=0) and takes no "
                             "noise; build one with Tokenizer.with_generative_decoder(noise_dim)")
        return latents
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}; e.g. "
                        f"torch.Generator().manual_seed(0)")
    if noise is not None and generator is not None:  # the noise is given: a generator would draw nothing
        raise ValueError("pass noise or generator, not both: the generator only draws the noise")
    expected = (*latents.shape[:-1], noise_dim)
    if noise is None:
        noise = standard_normal(expected, generator, latents.device, latents.dtype)
    elif not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a float tensor of shape {expected}, got "
                        f"{noise.dtype if isinstance(noise, Tensor) else type(noise).__name__}")
    elif tuple(noise.shape) != expected:
        raise ValueError(f"noise must have shape {expected} (batch, tokens, decoder_noise_dim), "
                         f"got {tuple(noise.shape)}")
    return torch.cat([latents, noise.to(device=latents.device, dtype=latents.dtype)], dim=-1)


def widen_noise_inputs(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """A stage-1 ``state`` made to fit a ``target`` state whose decoder input takes more noise
    channels: the old input columns are kept and the new ones are zero (WeTok Sec. 3.3), so the
    decoder's output does not change. Every other tensor is passed through untouched; a strict
    load afterwards reports any other mismatch."""
    old, new = state.get(NOISE_INPUT_WEIGHT), target.get(NOISE_INPUT_WEIGHT)
    if old is None or new is None or old.shape == new.shape:
        return state
    if old.shape[0] != new.shape[0] or old.shape[1] > new.shape[1]:
        return state  # not a widening: leave it to the strict load to name the mismatch
    widened = new.new_zeros(new.shape)
    widened[:, : old.shape[1]] = old
    return {**state, NOISE_INPUT_WEIGHT: widened}
