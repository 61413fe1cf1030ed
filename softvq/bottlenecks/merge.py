"""How composite bottlenecks (product, residual, segments) combine their parts' outputs.

Rules, one per way of splitting the work:

* channel groups (product quantization) and residual levels: losses of the same name are
  **summed**. Every loss here is a per-token quantity summed over channels and averaged over
  tokens, so summing over channel groups reproduces the ungrouped value (Gaussian KL, VQ
  losses), and for the categorical regulariser it is WeTok's additivity of entropy over
  independent groups (WeTok Eq. 7/9); over residual levels it is RQ-VAE's sum of per-depth losses.
* sequence segments: each part sees a disjoint block of equally many tokens, so losses are
  **averaged**, which reproduces the mean over all tokens.
* metrics (perplexity, usage, temperature, ...) are averaged over parts in every case.

Every composite also needs its parts to agree on their widths (:func:`shared_widths`); hard
parts' indices are concatenated along a code axis (:func:`stack_codes`, undone by
:func:`parts_latents`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput


def shared_widths(parts: list[Bottleneck], fields: tuple[str, str], owner: str, noun: str) -> tuple[int, int]:
    """The two widths (e.g. ``("latent_dim", "side_dim")``) that all ``parts`` share.

    Raises a ValueError naming ``owner`` when there are no parts or their widths differ.
    """
    if not parts:
        raise ValueError(f"{owner} needs at least one {noun}")
    widths = {tuple(getattr(p, f) for f in fields) for p in parts}
    if len(widths) != 1:
        names = ", ".join(f.removesuffix("_dim") for f in fields)
        raise ValueError(f"all {noun}s of a {owner} must have the same widths ({names}), got {sorted(widths)}")
    return widths.pop()


def sum_losses(outputs: list[BottleneckOutput]) -> dict[str, Tensor]:
    """Each loss name summed over the parts' outputs (a name only some parts return is their sum)."""
    merged: dict[str, Tensor] = {}
    for out in outputs:
        for name, value in out.losses.items():
            merged[name] = merged[name] + value if name in merged else value
    return merged


def mean_losses(outputs: list[BottleneckOutput]) -> dict[str, Tensor]:
    """Each loss name summed over the parts and divided by the number of parts."""
    return {name: value / len(outputs) for name, value in sum_losses(outputs).items()}


def mean_metrics(outputs: list[BottleneckOutput]) -> dict[str, Tensor]:
    """Each metric name averaged, in float32, over the parts that report it."""
    names = {name for out in outputs for name in out.metrics}
    merged = {}
    for name in sorted(names):
        values = [out.metrics[name].float() for out in outputs if name in out.metrics]
        merged[name] = torch.stack(values).mean()
    return merged


def stack_codes(outputs: list[BottleneckOutput], token_dims: int) -> tuple[Tensor | None, Tensor | None]:
    """Indices (…, P_total) and probs (…, P_total, K) of parts that each cover the same tokens.

    ``token_dims`` is the number of leading token dimensions (2 for (B, L)). Each part's indices
    are (tokens) or (tokens, P); they are concatenated along a new/its code axis. Probs are
    stacked only when every part has them with the same K; otherwise None.
    """
    # the parts' tensors, None left out: as many as there are parts when every part has them
    index_parts = [out.indices for out in outputs if out.indices is not None]
    if len(index_parts) < len(outputs):
        indices = None
    else:
        parts = [i if i.dim() > token_dims else i.unsqueeze(-1) for i in index_parts]
        indices = torch.cat(parts, dim=-1)
    probs = None
    prob_parts = [out.probs for out in outputs if out.probs is not None]
    if len(prob_parts) == len(outputs):
        parts = [p if p.dim() > token_dims + 1 else p.unsqueeze(-2) for p in prob_parts]
        if len({p.shape[-1] for p in parts}) == 1:
            probs = torch.cat(parts, dim=-2)
    return indices, probs


def codes_per_token(parts: Iterable[Bottleneck]) -> int | None:
    """The index columns of parts whose indices are concatenated along the code axis
    (:func:`stack_codes`): their sum, or None when a part's indices do not determine its latents."""
    widths = [part.codes_per_token for part in parts]
    return None if None in widths else sum(cast(list[int], widths))


def parts_latents(owner: Bottleneck, parts: Iterable[Bottleneck], indices: Tensor) -> list[Tensor]:
    """Each part's latents from its columns of ``indices`` (tokens..., P_total), undoing
    :func:`stack_codes`; ``owner``'s refusal where a part's indices do not determine its latents."""
    parts = list(parts)
    if codes_per_token(parts) is None:
        Bottleneck.indices_to_latents(owner, indices)  # raises, naming why
    indices, start, out = owner.check_indices(indices), 0, []
    for part in parts:
        width = cast(int, part.codes_per_token)
        chunk = indices[..., start:start + width]
        out.append(part.indices_to_latents(chunk if part.indices_have_code_axis else chunk.squeeze(-1)))
        start += width
    return out
