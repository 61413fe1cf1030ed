"""The release's per-sequence-segment codebooks (not in the paper).

The released checkpoints store ``quantize.embedding`` with a leading axis of 4 codebooks, but
they split the token *sequence*, not the channels: the L tokens are cut into S contiguous
segments of L/S tokens and segment i is quantized with codebook i (tokens 0-15 with codebook 0
for L = 64, S = 4). Contrast :class:`~softvq.bottlenecks.product.ProductQuantizer`, the paper's
channel groups (B.3, Eq. 12).

Each segment is a full bottleneck (``parts[i]``; the official converter maps
``quantize.embedding[i]`` to ``bottleneck.parts.{i}.codebook``). Latents, indices and probs are
concatenated back along the sequence; metrics are averaged over segments.

The entropy regulariser ``kl`` comes in two forms (``entropy_form``):

* ``"pooled"`` (the release): H(q) is averaged over all tokens and the batch posterior E q is
  averaged over the tokens of *all* segments before its entropy is taken, exactly as the
  released code flattens the four codebooks' logits into one (T·S, K) batch. Applies to segments
  that report :class:`~softvq.bottlenecks.base.EntropyTerms` (plain SoftVQ, GMMVQ); for other
  kinds there is no categorical regulariser to pool and the losses are averaged (the factory
  refuses "pooled" for SoftVQ/GMMVQ composed with groups or levels rather than silently average).
* ``"per_segment"``: each codebook's own H(q) − H(E q), averaged over segments.

Other losses are averaged over segments (the segments partition the tokens, see :mod:`.merge`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, cast

import torch
from torch import Tensor, nn

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput, EntropyTerms, entropy
from softvq.bottlenecks.merge import mean_losses, mean_metrics, shared_widths

SegmentEntropy = Literal["pooled", "per_segment"]


class SegmentCodebooks(Bottleneck):
    """S bottlenecks over S contiguous blocks of the token sequence; children in ``parts``."""

    def __init__(self, parts: list[Bottleneck], *, entropy_form: SegmentEntropy = "pooled") -> None:
        super().__init__()
        self.input_dim, self.latent_dim = shared_widths(parts, ("input_dim", "latent_dim"), "SegmentCodebooks",
                                                        "segment")
        if entropy_form not in ("pooled", "per_segment"):
            raise ValueError(f"unknown segment entropy form {entropy_form!r}; use 'pooled' (release) or 'per_segment'")
        self.parts = nn.ModuleList(parts)
        self.entropy_form = entropy_form

    @property
    def segments(self) -> int:
        """S, the contiguous blocks of the token sequence (one codebook each)."""
        return len(self.parts)

    @property
    def codebook_size(self) -> int | None:
        """Codewords per segment's codebook."""
        return cast(Bottleneck, self.parts[0]).codebook_size  # ModuleList items are typed Module

    @property
    def indices_have_code_axis(self) -> bool:  # type: ignore[override]
        """The parts' layout: whether each token's indices carry a trailing codebook axis."""
        return cast(Bottleneck, self.parts[0]).indices_have_code_axis

    @property
    def codes_per_token(self) -> int | None:
        """The parts' (each token has one part's codes)."""
        widths = {cast(Bottleneck, part).codes_per_token for part in self.parts}
        return widths.pop() if len(widths) == 1 else None

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        """Each block of tokens' codewords from its own codebook, concatenated along the sequence."""
        if self.codes_per_token is None:
            return super().indices_to_latents(indices)
        indices = self.check_indices(indices)
        if indices.dim() < 2 or indices.shape[1] % self.segments:
            raise ValueError(f"SegmentCodebooks indices are (B, L{', P' if self.indices_have_code_axis else ''}) "
                             f"with L divisible by {self.segments}, got {tuple(indices.shape)}")
        chunks = indices.split(indices.shape[1] // self.segments, dim=1)
        return torch.cat([cast(Bottleneck, part).indices_to_latents(chunk)
                          for part, chunk in zip(self.parts, chunks)], dim=1)

    def _segments(self, z: Tensor) -> tuple[Tensor, ...]:
        """The S contiguous blocks of the token sequence, after checking that they exist."""
        self.check_input(z)
        if z.dim() != 3:
            raise ValueError(f"SegmentCodebooks expects (B, L, {self.input_dim}) tokens, got {tuple(z.shape)}")
        length = z.shape[1]
        if length % self.segments:
            raise ValueError(
                f"{length} tokens cannot be split into {self.segments} equal segments; "
                f"use a number of tokens divisible by {self.segments}"
            )
        return z.split(length // self.segments, dim=1)

    def latents(self, z: Tensor) -> Tensor:
        """``forward(z).latents`` alone, each segment through its part's fast path."""
        parts = cast(Iterable[Bottleneck], self.parts)  # ModuleList items are typed Module
        return torch.cat([part.latents(chunk) for part, chunk in zip(parts, self._segments(z))], dim=1)

    def forward(self, z: Tensor) -> BottleneckOutput:
        """Each block of tokens through its own codebook; the entropy pooled or per segment (``entropy_form``)."""
        outputs = [part(chunk) for part, chunk in zip(self.parts, self._segments(z))]
        losses = mean_losses(outputs)
        terms = None
        if all(o.entropy_terms is not None for o in outputs):
            terms = EntropyTerms(
                token_entropy=torch.stack([o.entropy_terms.token_entropy for o in outputs]).mean(),
                mean_posterior=torch.stack([o.entropy_terms.mean_posterior for o in outputs]).mean(0),
            )
        if self.entropy_form == "pooled" and terms is not None:
            losses["kl"] = terms.token_entropy - entropy(terms.mean_posterior)
        indices = None if any(o.indices is None for o in outputs) else torch.cat([o.indices for o in outputs], 1)
        probs = None if any(o.probs is None for o in outputs) else torch.cat([o.probs for o in outputs], 1)
        return BottleneckOutput(
            latents=torch.cat([o.latents for o in outputs], dim=1),
            losses=losses,
            metrics=mean_metrics(outputs),
            indices=indices,
            probs=probs,
            entropy_terms=terms,
        )
