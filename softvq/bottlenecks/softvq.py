"""SoftVQ: the soft categorical posterior over a learnable codebook (paper Sec. 3.2, Eq. 4).

    posterior  q(z|x) = Softmax(-dist(ẑ, C) / τ)
    latent     z = q · C                       (a weighted sum of all codewords)
    regulariser L_kl = H(q(z|x)) - H(E_x q(z|x))  (supplementary B.1; unweighted here)

Everything is differentiable: no straight-through estimator, no codebook or commit loss (Sec. 3.2,
Eq. 7: "Neither codebook nor commit loss as in VQ is needed"). Supplementary Tab. 5 nevertheless
trains SoftVQ-S-64 with VQ's losses added, one at a time; ``codebook_loss`` / ``commit_loss``
switch them on (off by default, see :meth:`SoftVQ.vq_losses`). The arithmetic lives in
:mod:`softvq.bottlenecks.soft_assign`, by default in its memory-lean chunked form
(``chunk_size=None``); ``chunk_size=0`` selects the straightforward autograd form.
Two distances are supported and named after their source:

* ``distance="l2"``      the paper's Eq. 4, ‖ẑ − c‖₂ (not squared).
* ``distance="cosine"``  the released code: ẑ and C are L2-normalised and the logits are the
                          dot products ẑ·c / τ, i.e. softmax(−‖ẑ − c‖² / (2τ)) on the unit sphere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softvq.bottlenecks.base import (Bottleneck, BottleneckOutput, EntropyTerms, check_chunk_size, check_count,
                                     check_positive, entropy, float32_region, full_precision)
from softvq.bottlenecks.soft_assign import soft_assign, soft_latents


class SoftVQ(Bottleneck):
    """Soft vector quantization (Eq. 4) with a fixed or learnable temperature (supplementary Tab. 6 ablation).

    latent_dim: D; codebook_size: K; temperature: τ (paper 0.07); learnable_temperature: learn log τ;
    distance: ``l2`` (paper) or ``cosine`` (release); detach_codebook_in_logits: the release's
    detached codebook in the logits; entropy_temperature: the release's separate temperature
    (0.01) for the regulariser, ``None`` = the posterior's own (paper); chunk_size: tokens per
    chunk of the memory-lean path, ``None`` = automatic, ``0`` = straightforward autograd.

    codebook_loss / commit_loss: also return VQ's Eq. 2 losses ``codebook`` / ``commit`` (supp.
    Tab. 5; off by default, as in the paper's SoftVQ; see :meth:`vq_losses`).

    losses: ``kl`` = H(q) − H(E q) over the tokens of the batch (unweighted; λ4 lives in the
    objective), plus ``codebook`` and ``commit`` where switched on. metrics: ``soft_perplexity``,
    exp H(E q) (the posterior's; VQ's ``codebook_perplexity`` counts argmax codes, as eval's does),
    ``usage`` (fraction of codewords chosen by argmax), ``temperature`` (τ, or 1/mean ω for GMMVQ).
    """

    def __init__(
        self,
        latent_dim: int,
        codebook_size: int,
        *,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        distance: str = "l2",
        detach_codebook_in_logits: bool = False,
        entropy_temperature: float | None = None,
        chunk_size: int | None = None,
        codebook_loss: bool = False,
        commit_loss: bool = False,
    ) -> None:
        super().__init__()
        if distance not in ("l2", "cosine"):
            raise ValueError(f"unknown distance {distance!r}; use 'l2' (paper) or 'cosine' (release)")
        check_count("latent_dim", latent_dim)
        check_count("codebook_size", codebook_size)
        check_positive("temperature", temperature)
        if entropy_temperature is not None:
            check_positive("entropy_temperature", entropy_temperature)
        check_chunk_size("chunk_size", chunk_size)
        self.input_dim = self.latent_dim = latent_dim
        self.distance = distance
        self.detach_codebook_in_logits = detach_codebook_in_logits
        self.entropy_temperature = entropy_temperature
        self.chunk_size = chunk_size
        self.codebook_loss = codebook_loss
        self.commit_loss = commit_loss
        # Codewords start at about unit norm, the scale ẑ has after the encoder's final LayerNorm
        # and a fresh linear projection.
        self.codebook = nn.Parameter(torch.randn(codebook_size, latent_dim) / math.sqrt(latent_dim))
        log_tau = torch.tensor(math.log(temperature))
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    @property
    def codebook_size(self) -> int:
        """K, the codewords of the codebook."""
        return self.codebook.shape[0]

    @property
    def temperature(self) -> Tensor:
        """τ as a 0-dim tensor (a parameter when learnable)."""
        return self.log_temperature.exp()

    def normalized_codebook(self, *alongside: Tensor) -> Tensor:
        """The codebook as the decoder sees it (L2-normalised rows for the cosine variant), in the
        precision it meets ``alongside`` tensors in (:func:`~softvq.bottlenecks.base.full_precision`)."""
        c = full_precision(self.codebook, *alongside)
        return F.normalize(c, dim=-1) if self.distance == "cosine" else c

    def inverse_temperature(self, z: Tensor) -> Tensor:
        """1/τ; GMMVQ overrides this with per-token weights ω(ẑ) (supplementary B.2)."""
        return 1.0 / full_precision(self.log_temperature, z).exp()

    def split_input(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(ẑ, 1/τ) from the encoder projection; GMMVQ also reads ω from extra channels."""
        return z, self.inverse_temperature(z)

    def _flat_tokens(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(T, D) signal tokens as the assignment reads them (normalised for cosine) and the scale."""
        signal, scale = self.split_input(full_precision(z, self.codebook))
        flat = signal.reshape(-1, self.latent_dim)
        if scale.dim():
            scale = scale.reshape(-1)
        if self.distance == "cosine":
            flat = F.normalize(flat, dim=-1)
        return flat, scale

    def latents(self, z: Tensor) -> Tensor:
        """z = q(z|x) C alone; without gradients neither the regulariser (with the release's
        entropy temperature, a second softmax over every token-codeword pair), the argmax nor the
        posterior is computed (8.3 instead of 19.3 ms for the softvq-s-64 preset's bottleneck at
        batch 8 on the project's 2-core CPU)."""
        if torch.is_grad_enabled():
            return super().latents(z)
        self.check_input(z)
        with float32_region(z.device):
            flat, scale = self._flat_tokens(z)
            latents = soft_latents(flat, self.normalized_codebook(flat), scale=scale, distance=self.distance,
                                   chunk_size=self.chunk_size)
            return latents.reshape(*z.shape[:-1], self.latent_dim)

    def forward(self, z: Tensor) -> BottleneckOutput:
        """z = q(z|x) C with loss ``kl`` = H(q) − H(E q), the argmax indices and, when kept, the posterior (Eq. 4).

        ``kl`` = mean_tokens H(q) − H(mean_tokens q) (Eq. 4 / B.1) is low when each posterior is
        sharp (first term) and the batch uses the codebook evenly (second term). B.1 derives it from
        the KL to the uniform prior U, with the batch-averaged posterior in the cross-entropy term;
        as computed it equals KL(E q ‖ U) − mean KL(q ‖ U), which is ≤ 0 (H is concave), so the
        logged ``kl`` loss is negative (0 when every token has the same posterior, −log K at best).
        """
        self.check_input(z)
        with float32_region(z.device):
            lead = z.shape[:-1]
            flat, scale = self._flat_tokens(z)
            out = soft_assign(
                flat, self.normalized_codebook(flat), scale=scale, distance=self.distance,
                detach_codebook_in_logits=self.detach_codebook_in_logits,
                entropy_temperature=self.entropy_temperature, chunk_size=self.chunk_size,
            )
            kl = out.token_entropy - entropy(out.mean_posterior)
            losses = {"kl": kl, **self.vq_losses(flat, scale, out.latents)}
            used = torch.zeros(self.codebook_size, device=z.device, dtype=torch.bool)
            used[out.indices] = True
            metrics = {
                "soft_perplexity": torch.exp(entropy(out.mean_probs)).detach(),
                "usage": used.float().mean(),
                "temperature": (1.0 / scale.detach().float().mean()),
            }
            return BottleneckOutput(
                latents=out.latents.reshape(*lead, self.latent_dim),
                losses=losses,
                metrics=metrics,
                indices=out.indices.reshape(lead),
                probs=None if out.probs is None else out.probs.reshape(*lead, self.codebook_size),
                entropy_terms=EntropyTerms(out.token_entropy, out.mean_posterior),
            )

    def vq_losses(self, flat: Tensor, scale: Tensor, latents: Tensor) -> dict[str, Tensor]:
        """VQ's codebook and commit losses (Eq. 2) on SoftVQ, where switched on (supp. Tab. 5).

            codebook = ‖sg[ẑ] − z(sg[ẑ])‖²     commit = ‖ẑ − sg[z]‖²

        ẑ is ``flat``, the encoder output as the assignment reads it (L2-normalised for cosine, as
        in :class:`~softvq.bottlenecks.vq.VQ`). Eq. 2 measures ẑ against the chosen codeword c;
        supp. Tab. 5 does not say what takes its place in SoftVQ. We read it as z = q·C, the soft
        output the decoder reads (where VQ's decoder reads c), not the argmax codeword.

        The stop-gradients keep Eq. 2's division of labour. In VQ, c depends on ẑ only through
        argmin, which has no gradient, so the codebook loss moves only the codebook. SoftVQ's z
        depends on ẑ through q, so ‖sg[ẑ] − z‖² would still reach the encoder; the codebook term
        therefore evaluates z at sg[ẑ] (a second soft assignment, its scale 1/τ or ω detached
        too), and its gradient reaches the codebook alone, through the codewords and, unless
        ``detach_codebook_in_logits``, the logits. The commit term detaches z and reaches the
        encoder alone. Both have the same value, ‖ẑ − z‖².

        Per-token squared norm summed over channels, mean over tokens, unweighted: VQ's
        convention, so the objective weights them as VQ's (codebook 1, commit β).
        """
        losses = {}
        if self.codebook_loss:
            if torch.is_grad_enabled():
                held = soft_assign(flat.detach(), self.normalized_codebook(flat), scale=scale.detach(),
                                   distance=self.distance, detach_codebook_in_logits=self.detach_codebook_in_logits,
                                   chunk_size=self.chunk_size).latents
            else:  # no gradient to stop: z(sg[ẑ]) is z
                held = latents
            losses["codebook"] = (flat.detach() - held).pow(2).sum(-1).mean()
        if self.commit_loss:
            losses["commit"] = (flat - latents.detach()).pow(2).sum(-1).mean()
        return losses
