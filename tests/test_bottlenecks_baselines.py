"""VQ (Eq. 2), KL-VAE (Eq. 1/8), GMMVQ (B.2, Eq. 11) and WeTok's GLFQ (WeTok Eq. 4-9)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from softvq.bottlenecks.gaussian import GaussianPosterior
from softvq.bottlenecks.gmmvq import GMMVQ
from softvq.bottlenecks.lfq import GroupedLookupFree, binary_codes
from softvq.bottlenecks.vq import VQ


# --- VQ ------------------------------------------------------------------------------------

def test_vq_straight_through_encoder_gradient_equals_decoder_input_gradient():
    torch.manual_seed(0)
    vq = VQ(4, 16)
    z = torch.randn(2, 6, 4, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(out.latents)
    (out.latents * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert vq.codebook.grad is None  # the decoder path alone never reaches the codebook


def test_vq_picks_nearest_codeword_and_returns_unweighted_losses():
    torch.manual_seed(1)
    vq = VQ(4, 16)
    z = torch.randn(3, 5, 4)
    out = vq(z)
    flat, book = z.reshape(-1, 4).double(), vq.codebook.double()
    naive = torch.stack([((book - t) ** 2).sum(-1).argmin() for t in flat])
    assert torch.equal(out.indices.reshape(-1), naive)
    assert torch.allclose(out.latents.reshape(-1, 4), vq.codebook[naive])
    sq = ((flat - book[naive]) ** 2).sum(-1).mean()
    assert math.isclose(out.losses["codebook"].item(), sq.item(), rel_tol=1e-5)
    assert math.isclose(out.losses["commit"].item(), sq.item(), rel_tol=1e-5)
    # codebook loss moves only codewords, commit loss only the encoder output (Eq. 2's sg[.]).
    zz = z.clone().requires_grad_()
    vq(zz).losses["codebook"].backward()
    assert zz.grad is None or zz.grad.abs().sum() == 0
    assert vq.codebook.grad.abs().sum() > 0
    counts = torch.bincount(naive, minlength=16).double()
    p = counts / counts.sum()
    assert math.isclose(out.metrics["codebook_perplexity"].item(), math.exp(-(p[p > 0] * p[p > 0].log()).sum()), rel_tol=1e-5)
    assert out.metrics["usage"].item() == (counts > 0).double().mean().item()


# --- KL-VAE ----------------------------------------------------------------------------------

def test_gaussian_kl_matches_torch_distributions_and_eval_uses_the_mean():
    torch.manual_seed(2)
    g = GaussianPosterior(5)
    assert g.input_dim == 10
    z = torch.randn(3, 4, 10)
    mean, logvar = z[..., :5], z[..., 5:]
    out = g.eval()(z)
    assert torch.equal(out.latents, mean)
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    prior = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, prior).sum(-1).mean()  # Eq. 8: sum over D
    assert math.isclose(out.losses["kl"].item(), expected.item(), rel_tol=1e-5)


def test_gaussian_training_samples_with_reparametrisation():
    torch.manual_seed(3)
    g = GaussianPosterior(2).train()
    mean = torch.tensor([1.5, -2.0])
    logvar = torch.tensor([math.log(0.25), math.log(4.0)])
    z = torch.cat([mean, logvar]).expand(20000, 1, 4).clone().requires_grad_()
    out = g(z)
    eps = (out.latents - mean) / (0.5 * logvar).exp()
    assert eps.mean(0).abs().max() < 0.05 and (eps.std(0) - 1).abs().max() < 0.05
    out.latents.sum().backward()  # gradient flows to both mean and log-variance channels
    assert z.grad[..., :2].abs().sum() > 0 and z.grad[..., 2:].abs().sum() > 0


def test_gaussian_logvar_is_clamped():
    """log σ² is clamped to [-30, 20] (latent-diffusion's bounds): the KL is the closed form there."""
    g = GaussianPosterior(1).eval()

    def kl(mu, logvar):  # ½ (μ² + σ² − 1 − log σ²)
        return 0.5 * (mu**2 + math.exp(logvar) - 1 - logvar)

    for mu, raw, bound in ((0.5, 1000.0, 20.0), (-1.0, -1000.0, -30.0)):  # one token beyond each bound
        out = g(torch.tensor([[[mu, raw]]]))
        assert out.losses["kl"].item() == pytest.approx(kl(mu, bound), rel=1e-6)
        assert out.metrics["posterior_std"].item() == pytest.approx(math.exp(bound / 2), rel=1e-6)
    g.train()  # a sample's spread is the clamped σ too: e^10 around the mean
    torch.manual_seed(0)
    draws = g(torch.tensor([[0.0, 1000.0]]).expand(4000, 1, 2)).latents
    assert draws.std().item() == pytest.approx(math.exp(10), rel=0.05)


# --- GMMVQ -----------------------------------------------------------------------------------

def test_gmmvq_posterior_uses_predicted_per_token_weights():
    torch.manual_seed(4)
    gmm = GMMVQ(3, 10, temperature=0.07, chunk_size=0)
    assert gmm.input_dim == 4
    z = torch.randn(2, 5, 4)
    with torch.no_grad():
        out = gmm(z)
    x, raw = z[..., :3].reshape(-1, 3).double(), z[..., 3].reshape(-1).double()
    omega = F.softplus(raw + gmm.weight_offset)
    dist = torch.cdist(x, gmm.codebook.double())  # ‖ẑ − c‖₂, Eq. 11
    q = torch.softmax(-omega[:, None] * dist, -1)
    assert torch.allclose(out.probs.reshape(-1, 10).double(), q, atol=1e-5)
    assert torch.allclose(out.latents.reshape(-1, 3).double(), q @ gmm.codebook.double(), atol=1e-5)
    # A fresh head (raw weight 0) starts at SoftVQ's temperature.
    assert math.isclose(F.softplus(torch.tensor(gmm.weight_offset)).item(), 1 / 0.07, rel_tol=1e-5)


def test_gmmvq_weight_channel_receives_gradient_and_sharpens_posterior():
    torch.manual_seed(5)
    gmm = GMMVQ(3, 10)
    z = torch.randn(1, 1, 4).repeat(1, 2, 1)
    z[0, 1, 3] = 5.0  # larger ω for the second (otherwise identical) token
    with torch.no_grad():
        probs = gmm(z).probs[0]
    assert probs[1].max() > probs[0].max()
    z.requires_grad_()
    out = gmm(z)
    (out.latents.pow(2).sum() + out.losses["kl"]).backward()
    assert z.grad[..., 3].abs().sum() > 0
    with pytest.raises(ValueError, match="learnable_temperature"):
        GMMVQ(3, 10, learnable_temperature=True)


# --- WeTok group-wise lookup-free quantization -------------------------------------------------

def _naive_joint(u, tau):
    """q(c|u) over the full {-1,1}^D codebook, as a plain softmax of −‖u − c‖²/τ (float64)."""
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=u.shape[-1])), dtype=torch.float64)
    return torch.softmax(-torch.cdist(u.double(), codes) ** 2 / tau, -1)


def test_lfq_is_sign_quantization_with_straight_through():
    lfq = GroupedLookupFree(6, groups=2)
    z = torch.randn(2, 3, 6, requires_grad=True)
    out = lfq(z)
    assert torch.equal(out.latents, torch.where(z > 0, 1.0, -1.0))
    upstream = torch.randn_like(out.latents)
    (out.latents * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    # indices decode back to the signs: group k's code row equals the latent's group k.
    codes = binary_codes(3)
    decoded = codes[out.indices].reshape(2, 3, 6)
    assert torch.equal(decoded, out.latents.detach())


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_lfq_entropy_terms_follow_eq7_and_eq9(groups):
    torch.manual_seed(6)
    tau = 0.5
    lfq = GroupedLookupFree(4, groups=groups, entropy_temperature=tau)
    u = torch.randn(1, 30, 4)
    out = lfq(u)
    h = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)
    flat = u.reshape(-1, 4)
    # Eq. 7: the group-wise token entropy is exactly the entropy of the full joint posterior.
    joint = _naive_joint(flat, tau)
    assert math.isclose(out.metrics["token_entropy"].item(), h(joint).mean().item(), rel_tol=1e-5)
    # Eq. 9: sum over groups of the entropy of each group's batch-averaged posterior.
    d = 4 // groups
    group_h = sum(h(_naive_joint(flat[:, k * d:(k + 1) * d], tau).mean(0)) for k in range(groups))
    assert math.isclose(out.metrics["codebook_entropy"].item(), group_h.item(), rel_tol=1e-5)
    if groups == 1:  # plain LFQ: no approximation, H of the full batch posterior
        assert math.isclose(group_h.item(), h(joint.mean(0)).item(), rel_tol=1e-9)
    expected = out.metrics["token_entropy"] - out.metrics["codebook_entropy"]
    assert math.isclose(out.losses["entropy"].item(), expected.item(), rel_tol=1e-5, abs_tol=1e-6)
    sq = (flat - torch.where(flat > 0, 1.0, -1.0)).pow(2).sum(-1).mean()
    assert math.isclose(out.losses["commit"].item(), sq.item(), rel_tol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_lfq_pooled_entropy_is_the_released_gfq_form(groups):
    """The release's GFQ: token entropy averaged over tokens and groups; one codebook entropy of the
    code distribution averaged over tokens and groups together. Reference: each group's posterior
    from the naive float64 softmax over its own {-1,1}^d' codes."""
    torch.manual_seed(7)
    tau, d = 0.5, 4 // groups
    u = torch.randn(2, 15, 4)
    out = GroupedLookupFree(4, groups=groups, entropy_temperature=tau, entropy_form="pooled")(u)
    per_group = GroupedLookupFree(4, groups=groups, entropy_temperature=tau)(u)
    h = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)
    flat = u.reshape(-1, 4)
    posteriors = torch.stack([_naive_joint(flat[:, k * d:(k + 1) * d], tau) for k in range(groups)], 1)  # (T, g, K)
    token = h(posteriors).mean()
    codebook = h(posteriors.mean((0, 1)))
    assert math.isclose(out.metrics["token_entropy"].item(), token.item(), rel_tol=1e-5)
    assert math.isclose(out.metrics["codebook_entropy"].item(), codebook.item(), rel_tol=1e-5)
    assert math.isclose(out.losses["entropy"].item(), (token - codebook).item(), rel_tol=1e-5, abs_tol=1e-6)
    # the token term is the paper's divided by g; at g = 1 the two forms are one
    assert math.isclose(out.metrics["token_entropy"].item() * groups, per_group.metrics["token_entropy"].item(),
                        rel_tol=1e-5)
    if groups == 1:
        assert math.isclose(out.losses["entropy"].item(), per_group.losses["entropy"].item(), rel_tol=1e-6)
    else:  # pooling the groups' codes is not summing their entropies
        assert not math.isclose(out.metrics["codebook_entropy"].item() * groups,
                                per_group.metrics["codebook_entropy"].item(), rel_tol=1e-3)
    assert torch.equal(out.latents, per_group.latents) and torch.equal(out.indices, per_group.indices)


def test_lfq_entropy_form_is_a_config_setting_named_when_wrong():
    from softvq.bottlenecks import build_bottleneck
    from softvq.config import BottleneckConfig

    built = build_bottleneck(BottleneckConfig(kind="lfq", latent_dim=8, lfq_groups=2, lfq_entropy="pooled"))
    assert built.entropy_form == "pooled"
    with pytest.raises(ValueError, match="lfq_entropy must be 'per_group' .* or 'pooled'"):
        build_bottleneck(BottleneckConfig(kind="lfq", latent_dim=8, lfq_groups=2, lfq_entropy="mean"))
    with pytest.raises(ValueError, match="entropy_form must be 'per_group'"):
        GroupedLookupFree(4, entropy_form="sum")


def test_lfq_rejects_groups_that_do_not_fit():
    with pytest.raises(ValueError, match="divide"):
        GroupedLookupFree(6, groups=4)
    with pytest.raises(ValueError, match="raise lfq_groups"):
        GroupedLookupFree(34, groups=2)


@pytest.mark.parametrize("module", [VQ(4, 8), GaussianPosterior(4), GMMVQ(4, 8), GroupedLookupFree(4, groups=2)],
                         ids=["vq", "kl", "gmmvq", "lfq"])
def test_bf16_autocast_leaves_outputs_float32(module):
    module.eval()  # the Gaussian's mean, not a random draw: the two runs must be comparable
    torch.manual_seed(0)
    z = torch.randn(2, 3, module.input_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(z.bfloat16())
    assert out.latents.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    # the same (bf16-rounded) input in plain float32: the bottleneck computes in float32 under
    # autocast, so the values agree to float32 rounding, far inside bf16's 8e-3 (a bf16 computation
    # whose result was merely cast back would not)
    ref = module(z.bfloat16().float())
    torch.testing.assert_close(out.latents, ref.latents, rtol=1e-6, atol=1e-6)
    for name, value in ref.losses.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-6, atol=1e-6)
