"""DDPM's fixed variances and the sampler's temperature against float64 closed forms.

* Ho et al. 2020 Sec. 3.2: the reverse-process variance σ_t² is fixed to either β_t ("fixed-large")
  or β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) ("fixed-small"). The improved-DDPM release (which DiT
  uses) sets the fixed-large log variance at t = 0 to log β̃_1 instead of log β_0, so that the
  decoder's variance is not the tiny β_0; its value at t = 0 never adds noise when sampling.
* One ancestral step (Ho et al. Algorithm 2): x_{t−1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I) for t ≥ 1
  and z = 0 at t = 0, with μ_θ = (x_t − β_t / √(1 − ᾱ_t) · ε_θ) / √α_t (their Eq. 11). MAR's
  temperature τ (Li et al. 2024 Sec. 3.3) scales the noise: σ_t τ z.

β is recomputed here from the schedules' definitions, never read from the code's arrays: DDPM's
linear 1e-4..0.02 over T = 1000 (scaled by 1000/T for other T, as the DiT / IDDPM release does)
and the cosine schedule of Nichol & Dhariwal 2021 Eq. 17 (β clipped at 0.999).
"""

import math

import pytest
import torch

from softvq.generation.diffusion import GaussianDiffusion

F64 = torch.float64


def linear_betas_ref(T: int) -> list[float]:
    s = 1000 / T
    lo, hi = s * 1e-4, s * 0.02
    return [lo + (hi - lo) * i / (T - 1) for i in range(T)]


def cosine_betas_ref(T: int) -> list[float]:
    """IDDPM Eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = 1 − ᾱ(t+1)/ᾱ(t) ≤ 0.999."""
    f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]


def alpha_bars(betas: list[float]) -> list[float]:
    out, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        out.append(acc)
    return out


def respaced_betas_ref(betas: list[float], K: int) -> list[float]:
    """IDDPM Sec. 4: keep K evenly spaced steps k_i = round(i (T−1)/(K−1)) and set
    β'_i = 1 − ᾱ_{k_i} / ᾱ_{k_{i−1}} (ᾱ_{k_{−1}} = 1), so the kept ᾱ are unchanged."""
    T = len(betas)
    ab = alpha_bars(betas)
    keep = [round(i * (T - 1) / (K - 1)) for i in range(K)]
    prev, out = 1.0, []
    for k in keep:
        out.append(1 - ab[k] / prev)
        prev = ab[k]
    return out


def posterior_var(betas: list[float], t: int) -> float:
    """β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), t ≥ 1 (Ho et al. Eq. 7)."""
    ab = alpha_bars(betas)
    return betas[t] * (1 - ab[t - 1]) / (1 - ab[t])


def fixed_large_ref(betas: list[float]) -> torch.Tensor:
    return torch.tensor([posterior_var(betas, 1)] + betas[1:], dtype=F64)


SCHEDULES = {
    "linear-1000": lambda: (GaussianDiffusion.from_schedule("linear", 1000, variance="fixed-large"),
                            linear_betas_ref(1000)),
    "linear-100": lambda: (GaussianDiffusion.from_schedule("linear", 100, variance="fixed-large"),
                           linear_betas_ref(100)),
    "cosine-1000": lambda: (GaussianDiffusion.from_schedule("cosine", 1000, variance="fixed-large"),
                            cosine_betas_ref(1000)),
    "cosine-1000-respaced-25": lambda: (
        GaussianDiffusion.from_schedule("cosine", 1000, variance="fixed-large").respaced(25),
        respaced_betas_ref(cosine_betas_ref(1000), 25)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_fixed_large_log_variance_is_log_beta_and_log_posterior_beta_at_t0(name):
    """Ho et al. 2020 Sec. 3.2 σ_t² = β_t for t ≥ 1; at t = 0 the IDDPM release's β̃_1."""
    d, betas = SCHEDULES[name]()
    T = len(betas)
    assert d.num_timesteps == T
    x = torch.randn(T, 2, dtype=F64)
    t = torch.arange(T)
    got = d.p_mean_variance(torch.zeros_like(x), x, t)["log_variance"]
    assert got.shape == x.shape
    expected = fixed_large_ref(betas).log().view(-1, 1).expand_as(x)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), (got - expected).abs().max()
    # and it is not the fixed-small variance: β̃_t < β_t strictly for t ≥ 1 (here by ≥ 2x at t = 1)
    assert posterior_var(betas, 1) < 0.5 * betas[1]
    assert float(got[1, 0]) == pytest.approx(math.log(betas[1]), abs=1e-12)


def ddpm_mean(x_t: torch.Tensor, eps: float, beta: float, alpha_bar: float) -> torch.Tensor:
    """Ho et al. Eq. 11: μ = (x_t − β_t / √(1 − ᾱ_t) · ε) / √α_t."""
    return (x_t - beta / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(1 - beta)


def run_and_record(d: GaussianDiffusion, x_T: torch.Tensor, eps: float, temperature: float, seed: int):
    """Sample with a model predicting a constant ε; return the (t, x_t) it was called with and x_0."""
    calls = []

    def model(x, t):
        calls.append((t.clone(), x.clone()))
        return torch.full_like(x, eps)

    out = d.p_sample_loop(model, x_T, generator=torch.Generator().manual_seed(seed), temperature=temperature)
    return calls, out


@pytest.mark.parametrize("variance", ["fixed-large", "fixed-small"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_each_sampling_step_adds_noise_with_std_sigma_times_temperature(variance, temperature):
    """Algorithm 2 of Ho et al. with MAR's temperature: x_{t−1} − μ_θ(x_t) ~ N(0, (σ_t τ)²) for t ≥ 1,
    σ_t² = β_t (fixed-large) or β̃_t (fixed-small); no noise at t = 0."""
    T = 40  # linear schedule scaled to T = 40: β from 0.0025 to 0.5
    betas = linear_betas_ref(T)
    ab = alpha_bars(betas)
    d = GaussianDiffusion.from_schedule("linear", T, variance=variance)
    eps = 0.3
    x_T = torch.full((4000, 8), 0.7, dtype=F64)  # one fixed x_T, 32000 noise draws per step
    calls, x0 = run_and_record(d, x_T, eps, temperature, seed=11)
    assert [int(t[0]) for t, _ in calls] == list(range(T - 1, -1, -1))
    assert torch.equal(calls[0][1], x_T)
    for (t, x_t), (_, x_prev) in zip(calls[:-1], calls[1:]):
        i = int(t[0])
        sigma = math.sqrt(betas[i] if variance == "fixed-large" else posterior_var(betas, i))
        z = (x_prev - ddpm_mean(x_t, eps, betas[i], ab[i])) / (sigma * temperature)
        assert abs(float(z.mean())) < 0.03, (i, float(z.mean()))
        assert abs(float(z.std()) - 1) < 0.03, (i, float(z.std()))
    # t = 0: x_0 is the mean itself, no noise
    t_last, x_1 = calls[-1]
    assert int(t_last[0]) == 0
    assert torch.allclose(x0, ddpm_mean(x_1, eps, betas[0], ab[0]), rtol=1e-12, atol=1e-12)


def test_zero_temperature_is_the_deterministic_mean_path():
    """τ = 0: every step is x_{t−1} = μ_θ(x_t, t) (Ho et al. Eq. 11) exactly, whatever the generator."""
    T = 40
    betas = linear_betas_ref(T)
    ab = alpha_bars(betas)
    d = GaussianDiffusion.from_schedule("linear", T, variance="fixed-large")
    x_T = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    calls, x0 = run_and_record(d, x_T, -0.2, 0.0, seed=3)
    x = x_T
    for i in range(T - 1, -1, -1):
        x = ddpm_mean(x, -0.2, betas[i], ab[i])
    assert torch.allclose(x0, x, rtol=1e-10, atol=1e-10)
    _, other = run_and_record(d, x_T, -0.2, 0.0, seed=4)
    assert torch.equal(other, x0)


@pytest.mark.parametrize("variance", ["fixed-large", "fixed-small", "learned"])
def test_a_one_step_sampler_takes_the_mean_step_for_every_variance(variance):
    """Respaced to one step (``generate --steps 1``), the process's only step is t = 0: x_0 = μ_θ(x_T)
    with no noise (Ho et al. Algorithm 2), whatever the variance. fixed-large used to find no β̃_1
    to put at t = 0 and failed with an IndexError."""
    d = GaussianDiffusion.from_schedule("linear", 1000, variance=variance).respaced(1)
    beta = 1 - alpha_bars(linear_betas_ref(1000))[-1]  # the one kept step spans the whole schedule
    x_T = torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    steps = []

    def model(x, t):  # a constant ε, and for a learned variance v = 0 stacked after it (unused at t = 0)
        steps.append(t.tolist())
        eps = torch.full_like(x, 0.3)
        return torch.cat([eps, torch.zeros_like(x)], -1) if variance == "learned" else eps

    out = d.p_sample_loop(model, x_T, generator=torch.Generator().manual_seed(0))
    assert steps == [[999, 999]]  # one call, at the original step the kept one stands for
    assert torch.allclose(out, ddpm_mean(x_T, 0.3, beta, 1 - beta), rtol=1e-9, atol=1e-9)
