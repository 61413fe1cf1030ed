"""The residual quantizer's losses are the sum of its levels' losses (supp. B.3, Eq. 13; RQ-VAE).

Eq. 13: r_0 = ẑ, q_l = Q_l(r_{l−1}), r_l = r_{l−1} − q_l; the loss of each name returned by the
composition is Σ_l of that loss of level l on its own residual. The references below quantize
every level naively in float64 from the levels' codebooks:

* SoftVQ (Eq. 4): p = softmax(−‖r − c_k‖₂ / τ), q = p C, kl = mean_t H(p_t) − H(mean_t p_t) (B.1),
  with VQ's opt-in losses (supp. Tab. 5) codebook = commit = mean_t ‖r_t − q_t‖².
* VQ (Eq. 2): q = c_{argmin_k ‖r − c_k‖}, codebook = commit = mean_t ‖r_t − q_t‖².
"""

from __future__ import annotations

import pytest
import torch

from softvq.bottlenecks.factory import build_bottleneck
from softvq.bottlenecks.residual import ResidualQuantizer
from softvq.config import BottleneckConfig

D, K, LEVELS, TAU = 6, 12, 3, 0.3


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(-1)


def _softvq_level(r: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Naive float64 SoftVQ level on tokens r (T, D): latents and its losses."""
    dist = (r[:, None, :] - book[None, :, :]).pow(2).sum(-1).sqrt()  # (T, K) Euclidean distances
    p = torch.softmax(-dist / TAU, dim=-1)
    q = p @ book
    kl = _entropy(p).mean() - _entropy(p.mean(0))
    sq = (r - q).pow(2).sum(-1).mean()
    return q, {"kl": kl.item(), "codebook": sq.item(), "commit": sq.item()}


def _vq_level(r: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Naive float64 VQ level on tokens r (T, D): nearest codeword and its losses."""
    rows = []
    for token in r:
        best = min(range(book.shape[0]), key=lambda k: (token - book[k]).pow(2).sum().item())
        rows.append(book[best])
    q = torch.stack(rows)
    sq = (r - q).pow(2).sum(-1).mean()
    return q, {"codebook": sq.item(), "commit": sq.item()}


@pytest.mark.parametrize("kind, names", [("softvq", ("kl", "codebook", "commit")), ("vq", ("codebook", "commit"))])
def test_residual_losses_are_the_sum_over_levels_on_their_residuals(kind: str, names: tuple[str, ...]) -> None:
    """Eq. 13 composition of the losses: out.losses[name] = Σ_l loss_l(r_{l−1}), each level's loss
    computed by hand in float64 on the residual it receives."""
    torch.manual_seed(0)
    extra = dict(temperature=TAU, codebook_loss=True, commit_loss=True) if kind == "softvq" else {}
    rq = build_bottleneck(BottleneckConfig(kind=kind, latent_dim=D, codebook_size=K, residual_levels=LEVELS, **extra))
    assert isinstance(rq, ResidualQuantizer) and len(rq.levels) == LEVELS
    with torch.no_grad():  # later levels hold finer codewords, as a trained RQ would
        for l, level in enumerate(rq.levels):
            level.codebook.mul_(0.6 ** l)
    z = torch.randn(2, 5, D)
    out = rq(z)
    assert set(out.losses) == set(names)

    naive_level = _softvq_level if kind == "softvq" else _vq_level
    residual = z.double().reshape(-1, D)
    per_level: list[dict[str, float]] = []
    for level in rq.levels:
        q, losses = naive_level(residual, level.codebook.detach().double())
        per_level.append(losses)
        residual = residual - q  # r_l = r_{l−1} − Q_l(r_{l−1})

    for name in names:
        expected = sum(losses[name] for losses in per_level)
        # every level contributes, so a sum that misses one is visibly off
        assert all(abs(losses[name]) > 0.02 * abs(expected) for losses in per_level), (name, per_level)
        assert out.losses[name].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), name
    torch.testing.assert_close(out.latents.double().reshape(-1, D), z.double().reshape(-1, D) - residual,
                               rtol=1e-4, atol=1e-5)


def test_residual_loss_gradient_reaches_every_level() -> None:
    """Σ_l of the levels' kl (Eq. 13 with Eq. 4's regulariser): each level's codebook gets the
    gradient of its own term; a level whose loss were left out of the sum would get none from it."""
    torch.manual_seed(1)
    rq = build_bottleneck(BottleneckConfig(kind="softvq", latent_dim=D, codebook_size=K, residual_levels=LEVELS,
                                           temperature=TAU))
    z = torch.randn(2, 5, D)
    rq(z).losses["kl"].backward()
    # the last level's codebook only enters the loss through its own kl (its latents feed no later level)
    last = rq.levels[-1]
    residual = z.double().reshape(-1, D)
    for level in list(rq.levels)[:-1]:
        residual = residual - _softvq_level(residual, level.codebook.detach().double())[0]
    book = last.codebook.detach().double().requires_grad_()
    dist = (residual[:, None, :] - book[None]).pow(2).sum(-1).sqrt()
    p = torch.softmax(-dist / TAU, dim=-1)
    (_entropy(p).mean() - _entropy(p.mean(0))).backward()
    torch.testing.assert_close(last.codebook.grad.double(), book.grad, rtol=1e-3, atol=1e-6)
