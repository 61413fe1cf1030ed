"""SiT interpolants, velocity targets and the ODE / SDE samplers against exact Gaussian answers."""

import pytest
import torch

from softvq.generation.transport import Interpolant, sample_ode, sample_sde, velocity_loss


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_velocity_target_is_time_derivative_of_interpolant(kind):
    path = Interpolant(kind)
    x, eps = torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=torch.float64)
    h = 1e-6
    plus, _ = path.sample(x, eps, t + h)
    minus, _ = path.sample(x, eps, t - h)
    _, target = path.sample(x, eps, t)
    assert torch.allclose((plus - minus) / (2 * h), target, atol=1e-7)
    # boundary conditions: t = 0 is data, t = 1 is noise
    at0, _ = path.sample(x, eps, torch.zeros(4, dtype=torch.float64))
    at1, _ = path.sample(x, eps, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(at0, x) and torch.allclose(at1, eps, atol=1e-12)


def gaussian_velocity(path, mu, s):
    """Exact E[α'x + σ'ε | x_t] for data N(mu, s²): x_t is jointly Gaussian with x and ε."""
    def v(x_t, t):
        a, sg, da, dsg = (c.view(-1, 1) for c in path.coefficients(t.to(torch.float64)))
        var = a**2 * s**2 + sg**2
        return (da * mu + (da * a * s**2 + dsg * sg) / var * (x_t.double() - a * mu)).to(x_t.dtype)
    return v


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("method,steps,tol", [("euler", 200, 2e-2), ("heun", 100, 2e-3)])
def test_ode_with_exact_velocity_transports_noise_to_the_gaussian(kind, method, steps, tol):
    path = Interpolant(kind)
    mu, s = 1.5, 0.5
    noise = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = sample_ode(gaussian_velocity(path, mu, s), noise, steps=steps, method=method)
    # the exact flow of a Gaussian is the monotone affine map ε -> mu + s ε
    assert (x0 - (mu + s * noise)).abs().max() < tol
    assert abs(x0.mean() - noise.mean() * s - mu) < tol and abs(x0.std() / noise.std() - s) < tol


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("diffusion", ["2t", "sigma"])
def test_sde_with_exact_velocity_reaches_the_gaussian(kind, diffusion):
    path = Interpolant(kind)
    mu, s = -0.7, 0.4
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    x0 = sample_sde(gaussian_velocity(path, mu, s), noise, path, steps=250, diffusion=diffusion, generator=g)
    assert abs(float(x0.mean()) - mu) < 0.02
    assert abs(float(x0.std()) - s) < 0.02


def test_score_from_velocity_matches_gaussian_score():
    for kind in ("linear", "cosine"):
        path = Interpolant(kind)
        mu, s = 0.3, 0.8
        x_t = torch.randn(6, 1, dtype=torch.float64)
        t = torch.linspace(0.05, 1.0, 6, dtype=torch.float64)
        v = gaussian_velocity(path, mu, s)(x_t, t)
        a, sg, _, _ = (c.view(-1, 1) for c in path.coefficients(t))
        exact = -(x_t - a * mu) / (a**2 * s**2 + sg**2)
        assert torch.allclose(path.score_from_velocity(v, x_t, t), exact, atol=1e-9)


def test_velocity_loss_is_zero_only_for_the_true_target():
    path = Interpolant("linear")
    x = torch.randn(8, 4, 3)
    g = torch.Generator().manual_seed(0)
    # a "model" that knows x and the noise reproduces the target exactly
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    loss = velocity_loss(lambda x_t, t: noise - x, x, path, generator=g)
    assert loss.shape == (8,) and float(loss.max()) < 1e-10
    wrong = velocity_loss(lambda x_t, t: torch.zeros_like(x_t), x, path, generator=torch.Generator().manual_seed(0))
    # the squared error averaged, not summed, over each sample's tokens and channels (SiT's mean_flat)
    torch.testing.assert_close(wrong, ((noise - x) ** 2).flatten(1).mean(1))


def test_sde_draws_noise_on_every_step_but_the_last_mean_step(monkeypatch):
    """The release's SDE ends with a deterministic drift step from t_last to 0: noise there would
    widen every sample by √(w·t_last)."""
    import softvq.generation.transport as transport

    draws = []
    real = transport.standard_normal
    monkeypatch.setattr(transport, "standard_normal", lambda *a, **k: draws.append(1) or real(*a, **k))
    path = Interpolant("linear")
    sample_sde(gaussian_velocity(path, 0.0, 1.0), torch.randn(5, 1, dtype=torch.float64), path, steps=7)
    assert len(draws) == 6


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="interpolant"):
        Interpolant("vp")
    with pytest.raises(ValueError, match="ODE method"):
        sample_ode(lambda x, t: x, torch.zeros(1, 1), method="rk4")
