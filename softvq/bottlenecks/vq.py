"""The VQ-VAE baseline (paper Sec. 2.1, Eq. 2; supplementary A, Eq. 9).

    posterior  q(z = k|x) = 1 if k = argmin_j ‖ẑ − c_j‖₂ else 0
    latent     z = c_k, passed on with the straight-through estimator z = ẑ + sg[c_k − ẑ]
    losses     codebook = ‖sg[ẑ] − c_k‖²   commit = ‖ẑ − sg[c_k]‖²

The paper writes the two losses with the norm ‖·‖₂; we use the squared norm of VQ-VAE
(van den Oord et al. 2017), which is also what WeTok's Eq. 3 writes. Each loss is a per-token
squared norm summed over the D channels and averaged over tokens, so that product quantization
(which sums its groups' losses) reproduces the ungrouped value exactly. Note the scale: this is D
times the per-element mean (``F.mse_loss``) that taming-style code and the SoftVQ release use;
``objective.vq_loss_reduction=element_mean`` divides by D to train with that one (``tab3-vq-*``).

Both losses are returned unweighted: the training objective weights ``codebook`` by 1 and
``commit`` by β, the commitment weight (``BottleneckConfig.commitment_weight``, 0.25, or
``objective.commit_weight``). The KL term of Eq. 2 is the constant log K and is not returned.

``distance="cosine"`` L2-normalises ẑ and the codewords first (the unit-sphere lookup of
ViT-VQGAN-style and the SoftVQ release); ``l2`` is Eq. 2 as written.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softvq.bottlenecks.base import (Bottleneck, BottleneckOutput, check_count, entropy, float32_region,
                                     full_precision)
from softvq.bottlenecks.extremes import last_axis_argmin

_SEARCH_CHUNK_ELEMENTS = 1 << 22  # distances computed at a time in the nearest-codeword search


def nearest_codeword(x: Tensor, codebook: Tensor) -> Tensor:
    """argmin_j ‖x − c_j‖₂ for x (T, D), in chunks of tokens so T × K never materialises."""
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // codebook.shape[0])
    book_sq = (codebook * codebook).sum(-1)
    out = []
    for start in range(0, x.shape[0], chunk):
        xc = x[start:start + chunk]
        # ‖x‖² is constant per row, so argmin of ‖c‖² − 2x·c is the nearest codeword.
        out.append(last_axis_argmin(book_sq - 2 * xc @ codebook.t()))
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.long)


class VQ(Bottleneck):
    """Hard vector quantization with a straight-through estimator (Eq. 2)."""

    def __init__(self, latent_dim: int, codebook_size: int, *, distance: str = "l2") -> None:
        super().__init__()
        if distance not in ("l2", "cosine"):
            raise ValueError(f"unknown distance {distance!r}; use 'l2' (paper) or 'cosine'")
        check_count("latent_dim", latent_dim)
        check_count("codebook_size", codebook_size)
        self.input_dim = self.latent_dim = latent_dim
        self.distance = distance
        self.codebook = nn.Parameter(torch.randn(codebook_size, latent_dim) / math.sqrt(latent_dim))

    @property
    def codebook_size(self) -> int:
        """K, the codewords of the codebook."""
        return self.codebook.shape[0]

    def normalized_codebook(self, *alongside: Tensor) -> Tensor:
        """The codebook as lookups read it (L2-normalised rows for the cosine variant), in the
        precision it meets ``alongside`` tensors in (:func:`~softvq.bottlenecks.base.full_precision`)."""
        c = full_precision(self.codebook, *alongside)
        return F.normalize(c, dim=-1) if self.distance == "cosine" else c

    indices_have_code_axis = False  # (tokens): one codeword per token

    @property
    def codes_per_token(self) -> int:
        """One codeword per token."""
        return 1

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        """The codewords (normalised for ``cosine``) that ``indices`` (tokens...) name: (tokens..., D)."""
        indices = self.check_indices(indices)
        with torch.no_grad():
            return self.normalized_codebook()[indices.to(self.codebook.device)]

    def forward(self, z: Tensor) -> BottleneckOutput:
        """Nearest codeword with a straight-through gradient; losses ``codebook`` and ``commit`` (Eq. 2)."""
        self.check_input(z)
        with float32_region(z.device):
            z = full_precision(z, self.codebook)
            lead = z.shape[:-1]
            flat = z.reshape(-1, self.latent_dim)
            if self.distance == "cosine":
                flat = F.normalize(flat, dim=-1)
            book = self.normalized_codebook(flat)
            with torch.no_grad():
                indices = nearest_codeword(flat, book)
            chosen = book[indices]
            codebook_loss = (flat.detach() - chosen).pow(2).sum(-1).mean()
            commit = (flat - chosen.detach()).pow(2).sum(-1).mean()
            latents = flat + (chosen - flat).detach()
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            freq = counts / counts.sum().clamp_min(1)
            metrics = {
                "codebook_perplexity": torch.exp(entropy(freq)),
                "usage": (counts > 0).float().mean(),
            }
            return BottleneckOutput(
                latents=latents.reshape(*lead, self.latent_dim),
                losses={"codebook": codebook_loss, "commit": commit},
                metrics=metrics,
                indices=indices.reshape(lead),
            )
