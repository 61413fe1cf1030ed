"""The soft assignment at the heart of SoftVQ (paper Eq. 4, supplementary B.1/B.2), two ways.

For T tokens x (T, D), a codebook C (K, D) and a scale s (1/τ, or GMMVQ's per-token ω):

    a = affinity(x, C_logit)        (T, K)   −‖x − c‖₂ (paper) or x·c on unit vectors (release)
    p = softmax(s · a)              posterior q(z|x)
    z = p C                         latents
    π = softmax(a / τ_H)            posterior the regulariser sees (π = p unless the release's
                                    separate entropy temperature τ_H = 0.01 is used)
    token_entropy = mean_t H(π_t),  mean_posterior = mean_t π_t   →  L_kl = H_tok − H(E π)

``C_logit`` is either C itself or ``C.detach()`` (the release computes logits against a detached
codebook, so C learns only through z = pC).

* :func:`soft_assign_reference` is the straightforward autograd version. It keeps several
  (T, K) tensors alive for backward: at T = 256·64 tokens and K = 8192 that is gigabytes.
* :class:`ChunkedSoftAssign` processes ``chunk`` tokens at a time, saves only its inputs, and
  recomputes each chunk's affinities and softmaxes in backward. The batch-level term needs the
  full-batch mean E π; it is an *output* here, so its gradient dL/d(Eπ) (which depends on the whole
  batch) arrives in backward before any chunk is revisited, and each chunk then needs only
  ∂(Eπ)/∂ρ_t = π_t-Jacobian / T.
* :func:`soft_latents` computes z alone, chunk by chunk and without gradients: what inference
  needs when it keeps only the latents.

Both chunked paths raise each softmax row's far tail to probability 1e-30 (:func:`_raise_far_tail_`)
so that no subnormal float is computed with; the float32 values that remain are unchanged, and
the gradient those tail entries would get through the floor (zero instead of ~1e-30) is ignored.

Backward formulas (per token t, softmax Jacobian J(v) = v ⊙ (g − ⟨v, g⟩)):
    g_p   = g_z C^T,              g_ℓ = J(p)(g_p)                     ℓ = s·a
    g_ρ   = J(π)(g_Eπ − g_H · log π) / T                              ρ = a/τ_H (or ℓ)
    g_a   = s·g_ℓ + g_ρ/τ_H,      g_s = ⟨g_ℓ, a⟩
    cosine: g_x = g_a C_logit,    g_C_logit = g_a^T x
    l2:     w = −g_a / (2‖x − c‖), g_x = 2(x Σ_k w − w C_logit), g_C_logit = 2(C_logit Σ_t w − w^T x)
    g_C  += p^T g_z
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from softvq.bottlenecks.base import check_chunk_size, entropy
from softvq.bottlenecks.extremes import last_axis_argmax

# Elements of one (chunk × K) working tensor in the chunked path. CPU: 2^21 floats = 8 MiB, which
# keeps a chunk's ~10 working tensors in cache-friendly sizes (faster than the straightforward
# version, benchmarks/bench_softvq_memory.py). GPU: 2^24 floats = 64 MiB, so kernels stay large
# enough to hide launch overhead while peak memory stays a small fraction of the straightforward one.
_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 21}
_AUTO_CHUNK_ELEMENTS_ACCELERATOR = 1 << 24
# Below this many (token, codeword) pairs (a 1 MiB posterior) the straightforward version is kept
# under ``chunk_size=None``: memory is negligible there and it avoids the per-chunk Python overhead
# (about 1 ms, +33% at 128 tokens x 256 codes on one CPU thread).
_SMALL_PROBLEM_ELEMENTS = 1 << 18
_SQ_EPS = 1e-12  # clamp of the squared L2 distance before sqrt (sqrt'(0) is infinite)
# Smallest probability the chunked softmaxes produce; see _raise_far_tail_.
_MIN_PROBABILITY = 1e-30


@dataclass
class SoftAssignment:
    """What a soft assignment returns.

    latents (T, D); token_entropy (scalar) and mean_posterior (K,) of the regulariser's posterior π,
    both differentiable; mean_probs (K,) = mean_t p_t and indices (T,) = argmax_k p_t, detached;
    probs (T, K) where materialised (always without grad, never in the chunked path with grad).
    """

    latents: Tensor
    token_entropy: Tensor
    mean_posterior: Tensor
    mean_probs: Tensor
    indices: Tensor
    probs: Tensor | None


def affinity(z: Tensor, codebook: Tensor, distance: str) -> Tensor:
    """Similarity of every token to every codeword, (..., D) x (K, D) -> (..., K).

    ``l2``: −‖z − c‖₂ (paper Eq. 4). ``cosine``: z·c of inputs the caller already normalised.
    """
    if distance == "cosine":
        return z @ codebook.t()
    if distance == "l2":
        sq = (z * z).sum(-1, keepdim=True) - 2 * (z @ codebook.t()) + (codebook * codebook).sum(-1)
        # clamp: rounding can make the squared distance slightly negative; sqrt'(0) is infinite.
        return -sq.clamp_min(_SQ_EPS).sqrt()
    raise ValueError(f"unknown distance {distance!r}; use 'l2' (paper) or 'cosine' (release)")


def _raise_far_tail_(logits: Tensor, argmax: Tensor | None = None) -> Tensor:
    """Raise, in place, every logit more than log(1/(K·1e-30)) (60 for K = 8192) below its row's
    maximum to that level, so that no softmax probability falls below 1e-30. ``argmax`` (T,),
    where the caller has it, locates each row's maximum (a gather instead of a reduction).

    float32 exp(x) is subnormal below x = −87.3, and a softmax also divides by a row sum of up to
    K. Rows with a wide range, such as the release regulariser's ρ = a/τ_H (τ_H = 0.01: a range
    of 200 on cosine affinities), are then full of subnormal numbers, which x86 CPUs handle with
    microcode assists: on the project's Xeon the softmax of such a (128, 8192) chunk took 5x as long
    as one of a narrow row, and the entropy's dot product 10x. The raised probabilities move by
    less than K·1e-30 and the row sum by far less than float32 resolves, so the other
    probabilities, the latents and the entropy keep their float32 values.
    """
    row_max = logits.amax(-1, keepdim=True) if argmax is None else logits.gather(-1, argmax.unsqueeze(-1))
    reach = -math.log(_MIN_PROBABILITY * logits.shape[-1])
    return torch.maximum(logits, row_max - reach, out=logits)


def _softmax_jvp(grad: Tensor, probs: Tensor) -> Tensor:
    """J(p) g = p ⊙ (g − ⟨p, g⟩) along the last axis, as one fused kernel (softmax's own backward)."""
    return torch.ops.aten._softmax_backward_data(grad, probs, -1, probs.dtype)


def _entropy_sum(rho: Tensor, post: Tensor, top: Tensor) -> Tensor:
    """Σ_t H(π_t) for π = softmax(ρ) (rows t), without another pass of exp or log over (T, K)
    (hence not :func:`~softvq.bottlenecks.base.entropy`, which takes log π over every entry).

    With m_t = ρ_t,top at the row's argmax, lse(ρ_t) = m_t − log π_t,top exactly, so
    H(π_t) = lse(ρ_t) − ⟨π_t, ρ_t⟩ = −log π_t,top − ⟨π_t, ρ_t − m_t⟩: a sum of two non-negative
    terms. Written as lse − ⟨π, ρ⟩ instead, two numbers of size |ρ| (up to 1/τ_H = 100) cancel to
    an entropy that can be 0.01, losing float32's digits (relative error 3e-5 to 3e-3, measured
    against float64). Shifts ``rho`` in place; the inner products of all rows together are one
    dot product of the flattened tensors.
    """
    top = top.unsqueeze(-1)
    shifted = rho.sub_(rho.gather(-1, top))  # ρ − m ≤ 0
    return -post.gather(-1, top).log().sum() - torch.dot(post.reshape(-1), shifted.reshape(-1))


def auto_chunk_size(num_codes: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk: one (chunk × K) float32 tensor of about 8 MiB on CPU, 64 MiB on a GPU."""
    kind = torch.device(device).type
    elements = _AUTO_CHUNK_ELEMENTS.get(kind, _AUTO_CHUNK_ELEMENTS_ACCELERATOR)
    return max(16, elements // max(1, num_codes))


def soft_assign_reference(
    x: Tensor, codebook: Tensor, logit_codebook: Tensor, scale: Tensor,
    distance: str, entropy_temperature: float | None,
) -> SoftAssignment:
    """Straightforward autograd implementation (materialises every (T, K) intermediate)."""
    aff = affinity(x, logit_codebook, distance)
    logits = aff * (scale.unsqueeze(-1) if scale.dim() else scale)
    probs = logits.softmax(-1)
    latents = probs @ codebook
    if entropy_temperature is None:
        post = probs
    else:
        post = (aff / entropy_temperature).softmax(-1)
    token_entropy = entropy(post).mean()
    return SoftAssignment(
        latents=latents,
        token_entropy=token_entropy,
        mean_posterior=post.mean(0),
        mean_probs=probs.detach().mean(0),
        indices=last_axis_argmax(logits),
        probs=probs,
    )


class ChunkedSoftAssign(torch.autograd.Function):
    """Memory-lean soft assignment: recomputes each chunk in backward (see module docstring).

    Inputs: x (T, D), codebook (K, D), logit_codebook (K, D) (the same tensor, or detached),
    scale (0-dim or (T,), positive), distance, entropy_temperature (float or None), chunk,
    keep_probs. Outputs: latents (T, D), token_entropy (), mean_posterior (K,) [differentiable];
    mean_probs (K,), indices (T,), probs (T, K) or empty [not differentiable].
    """

    @staticmethod
    def forward(ctx, x, codebook, logit_codebook, scale, distance, entropy_temperature, chunk, keep_probs):
        t, k = x.shape[0], codebook.shape[0]
        latents = x.new_empty(t, codebook.shape[1])
        indices = torch.empty(t, dtype=torch.long, device=x.device)
        entropy_sum = x.new_zeros(())
        post_sum = x.new_zeros(k)
        probs_sum = x.new_zeros(k)
        probs_out = x.new_empty(t, k) if keep_probs else x.new_empty(0)
        per_token = scale.dim() > 0
        for start in range(0, t, chunk):
            stop = min(start + chunk, t)
            aff = affinity(x[start:stop], logit_codebook, distance)
            top = indices[start:stop]
            top.copy_(last_axis_argmax(aff))  # the scale is positive: argmax of the logits
            s = scale[start:stop].unsqueeze(-1) if per_token else scale
            # ρ = a/τ_H before a is scaled in place, exactly as backward recomputes it.
            rho = None if entropy_temperature is None else aff * (1.0 / entropy_temperature)
            logits = _raise_far_tail_(aff.mul_(s), top)  # in place: one (chunk, K) buffer
            if keep_probs:
                p = torch.ops.aten._softmax.out(logits, -1, False, out=probs_out[start:stop])
            else:
                p = torch.softmax(logits, dim=-1)
            torch.matmul(p, codebook, out=latents[start:stop])
            p_sum = p.sum(0)
            probs_sum += p_sum
            if rho is None:
                rho, post, post_sum_chunk = logits, p, p_sum
            else:
                post = torch.softmax(_raise_far_tail_(rho, top), dim=-1)
                post_sum_chunk = post.sum(0)
            entropy_sum += _entropy_sum(rho, post, top)
            post_sum += post_sum_chunk
        ctx.save_for_backward(x, codebook, logit_codebook, scale, indices)
        ctx.distance, ctx.entropy_temperature, ctx.chunk = distance, entropy_temperature, chunk
        mean_probs = probs_sum / t
        ctx.mark_non_differentiable(indices, mean_probs, probs_out)
        return latents, entropy_sum / t, post_sum / t, mean_probs, indices, probs_out

    @staticmethod
    def backward(ctx, g_latents, g_entropy, g_post, _g_probs, _g_idx, _g_probs_out):
        x, codebook, logit_codebook, scale, indices = ctx.saved_tensors
        distance, tau_h, chunk = ctx.distance, ctx.entropy_temperature, ctx.chunk
        need_x, need_c, need_cl, need_s = ctx.needs_input_grad[:4]
        t, k = x.shape[0], codebook.shape[0]
        per_token = scale.dim() > 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            if g_latents is None:
                g_latents = x.new_zeros(1, codebook.shape[1]).expand(t, -1)
            g_entropy = x.new_zeros(()) if g_entropy is None else g_entropy
            g_post = x.new_zeros(k) if g_post is None else g_post
            g_x = torch.empty_like(x) if need_x else None
            g_c = torch.zeros_like(codebook) if need_c else None
            g_cl = torch.zeros_like(logit_codebook) if need_cl else None
            g_s = (torch.empty_like(scale) if per_token else scale.new_zeros(())) if need_s else None
            inv_t = 1.0 / t
            for start in range(0, t, chunk):
                stop = min(start + chunk, t)
                xc, gz = x[start:stop], g_latents[start:stop]
                aff = affinity(xc, logit_codebook, distance)
                top = indices[start:stop]
                s = scale[start:stop].unsqueeze(-1) if per_token else scale
                logits = _raise_far_tail_(aff * s, top)
                p = torch.softmax(logits, dim=-1)
                if need_c:
                    g_c.addmm_(p.t(), gz)
                # Latents: g_ℓ = J(p)(g_z C^T).
                g_logits = _softmax_jvp(gz @ codebook.t(), p)
                # Regulariser: g_ρ = J(π)(g_Eπ − g_H log π) / T; log π = ρ − lse(ρ) and the
                # softmax Jacobian annihilates the per-row constant, so u = g_Eπ − g_H ρ.
                if tau_h is None:
                    post, u = p, logits.mul_(-g_entropy)
                else:
                    rho = _raise_far_tail_(aff.mul(1.0 / tau_h), top)
                    post = torch.softmax(rho, dim=-1)
                    u = rho.mul_(-g_entropy)
                u = _softmax_jvp(u.add_(g_post), post)
                if tau_h is None:
                    g_logits.add_(u, alpha=inv_t)
                if need_s:
                    gs = (g_logits * aff).sum(-1)
                    if per_token:
                        g_s[start:stop] = gs
                    else:
                        g_s += gs.sum()
                g_aff = g_logits.mul_(s)
                if tau_h is not None:
                    g_aff.add_(u, alpha=inv_t / tau_h)
                if distance == "cosine":
                    if need_x:
                        torch.matmul(g_aff, logit_codebook, out=g_x[start:stop])
                    if need_cl:
                        g_cl.addmm_(g_aff.t(), xc)
                else:
                    # a = −sqrt(sq): da/dsq = 1/(2a) where sq was not clamped, else 0.
                    # Entries at the clamp have aff == −sqrt(eps) exactly (same float32 op).
                    clamped = aff >= -aff.new_tensor(_SQ_EPS).sqrt()
                    w = g_aff.div_(aff).mul_(0.5).masked_fill_(clamped, 0.0)
                    if need_x:
                        g_x[start:stop] = 2 * (xc * w.sum(-1, keepdim=True) - w @ logit_codebook)
                    if need_cl:
                        g_cl += 2 * (logit_codebook * w.sum(0).unsqueeze(-1) - w.t() @ xc)
        return g_x, g_c, g_cl, g_s, None, None, None, None


def _resolve_chunk(chunk_size: int | None, tokens: int, num_codes: int, device: torch.device) -> int:
    """Tokens per chunk of the chunked version for ``chunk_size`` (see :func:`soft_assign`), or 0
    for the straightforward version (``0``, or a problem of at most 2^18 pairs under ``None``)."""
    check_chunk_size("chunk_size", chunk_size)
    if chunk_size is None:
        return 0 if tokens * num_codes <= _SMALL_PROBLEM_ELEMENTS else auto_chunk_size(num_codes, device)
    return chunk_size


def soft_latents(x: Tensor, codebook: Tensor, *, scale: Tensor, distance: str,
                 chunk_size: int | None = None) -> Tensor:
    """z = softmax(s · affinity(x, C)) C alone (Eq. 4), for inference: no posterior is kept and
    neither the regulariser's softmax nor the argmax is computed.

    Chunked as :func:`soft_assign` is for the same ``chunk_size``, and with the same kernels, so
    the result equals ``soft_assign(...).latents`` exactly. Without gradients it takes less than
    half the time of the full assignment when the release's separate entropy temperature is on (a
    second softmax over every (token, codeword) pair); with gradients use :func:`soft_assign`.
    """
    if distance not in ("l2", "cosine"):
        raise ValueError(f"unknown distance {distance!r}; use 'l2' (paper) or 'cosine' (release)")
    t = x.shape[0]
    chunk = _resolve_chunk(chunk_size, t, codebook.shape[0], x.device) or max(1, t)
    latents = x.new_empty(t, codebook.shape[1])
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        s = scale[start:stop].unsqueeze(-1) if scale.dim() else scale
        logits = affinity(x[start:stop], codebook, distance).mul_(s)
        probs = torch.softmax(_raise_far_tail_(logits), dim=-1)
        torch.matmul(probs, codebook, out=latents[start:stop])
    return latents


def soft_assign(
    x: Tensor, codebook: Tensor, *, scale: Tensor, distance: str,
    detach_codebook_in_logits: bool = False, entropy_temperature: float | None = None,
    chunk_size: int | None = None,
) -> SoftAssignment:
    """Soft assignment of tokens ``x`` (T, D) to ``codebook`` (K, D); see the module docstring.

    ``chunk_size``: ``0`` uses the straightforward autograd version; ``None`` picks: the chunked
    version with :func:`auto_chunk_size` tokens per chunk, except for small problems (T·K ≤ 2^18)
    where the straightforward one is faster; a positive number the chunked version with that many
    tokens. ``scale`` is 1/τ (0-dim) or per-token weights ω (T,). Everything runs in float32.
    ``probs`` is None only when the chunked version ran while gradients were recorded.
    """
    if distance not in ("l2", "cosine"):
        raise ValueError(f"unknown distance {distance!r}; use 'l2' (paper) or 'cosine' (release)")
    logit_codebook = codebook.detach() if detach_codebook_in_logits else codebook
    chunk = _resolve_chunk(chunk_size, x.shape[0], codebook.shape[0], x.device)
    if chunk == 0:
        return soft_assign_reference(x, codebook, logit_codebook, scale, distance, entropy_temperature)
    keep_probs = not torch.is_grad_enabled()
    latents, h, post, mean_probs, indices, probs = ChunkedSoftAssign.apply(
        x, codebook, logit_codebook, scale, distance, entropy_temperature, chunk, keep_probs,
    )
    return SoftAssignment(
        latents=latents, token_entropy=h, mean_posterior=post, mean_probs=mean_probs,
        indices=indices, probs=probs if keep_probs else None,
    )

