"""Product (B.3 Eq. 12), residual (Eq. 13), R-PQ, the release's segment codebooks, and the factory."""

import math

import pytest
import torch
import torch.nn.functional as F

from softvq.bottlenecks.factory import bottleneck_losses, build_bottleneck
from softvq.bottlenecks.gaussian import GaussianPosterior
from softvq.bottlenecks.identity import Identity
from softvq.bottlenecks.lfq import GroupedLookupFree
from softvq.bottlenecks.product import ProductQuantizer
from softvq.bottlenecks.residual import ResidualQuantizer
from softvq.bottlenecks.segments import SegmentCodebooks
from softvq.bottlenecks.softvq import SoftVQ
from softvq.bottlenecks.vq import VQ
from softvq.config import BottleneckConfig

D, K = 8, 16


def build(**kw):
    torch.manual_seed(0)
    return build_bottleneck(BottleneckConfig(**{"latent_dim": D, "codebook_size": K, **kw}))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_product_quantizer_shapes_parameters_and_groupwise_latents(groups):
    pq = build(groups=groups, temperature=0.2)
    assert n_params(pq) == groups * K * (D // groups)  # G codebooks of K x D/G (Eq. 12)
    z = torch.randn(2, 5, D)
    with torch.no_grad():
        out = pq(z)
    assert out.latents.shape == (2, 5, D)
    if groups == 1:
        assert isinstance(pq, SoftVQ)
        return
    assert out.indices.shape == (2, 5, groups) and out.probs.shape == (2, 5, groups, K)
    # z = [z^(1), ..., z^(G)]: group g is its own SoftVQ over its channel slice.
    d = D // groups
    for g, part in enumerate(pq.parts):
        with torch.no_grad():
            alone = part(z[..., g * d:(g + 1) * d])
        assert torch.allclose(out.latents[..., g * d:(g + 1) * d], alone.latents)
        assert torch.equal(out.indices[..., g], alone.indices)


@pytest.mark.parametrize("levels", [2, 3])
def test_residual_quantizer_follows_eq13(levels):
    rq = build(residual_levels=levels, temperature=0.2)
    assert isinstance(rq, ResidualQuantizer) and n_params(rq) == levels * K * D
    z = torch.randn(2, 5, D)
    with torch.no_grad():
        out = rq(z)
        residual, total = z, torch.zeros_like(z)
        for level in rq.levels:  # r_l = r_{l-1} - Q_l(r_{l-1}); z_l = z_{l-1} + Q_l(r_{l-1})
            q = level(residual).latents
            total, residual = total + q, residual - q
    assert out.latents.shape == (2, 5, D) and out.indices.shape == (2, 5, levels)
    assert torch.allclose(out.latents, total, atol=1e-6)
    assert torch.allclose(z - out.latents, residual, atol=1e-6)


def test_residual_levels_reduce_the_error_of_a_fine_codebook():
    torch.manual_seed(1)
    cfg = dict(kind="vq", latent_dim=2, codebook_size=64)
    one = build_bottleneck(BottleneckConfig(**cfg))
    three = build_bottleneck(BottleneckConfig(**cfg, residual_levels=3))
    three.levels[0].codebook.data.copy_(one.codebook.data)
    for level in list(three.levels)[1:]:  # later levels hold small corrections
        level.codebook.data.mul_(0.1)
    z = torch.randn(500, 1, 2)
    err = lambda m: (m(z).latents - z).pow(2).sum(-1).mean()
    assert err(three) < err(one)


def test_r_pq_composes_residual_of_product():
    rpq = build(groups=4, residual_levels=2, temperature=0.2)
    assert isinstance(rpq, ResidualQuantizer)
    assert all(isinstance(level, ProductQuantizer) and level.groups == 4 for level in rpq.levels)
    assert n_params(rpq) == 2 * 4 * K * (D // 4)
    z = torch.randn(2, 5, D, requires_grad=True)
    out = rpq(z)
    assert out.latents.shape == (2, 5, D) and out.indices.shape == (2, 5, 8)
    (out.latents.sum() + out.losses["kl"]).backward()
    assert all(level.parts[g].codebook.grad is not None for level in rpq.levels for g in range(4))


def test_side_channels_are_routed_per_group_and_level():
    gmm_pq = build(kind="gmmvq", groups=2)
    assert gmm_pq.input_dim == D + 2  # one ω channel per group
    z = torch.randn(1, 3, D + 2)
    with torch.no_grad():
        out = gmm_pq(z)
        g1 = gmm_pq.parts[1](torch.cat([z[..., 4:8], z[..., 9:10]], -1))
    assert torch.allclose(out.latents[..., 4:], g1.latents)
    assert build(kind="gmmvq", groups=2, residual_levels=3).input_dim == D + 6
    assert build(kind="kl", groups=2).input_dim == 2 * D


def test_losses_sum_over_groups_so_grouping_preserves_the_gaussian_kl():
    z = torch.randn(3, 4, 2 * D)
    whole = GaussianPosterior(D).eval()(z).losses["kl"]
    grouped = build(kind="kl", groups=4).eval()
    mean, logvar = z[..., :D], z[..., D:]
    assert math.isclose(grouped(torch.cat([mean, logvar], -1)).losses["kl"].item(), whole.item(), rel_tol=1e-5)


def test_segments_split_the_sequence_and_pool_the_entropy_like_the_release():
    seg = build(segments=4, distance="cosine", detach_codebook_in_logits=True, entropy_temperature=0.01)
    assert isinstance(seg, SegmentCodebooks) and n_params(seg) == 4 * K * D
    z = torch.randn(2, 8, D)
    with torch.no_grad():
        out = seg(z)
    books = [F.normalize(p.codebook, dim=-1) for p in seg.parts]
    x = F.normalize(z, dim=-1)
    for i, book in enumerate(books):  # tokens 2i, 2i+1 use codebook i
        block = x[:, 2 * i:2 * i + 2]
        expected = torch.softmax(block @ book.t() / 0.07, -1) @ book
        assert torch.allclose(out.latents[:, 2 * i:2 * i + 2], expected, atol=1e-5)
    # The release flattens all segments' (cosine) logits into one batch for its entropy loss.
    logits = torch.cat([(x[:, 2 * i:2 * i + 2] @ b.t()).reshape(-1, K) for i, b in enumerate(books)])
    q = torch.softmax(logits.double() / 0.01, -1)
    h = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)
    assert math.isclose(out.losses["kl"].item(), (h(q).mean() - h(q.mean(0))).item(), rel_tol=1e-4, abs_tol=1e-5)
    per_segment = build(segments=4, segment_entropy="per_segment", distance="cosine",
                        detach_codebook_in_logits=True, entropy_temperature=0.01)
    with torch.no_grad():
        separate = per_segment(z).losses["kl"]
    qs = q.reshape(4, -1, K)
    expected = torch.stack([h(qi).mean() - h(qi.mean(0)) for qi in qs]).mean()
    assert math.isclose(separate.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("make, error, match", [
    (lambda: VQ(8, 0), ValueError, "codebook_size must be at least 1, got 0"),  # was a ZeroDivisionError in forward
    (lambda: VQ(-1, 16), ValueError, "latent_dim must be at least 1"),  # was a torch "negative dimension"
    (lambda: SoftVQ(8.0, 16), TypeError, "latent_dim must be an int, got 8.0"),  # was inside torch.randn
    (lambda: SoftVQ(8, 16, temperature=float("nan")), ValueError, "temperature must be a positive finite"),
    (lambda: GaussianPosterior(0), ValueError, "latent_dim must be at least 1"),
    (lambda: Identity(-1), ValueError, "latent_dim must be at least 1"),
    (lambda: GroupedLookupFree(8, entropy_temperature=0.0), ValueError, "entropy_temperature must be a positive"),
    (lambda: Identity(8)(torch.randn(2, 4, 5)), ValueError, r"Identity expects inputs \(\.\.\., 8\)"),
])
def test_bottleneck_classes_name_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_segments_reject_token_counts_that_do_not_split():
    with pytest.raises(ValueError, match="divisible by 4"):
        build(segments=4)(torch.randn(1, 6, D))


@pytest.mark.parametrize("bad, match", [
    (dict(groups=3), "not divisible by bottleneck.groups"),
    (dict(kind="lfq", lfq_groups=3), "lfq_groups=3"),
    (dict(segments=2, groups=2), "per_segment"),
    (dict(kind="gmmvq", learnable_temperature=True), "learnable_temperature"),
    (dict(residual_levels=0), "at least 1"),
    (dict(kind="vq", codebook_size=-1), "codebook_size must be at least 1, got -1"),  # was a torch shape error
    (dict(temperature=0.0), "temperature must be a positive finite number, got 0.0"),
    (dict(temperature=float("nan")), "temperature must be a positive finite number, got nan"),
    # each of these used to pass and then skip every training step, or fail mid-forward
    (dict(kind="lfq", lfq_groups=2, entropy_temperature=0.0), "entropy_temperature must be a positive"),
    (dict(chunk_size=-1), r"chunk_size must be None \(auto\), 0"),
    (dict(kind="vq", commitment_weight=-1.0), "commitment_weight must be 0 or more"),
    (dict(kind="lfq", latent_dim=32), "2\\^32 codes per group"),
    (dict(kind="kl", latent_dim=0), "latent_dim must be at least 1"),
    (dict(kind="lfq", lfq_groups=0), "lfq_groups must be at least 1"),
    (dict(kind="lfq", residual_levels=2), r"kind='lfq' cancels itself \(each level codes ±1"),
    # SoftVQ's opt-in VQ losses (supp. Tab. 5) would do nothing on another kind
    (dict(kind="vq", codebook_loss=True), "kind 'vq' always returns it; set bottleneck.codebook_loss=false"),
    (dict(kind="ae", commit_loss=True), "kind 'ae' has no such loss; set bottleneck.commit_loss=false"),
])
def test_factory_rejects_bad_compositions_with_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        build(**bad)


@pytest.mark.parametrize("kind", ["softvq", "gmmvq", "vq", "kl", "lfq", "ae"])
def test_every_kind_composes_with_product_residual_and_segments(kind):
    levels = 1 if kind == "lfq" else 2  # residual LFQ cancels itself and is refused (above)
    b = build(kind=kind, groups=2, residual_levels=levels, segments=2, segment_entropy="per_segment", lfq_groups=2)
    z = torch.randn(2, 4, b.input_dim, requires_grad=True)
    out = b(z)
    assert out.latents.shape == (2, 4, D) and out.latents.dtype == torch.float32
    loss = out.latents.pow(2).sum() + sum(out.losses.values(), torch.zeros(()))
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("kind, options", [
    ("softvq", {}), ("softvq", dict(codebook_loss=True)), ("softvq", dict(commit_loss=True)),
    ("gmmvq", dict(codebook_loss=True, commit_loss=True)), ("vq", {}), ("kl", {}), ("lfq", {}), ("ae", {}),
])
@pytest.mark.parametrize("layout", [{}, dict(segments=2), dict(groups=2, residual_levels=2, segments=2,
                                                               segment_entropy="per_segment")])
def test_bottleneck_losses_names_exactly_what_the_built_bottleneck_returns(kind, options, layout):
    # what the training config checks loss weights against (a weight for any other name is a no-op)
    if kind == "lfq":
        layout = {**layout, "residual_levels": 1, "lfq_groups": 2}
    cfg = BottleneckConfig(**{"latent_dim": D, "codebook_size": K, "kind": kind, **options, **layout})
    b = build_bottleneck(cfg)
    assert set(b(torch.randn(2, 4, b.input_dim)).losses) == set(bottleneck_losses(cfg))


@pytest.mark.parametrize("composite, noun", [(ProductQuantizer, "group"), (ResidualQuantizer, "level"),
                                             (SegmentCodebooks, "segment")])
def test_composites_name_parts_that_do_not_fit_together(composite, noun):
    with pytest.raises(ValueError, match=f"{composite.__name__} needs at least one {noun}"):
        composite([])
    # Different latent widths, and for the Gaussian a side channel the others lack.
    for parts in ([SoftVQ(4, K), SoftVQ(8, K)], [SoftVQ(4, K), GaussianPosterior(4)]):
        with pytest.raises(ValueError, match=f"all {noun}s of a {composite.__name__} must have the same widths"):
            composite(parts)


@pytest.mark.parametrize("kind", ["softvq", "gmmvq", "vq", "kl", "lfq", "ae"])
@pytest.mark.parametrize("layout", [{}, dict(segments=2), dict(groups=2, residual_levels=2, lfq_groups=2)])
@pytest.mark.parametrize("chunk_size", [None, 0, 3])  # auto, straightforward, three tokens per chunk
def test_latents_alone_equal_the_forward_latents(kind, layout, chunk_size):
    # The release's cosine distance and entropy temperature for the soft kinds: the path whose
    # second softmax latents() skips.
    soft = dict(distance="cosine", entropy_temperature=0.01) if kind in ("softvq", "gmmvq") else {}
    if kind == "lfq" and "residual_levels" in layout:  # residual LFQ is refused: product and groups only
        layout = {**layout, "residual_levels": 1}
    b = build(kind=kind, chunk_size=chunk_size, segment_entropy="per_segment", **layout, **soft).eval()
    z = torch.randn(2, 8, b.input_dim)
    with torch.inference_mode():
        assert torch.equal(b.latents(z), b(z).latents)
    z.requires_grad_()  # recording gradients: the forward's latents, differentiable
    latents = b.latents(z)
    assert torch.equal(latents, b(z).latents)
    latents.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["softvq", "gmmvq", "vq", "kl", "lfq", "ae"])
@pytest.mark.parametrize("layout", [{}, dict(groups=2, residual_levels=2, segments=2, lfq_groups=2)])
def test_float64_inputs_and_float32_weights_meet_in_float64(kind, layout):
    # A float64 input used to meet a float32 codebook in a matmul dtype error; it now computes in
    # float64, exactly as the same bottleneck in float64 does (float32 weights widen exactly).
    if kind == "lfq":
        layout = {**layout, "residual_levels": 1}
    b = build(kind=kind, segment_entropy="per_segment", **layout).eval()
    wide = build(kind=kind, segment_entropy="per_segment", **layout).eval()
    wide.load_state_dict(b.state_dict())
    wide.double()
    z = torch.randn(2, 8, b.input_dim, dtype=torch.float64)
    out, ref = b(z), wide(z)
    assert out.latents.dtype == torch.float64
    torch.testing.assert_close(out.latents, ref.latents, rtol=1e-12, atol=1e-12)
    assert out.latents.dtype == b.latents(z).dtype
    # and the other way round: a float64 codebook reads float32 inputs in float64
    if kind in ("softvq", "gmmvq", "vq"):
        assert wide(z.float()).latents.dtype == torch.float64


def test_the_package_exports_every_bottleneck_the_factory_builds():
    import softvq.bottlenecks as package

    built = {type(build(kind=kind, **layout)) for kind in ("softvq", "gmmvq", "vq", "kl", "lfq", "ae")
             for layout in ({}, dict(groups=2), dict(segments=2))}
    built.add(type(build(kind="softvq", residual_levels=2)))
    exported = {getattr(package, name) for name in package.__all__}
    assert built <= exported, built - exported  # a user imports from softvq.bottlenecks, not its modules
    assert all(issubclass(cls, package.Bottleneck) for cls in exported if isinstance(cls, type)
               and cls is not package.BottleneckOutput)


@pytest.mark.parametrize("options", [
    {"kind": "vq"}, {"kind": "vq", "distance": "cosine"}, {"kind": "lfq"}, {"kind": "lfq", "lfq_groups": 4},
    {"kind": "vq", "groups": 2}, {"kind": "lfq", "lfq_groups": 2, "groups": 2}, {"kind": "vq", "residual_levels": 3},
    {"kind": "vq", "groups": 2, "residual_levels": 2}, {"kind": "vq", "segments": 2},
    {"kind": "lfq", "lfq_groups": 2, "segments": 2},
])
def test_a_hard_quantizers_indices_give_back_its_latents(options):
    """For an autoregressive model on the codes: indices -> the codewords they name, whatever the
    composition (groups concatenate code columns, levels add, segments split the sequence)."""
    b = build(**options)
    out = b(torch.randn(3, 6, b.input_dim))
    width = b.codes_per_token
    assert out.indices.shape == ((3, 6) if not b.indices_have_code_axis else (3, 6, width))
    rebuilt = b.indices_to_latents(out.indices)
    # equal but for the straight-through sum's rounding, z + (c - z)
    torch.testing.assert_close(rebuilt, out.latents.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(b.indices_to_latents(out.indices.roll(1, dims=1)), rebuilt)  # the indices are read
    with pytest.raises(ValueError, match=r"indices must lie in \[0, "):
        b.indices_to_latents(out.indices + b.codebook_size)
    with pytest.raises(TypeError, match="integer torch.Tensor"):
        b.indices_to_latents(out.indices.float())
    if b.indices_have_code_axis:
        with pytest.raises(ValueError, match=rf"indices are \(tokens\.\.\., {width}\), got \(3, 6, {width + 1}\)"):
            b.indices_to_latents(torch.cat([out.indices, out.indices[..., :1]], dim=-1))


@pytest.mark.parametrize("options", [{"kind": "softvq"}, {"kind": "gmmvq"}, {"kind": "kl"}, {"kind": "ae"},
                                     {"kind": "softvq", "groups": 2}, {"kind": "softvq", "segments": 2}])
def test_indices_that_do_not_determine_the_latents_are_refused_with_the_reason(options):
    b = build(**options)
    assert b.codes_per_token is None
    with pytest.raises(TypeError, match="indices do not determine its latents .* keep and decode the latents"):
        b.indices_to_latents(torch.zeros(2, 4, dtype=torch.long))


def test_empty_inputs_are_refused_instead_of_nan_losses():
    for options in ({"kind": "softvq"}, {"kind": "vq"}, {"kind": "lfq"}, {"kind": "kl"}):
        b = build(**options)
        for shape in ((0, 4, b.input_dim), (2, 0, b.input_dim)):
            with pytest.raises(ValueError, match="no tokens"):
                b(torch.randn(shape))


def test_pooled_segment_regulariser_has_the_gradient_of_the_release_formula():
    """The release's pooled H(q) − H(E q) over all segments' tokens, differentiated in float64 as
    written (the value alone is checked elsewhere, without gradients)."""
    torch.manual_seed(0)
    seg = build_bottleneck(BottleneckConfig(kind="softvq", latent_dim=8, codebook_size=16, segments=4,
                                            distance="cosine", detach_codebook_in_logits=True,
                                            entropy_temperature=0.5))  # not saturated: every term has a gradient
    z = torch.randn(2, 8, 8, requires_grad=True)
    grad, = torch.autograd.grad(seg(z).losses["kl"], z)
    z64 = z.detach().double().requires_grad_()
    x = F.normalize(z64, dim=-1)
    books = [F.normalize(part.codebook.detach().double(), dim=-1) for part in seg.parts]
    logits = torch.cat([(x[:, 2 * i:2 * i + 2] @ book.t()).reshape(-1, 16) for i, book in enumerate(books)])
    q = torch.softmax(logits / 0.5, -1)
    h = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)
    reference, = torch.autograd.grad(h(q).mean() - h(q.mean(0)), z64)
    torch.testing.assert_close(grad.double(), reference, rtol=1e-4, atol=1e-6)
