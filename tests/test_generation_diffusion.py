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
    # IDDPM's round(i · 999/249), in exact arithmetic (no i lands on a half, where rounding modes differ)
    from fractions import Fraction

    exact = [int(Fraction(999 * i, 249) + Fraction(1, 2)) for i in range(250)]
    assert keep == exact and keep[100:103] == [401, 405, 409]
    r = d.respaced(250)
    assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[keep], rtol=1e-12)
    assert r.timestep_map.tolist() == keep
    twice = r.respaced(10)  # respacing a respaced process maps back to original steps
    assert torch.allclose(twice.alphas_cumprod, d.alphas_cumprod[twice.timestep_map], rtol=1e-12)


def test_one_step_sampling_predicts_x0_in_one_call():
    # `generate --steps 1` on a DiT failed inside torch: a one-step process has no β̃_1 to clip β̃_0 to
    d = GaussianDiffusion.from_schedule("cosine", 1000, variance="learned", channel_dim=-1).respaced(1)
    assert d.timestep_map.tolist() == [999] and bool(torch.isfinite(d.posterior_log_variance_clipped).all())
    noise = torch.randn(2, 3, 4, dtype=torch.float64)
    calls = []

    def model(x, t):  # ε = 0 and the middle of the learned σ range: x̂_0 = x_t / sqrt(ᾱ)
        calls.append(t.tolist())
        return torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)

    x0 = d.p_sample_loop(model, noise)
    assert calls == [[999, 999]]
    assert torch.allclose(x0, noise / d.alphas_cumprod[0].sqrt(), rtol=1e-12)
    assert bool(torch.isfinite(GaussianDiffusion.from_schedule("linear", 1).posterior_log_variance_clipped).all())


def test_sigma_learned_interpolates_between_posterior_and_beta():
    d = GaussianDiffusion.from_schedule("linear", 1000, variance="learned", channel_dim=-1)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([5, 500])
    for v, target in ((-1.0, d.posterior_log_variance_clipped), (1.0, d.betas.log())):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=-1)
        got = d.p_mean_variance(out, x, t)["log_variance"]
        assert torch.allclose(got, target[t].view(-1, 1, 1).expand_as(x))


def test_hybrid_loss_terms_and_vlb_trains_only_the_variance():
    from torch.distributions import Normal, kl_divergence

    d = GaussianDiffusion.from_schedule("cosine", 1000, variance="learned", channel_dim=-1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 2, generator=g, dtype=torch.float64) * 1.8 - 0.9  # inside the open outer bins
    noise = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    eps_out = noise + 0.3 * torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    v = torch.rand(4, 3, 2, generator=g, dtype=torch.float64) * 2 - 1
    raw = torch.cat([eps_out, v], -1).requires_grad_()
    t = torch.tensor([0, 3, 400, 999])
    seen = []

    def model(x_t, steps):
        seen.append((x_t.detach(), steps))
        return raw * 1.0

    terms = d.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"mse", "vb", "loss"} and bool((terms["vb"] >= 0).all())

    # Independently, in float64: x_t, the true posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7),
    # the model's p(x_{t-1} | x_t) from x̂_0 = (x_t - √(1-ᾱ) ε_θ)/√ᾱ and log σ² = f log β + (1-f) log β̃
    # with f = (v+1)/2 (IDDPM Eq. 15), and the KL between them averaged over the dims, in bits.
    ab, ab_prev = (a[t].view(-1, 1, 1) for a in (d.alphas_cumprod, torch.cat([torch.ones(1, dtype=torch.float64),
                                                                           d.alphas_cumprod[:-1]])))
    beta = 1 - ab / ab_prev
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    assert torch.equal(seen[0][1], t) and torch.allclose(seen[0][0], x_t, rtol=1e-12, atol=1e-12)
    tilde = (1 - ab_prev) * beta / (1 - ab)  # β̃_t; β̃_0 = 0, whose log IDDPM replaces by β̃_1's
    tilde_clipped = torch.where(t.view(-1, 1, 1) == 0, d.posterior_variance[1], tilde)

    def posterior_mean(start):  # DDPM Eq. 7 (at t = 0: start itself)
        return (beta * ab_prev.sqrt() * start + (1 - ab_prev) * (1 - beta).sqrt() * x_t) / (1 - ab)

    pred_x0 = (x_t - (1 - ab).sqrt() * eps_out) / ab.sqrt()
    frac = (v + 1) / 2
    p_std = torch.exp(0.5 * (frac * beta.log() + (1 - frac) * tilde_clipped.log()))
    p_mean = posterior_mean(pred_x0)
    kl = kl_divergence(Normal(posterior_mean(x0)[1:], tilde[1:].sqrt()), Normal(p_mean[1:], p_std[1:]))
    torch.testing.assert_close(terms["vb"][1:], kl.flatten(1).mean(1) / math.log(2), rtol=1e-9, atol=1e-12)
    # t = 0: the decoder NLL, -log of the Gaussian's mass on the 8-bit bin [x - 1/255, x + 1/255]
    p0 = Normal(p_mean[0], p_std[0])
    nll = -torch.log(p0.cdf(x0[0] + 1 / 255) - p0.cdf(x0[0] - 1 / 255))
    torch.testing.assert_close(terms["vb"][0], nll.mean() / math.log(2), rtol=1e-6, atol=1e-9)
    mse = ((noise - eps_out) ** 2).mean(dim=(1, 2))  # per sample, over every token and channel
    torch.testing.assert_close(terms["mse"], mse, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(terms["loss"], mse + terms["vb"], rtol=1e-12, atol=1e-15)
    assert bool((kl.flatten(1).mean(1) > 1e-4).all())  # a non-trivial KL at every t > 0

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
