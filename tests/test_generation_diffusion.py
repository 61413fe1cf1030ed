"""DiT's Gaussian diffusion against float64 closed forms: q_sample, posterior, respacing, sampling."""

import math

import torch

from softvq.generation.diffusion import GaussianDiffusion, cosine_betas, space_timesteps


def test_cosine_schedule_matches_closed_form_alpha_bar():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    t = torch.arange(1, 1001, dtype=torch.float64)
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    closed = torch.tensor([f(u) / f(0) for u in t.tolist()], dtype=torch.float64)
    unclipped = cosine_betas(1000) < 0.999
    assert torch.allclose(d.alphas_cumprod[unclipped], closed[unclipped], rtol=1e-10)


def test_q_sample_and_posterior_match_bayes_rule():
    d = GaussianDiffusion.from_schedule("cosine", 1000, variance="fixed-small")
    x0, eps, x_t = (torch.randn(5, 3, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([1, 10, 250, 600, 998])
    ab = d.alphas_cumprod[t].view(-1, 1)
    assert torch.allclose(d.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    # x_{t-1} ~ N(√ᾱ_{t-1} x0, 1-ᾱ_{t-1}),  x_t | x_{t-1} ~ N(√α_t x_{t-1}, β_t): Gaussian conditioning
    ab_prev, beta = d.alphas_cumprod[t - 1].view(-1, 1), d.betas[t].view(-1, 1)
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    var = 1 / precision
    mean = var * (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * x_t / beta)
    got_mean, got_var, got_logvar = d.q_posterior(x0, x_t, t)
    assert torch.allclose(got_mean, mean, rtol=1e-9, atol=1e-12)
    assert torch.allclose(got_var, var, rtol=1e-9) and torch.allclose(got_logvar, var.log(), rtol=1e-9)


def test_respacing_keeps_cumulative_alphas():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    keep = space_timesteps(1000, 250)
    assert len(keep) == 250 and keep[0] == 0 and keep[-1] == 999
    r = d.respaced(250)
    assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[keep], rtol=1e-12)
    assert r.timestep_map.tolist() == keep
    twice = r.respaced(10)  # respacing a respaced process maps back to original steps
    assert torch.allclose(twice.alphas_cumprod, d.alphas_cumprod[twice.timestep_map], rtol=1e-12)


def test_learned_sigma_interpolates_between_posterior_and_beta():
    d = GaussianDiffusion.from_schedule("linear", 1000, variance="learned", channel_dim=-1)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([5, 500])
    for v, target in ((-1.0, d.posterior_log_variance_clipped), (1.0, d.betas.log())):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=-1)
        got = d.p_mean_variance(out, x, t)["log_variance"]
        assert torch.allclose(got, target[t].view(-1, 1, 1).expand_as(x))


def test_hybrid_loss_terms_and_vlb_trains_only_the_variance():
    d = GaussianDiffusion.from_schedule("cosine", 1000, variance="learned", channel_dim=-1)
    x0 = torch.randn(4, 3, 2)
    raw = torch.zeros(4, 3, 4, requires_grad=True)
    terms = d.training_losses(lambda x_t, t: raw * 1.0, x0, torch.tensor([0, 3, 400, 999]))
    assert set(terms) == {"mse", "vb", "loss"} and bool((terms["vb"] >= 0).all())
    terms["vb"].sum().backward()
    assert raw.grad[..., :2].abs().sum() == 0 and raw.grad[..., 2:].abs().sum() > 0


def test_ddpm_sampler_with_exact_eps_reaches_the_gaussian():
    mu, s = 0.5, 0.3
    d = GaussianDiffusion.from_schedule("cosine", 1000, variance="fixed-small").respaced(100)
    ab_orig = GaussianDiffusion.from_schedule("cosine", 1000).alphas_cumprod

    def eps(x_t, t):  # E[ε | x_t] for data N(mu, s²)
        ab = ab_orig[t].view(-1, 1).to(x_t.dtype)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    g = torch.Generator().manual_seed(0)
    x = d.p_sample_loop(eps, torch.randn(20000, 1, generator=g, dtype=torch.float64), generator=g)
    assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - s) < 0.02
