"""The networks: the tokenizer's 1D ViT encoder and decoder (paper Sec. 3.1) and what they need.

* :mod:`~softvq.networks.vit` — the shared ViT blocks;
* :mod:`~softvq.networks.encoder` / :mod:`~softvq.networks.decoder` — patches plus L latent tokens in,
  latents out; mask tokens plus latents in, pixels out;
* :mod:`~softvq.networks.generative` — WeTok's generative decoder;
* :mod:`~softvq.networks.dinov2` / :mod:`~softvq.networks.vgg` — frozen feature networks for the
  alignment, perceptual and GAN losses.
"""
