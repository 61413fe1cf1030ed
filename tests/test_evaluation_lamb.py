"""The linear probe's LAMB optimizer over several steps (paper C.3; You et al. 2020, Alg. 2).

Per parameter tensor w with gradient g_t at step t = 1, 2, ...:

    m_t = β1 m_{t−1} + (1 − β1) g_t          v_t = β2 v_{t−1} + (1 − β2) g_t²
    m̂_t = m_t / (1 − β1^t)                   v̂_t = v_t / (1 − β2^t)
    r_t = m̂_t / (√v̂_t + ε) + λ w             (λ: the group's weight decay, on every tensor of it)
    w  ← w − η · (‖w‖ / ‖r_t‖) · r_t          (trust ratio with φ = identity; 1 where a norm is 0)

A single step cannot tell β1 from β2 or see the momentum (m̂_1 = g_1, v̂_1 = g_1²): three steps with
different gradients can. The reference is written with Python floats (double precision) and the
optimizer runs on float64 tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from softvq.evaluation.probe import Lamb

EPS = 1e-6


def _lamb_reference(w: list[float], grads: list[list[float]], lr: float, betas: tuple[float, float],
                    weight_decay: float) -> list[list[float]]:
    """The parameter after each of len(grads) LAMB steps, element by element."""
    beta1, beta2 = betas
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    w = list(w)
    after = []
    for t, g in enumerate(grads, start=1):
        m = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        m_hat = [mi / (1 - beta1 ** t) for mi in m]
        v_hat = [vi / (1 - beta2 ** t) for vi in v]
        r = [mh / (math.sqrt(vh) + EPS) + weight_decay * wi for mh, vh, wi in zip(m_hat, v_hat, w)]
        w_norm = math.sqrt(sum(x * x for x in w))
        r_norm = math.sqrt(sum(x * x for x in r))
        trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        w = [wi - lr * trust * ri for wi, ri in zip(w, r)]
        after.append(list(w))
    return after


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.6, 0.95)])
def test_lamb_three_steps_match_the_algorithm(betas: tuple[float, float]) -> None:
    """You et al. 2020, Alg. 2 over three steps, per tensor: Adam moments with bias correction,
    decoupled weight decay λw inside the update, layer-wise trust ratio ‖w‖/‖r‖. Two parameter
    groups (λ = 0.1 and λ = 0 with its own η), and a bias that starts at 0 (trust ratio 1)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(2, 3, generator=gen, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    other = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    params = [weight, bias, other]
    settings = [(0.05, 0.1), (0.05, 0.1), (0.2, 0.0)]  # (η, λ) of each parameter's group
    # three different gradients per parameter, with sign flips so that momentum and raw gradient disagree
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale for scale in (1.0, -2.0, 0.5)]
             for p in params]
    starts = [p.detach().flatten().tolist() for p in params]

    opt = Lamb([{"params": [weight, bias], "lr": 0.05, "weight_decay": 0.1},
                {"params": [other], "lr": 0.2, "weight_decay": 0.0}], betas=betas, eps=EPS)
    expected = [_lamb_reference(start, [g.flatten().tolist() for g in gs], lr, betas, wd)
                for start, gs, (lr, wd) in zip(starts, grads, settings)]
    for step in range(3):
        for p, gs in zip(params, grads):
            p.grad = gs[step].clone()
        opt.step()
        for name, p, ref in zip(("weight", "bias", "other"), params, expected):
            torch.testing.assert_close(p.detach().flatten(), torch.tensor(ref[step], dtype=torch.float64),
                                       rtol=1e-6, atol=1e-12, msg=lambda m: f"step {step + 1}, {name}: {m}")
    # sanity of the setup: the bias really started at norm 0, and every tensor moved at every step
    assert starts[1] == [0.0, 0.0, 0.0]
    for ref, start in zip(expected, starts):
        for before, after in zip([start] + ref[:-1], ref):
            assert max(abs(a - b) for a, b in zip(after, before)) > 1e-4


def test_lamb_step_length_is_the_trust_ratio_times_the_learning_rate() -> None:
    """The layer-wise adaptation of Alg. 2: with φ = identity the step η (‖w‖/‖r‖) r has length
    η ‖w‖, whatever the gradient's scale, at every step (not only the first)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
    opt = Lamb([w], lr=0.01, betas=(0.9, 0.999), eps=EPS, weight_decay=0.05)
    for scale in (1e-3, 1.0, 1e3):
        before = w.detach().clone()
        w.grad = torch.randn(5, generator=gen, dtype=torch.float64) * scale
        opt.step()
        step_length = (w.detach() - before).norm().item()
        assert step_length == pytest.approx(0.01 * before.norm().item(), rel=1e-9)


def test_lamb_takes_a_closure_that_recomputes_the_loss() -> None:
    """``step(closure)`` as torch's optimizers take it: the closure runs backward, so it must run with
    gradients on (``step`` itself does not record them); the step equals one taken after backward."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    twin = torch.nn.Parameter(w.detach().clone())
    target = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    opt = Lamb([w], lr=0.1, weight_decay=0.01)
    loss = opt.step(closure)
    assert float(loss) == pytest.approx(float(((twin - target) ** 2).sum()))
    plain = Lamb([twin], lr=0.1, weight_decay=0.01)
    ((twin - target) ** 2).sum().backward()
    plain.step()
    assert torch.equal(w.detach(), twin.detach())
