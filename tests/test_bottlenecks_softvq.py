"""SoftVQ (paper Eq. 4, B.1) and its memory-lean chunked implementation (issue 5 item 1)."""

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from softvq.bottlenecks.soft_assign import ChunkedSoftAssign, affinity, soft_assign
from softvq.bottlenecks.gmmvq import GMMVQ
from softvq.bottlenecks.softvq import SoftVQ
from softvq.bottlenecks.vq import VQ


def make(distance="l2", chunk_size=None, **kw):
    torch.manual_seed(0)
    return SoftVQ(6, 20, distance=distance, chunk_size=chunk_size, **kw)


def test_gradients_reach_encoder_output_and_codebook_without_straight_through():
    vq = make(temperature=0.5)
    z = torch.randn(2, 5, 6, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(out.latents)
    (out.latents * upstream).sum().backward()
    assert z.grad.abs().sum() > 0 and vq.codebook.grad.abs().sum() > 0
    # A straight-through estimator would copy the decoder-input gradient unchanged.
    assert not torch.allclose(z.grad, upstream, atol=1e-3)
    # The codebook gradient through z = qC alone is q^T g (plus the logits' share).
    vq_detached = make(temperature=0.5, detach_codebook_in_logits=True)
    out = vq_detached(z.detach())
    (out.latents * upstream).sum().backward()
    with torch.no_grad():
        probs = vq_detached(z.detach()).probs.reshape(-1, 20)
    assert torch.allclose(vq_detached.codebook.grad, probs.t() @ upstream.reshape(-1, 6), atol=1e-5)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_regulariser_equals_naive_float64_entropies(distance):
    vq = make(distance, temperature=0.3)
    z = torch.randn(3, 4, 6)
    kl = vq(z).losses["kl"]
    x = z.reshape(-1, 6).double()
    book = vq.codebook.double()
    rows = []
    for token in x:  # one token at a time, straight from Eq. 4
        if distance == "l2":
            logits = -torch.stack([torch.sqrt(((token - c) ** 2).sum()) for c in book]) / 0.3
        else:
            logits = torch.stack([F.normalize(token, dim=0) @ F.normalize(c, dim=0) for c in book]) / 0.3
        rows.append(torch.softmax(logits, 0))
    q = torch.stack(rows)
    h = lambda p: -(p * p.log()).sum(-1)
    expected = h(q).mean() - h(q.mean(0))
    assert math.isclose(kl.item(), expected.item(), rel_tol=1e-5, abs_tol=1e-6)


def naive_posterior(z, book, tau, distance):
    """Eq. 4 in float64, one token and one codeword at a time: q = softmax(-‖z - c‖₂ / τ) (l2, the
    distance not squared) or softmax(ẑ·ĉ / τ) of normalised vectors (cosine)."""
    rows = []
    for token in z.reshape(-1, z.shape[-1]).double():
        if distance == "l2":
            logits = [-math.sqrt(sum((a - b) ** 2 for a, b in zip(token.tolist(), c.tolist()))) / tau
                      for c in book.double()]
        else:
            logits = [float(F.normalize(token, dim=0) @ F.normalize(c, dim=0)) / tau for c in book.double()]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        rows.append([w / sum(weights) for w in weights])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("chunk_size", [0, 4])
def test_latents_and_probs_equal_naive_float64_eq4_at_a_finite_temperature(distance, chunk_size):
    vq = make(distance, chunk_size=chunk_size, temperature=0.3)
    z = torch.randn(2, 5, 6) * 1.5
    q = naive_posterior(z, vq.codebook.detach(), 0.3, distance)
    book = vq.codebook.detach().double()
    expected = q @ (F.normalize(book, dim=-1) if distance == "cosine" else book)  # z = q C (unit rows: cosine)
    assert 0.05 < q.max(-1).values.mean() < 0.95  # a soft posterior: neither uniform nor one-hot
    with torch.no_grad():
        out = vq(z)
    torch.testing.assert_close(out.probs.reshape(-1, 20).double(), q, rtol=0, atol=2e-6)
    torch.testing.assert_close(out.latents.reshape(-1, 6).double(), expected, rtol=0, atol=2e-6)
    assert torch.equal(out.indices.reshape(-1), q.argmax(-1))
    with torch.no_grad():  # the decoder-only path
        torch.testing.assert_close(vq.latents(z).reshape(-1, 6).double(), expected, rtol=0, atol=2e-6)
    lean = vq(z.clone().requires_grad_())  # recording gradients: the memory-lean path's latents
    torch.testing.assert_close(lean.latents.detach().reshape(-1, 6).double(), expected, rtol=0, atol=2e-6)


def test_release_entropy_temperature_is_used_for_the_regulariser_only():
    vq = make("cosine", entropy_temperature=0.01)
    plain = make("cosine")
    z = torch.randn(2, 8, 6)
    a, b = vq(z), plain(z)
    assert torch.allclose(a.latents, b.latents)
    x, c = F.normalize(z.reshape(-1, 6), dim=-1), F.normalize(vq.codebook, dim=-1)
    q = torch.softmax((x @ c.t()).double() / 0.01, -1)
    h = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)
    assert math.isclose(a.losses["kl"].item(), (h(q).mean() - h(q.mean(0))).item(), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_vanishing_temperature_gives_vq_latents(distance):
    torch.manual_seed(1)
    soft = SoftVQ(6, 20, temperature=1e-5, distance=distance)
    hard = VQ(6, 20, distance=distance)
    hard.codebook.data.copy_(soft.codebook.data)
    z = torch.randn(4, 7, 6)
    s, h = soft(z), hard(z)
    assert torch.equal(s.indices, h.indices)
    assert torch.allclose(s.latents, h.latents, atol=1e-5)


def test_learnable_temperature_receives_gradient():
    vq = make(learnable_temperature=True)
    out = vq(torch.randn(2, 5, 6))
    (out.latents.pow(2).sum() + out.losses["kl"]).backward()
    assert vq.log_temperature.grad is not None and vq.log_temperature.grad.abs() > 0


def test_bad_settings_and_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="distance"):
        SoftVQ(4, 8, distance="dot")
    with pytest.raises(ValueError, match="temperature"):
        SoftVQ(4, 8, temperature=0.0)
    with pytest.raises(ValueError, match=r"expects inputs \(\.\.\., 4\)"):
        SoftVQ(4, 8)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        soft_assign(torch.randn(3, 4), torch.randn(8, 4), scale=torch.tensor(1.0), distance="l2", chunk_size=-1)


# --- supplementary Tab. 5: VQ's codebook / commit losses, opt-in ---------------------------------

def _grads(loss, *tensors):
    """d loss / d tensor for each tensor, zeros where the loss does not reach it."""
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def test_vq_losses_are_off_by_default_and_leave_the_rest_unchanged():
    z = torch.randn(2, 5, 6)
    plain = make()(z)
    assert set(plain.losses) == {"kl"}
    both = make(codebook_loss=True, commit_loss=True)(z)  # same seed: same codebook
    assert set(both.losses) == {"kl", "codebook", "commit"}
    assert torch.equal(both.latents, plain.latents) and torch.equal(both.losses["kl"], plain.losses["kl"])


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("chunk_size", [0, 4])
def test_vq_losses_equal_a_naive_float64_computation(distance, chunk_size):
    vq = make(distance, chunk_size=chunk_size, temperature=0.3, codebook_loss=True, commit_loss=True)
    z = (torch.randn(2, 5, 6) * 1.5).requires_grad_()
    out = vq(z)
    # Independent reference: Eq. 4 one token at a time, z = qC, ‖ẑ − z‖² per token, mean over tokens.
    q = naive_posterior(z.detach(), vq.codebook.detach(), 0.3, distance)
    x, book = z.detach().reshape(-1, 6).double(), vq.codebook.detach().double()
    if distance == "cosine":
        x, book = F.normalize(x, dim=-1), F.normalize(book, dim=-1)
    expected = ((x - q @ book) ** 2).sum(-1).mean()
    with torch.no_grad():  # evaluation: no stop-gradient to honour, the same values
        quiet = vq(z)
    for name in ("codebook", "commit"):
        assert math.isclose(out.losses[name].item(), expected.item(), rel_tol=1e-5), name
        assert math.isclose(quiet.losses[name].item(), expected.item(), rel_tol=1e-5), name
    # commit = mean_t ‖ẑ_t − sg[z_t]‖²: its gradient on the (l2) encoder output is 2(ẑ − z)/T
    if distance == "l2":
        g_z, = _grads(out.losses["commit"], z)
        torch.testing.assert_close(g_z.reshape(-1, 6).double(), 2 * (x - q @ book) / x.shape[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_codebook_loss_gradient_equals_autograd_of_the_naive_loss_with_the_encoder_output_fixed(chunk_size):
    vq = make("l2", chunk_size=chunk_size, temperature=0.3, codebook_loss=True)
    z = torch.randn(2, 5, 6) * 1.5
    g_book, = _grads(vq(z).losses["codebook"], vq.codebook)
    book = vq.codebook.detach().double().requires_grad_()
    x = z.reshape(-1, 6).double()
    q = torch.softmax(-torch.cdist(x, book) / 0.3, -1)  # depends on C, not on a parameter of ẑ
    ((x - q @ book) ** 2).sum(-1).mean().backward()
    torch.testing.assert_close(g_book.double(), book.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["softvq", "gmmvq"])
@pytest.mark.parametrize("chunk_size", [0, 4])
def test_codebook_loss_moves_only_the_codebook_and_commit_loss_only_the_encoder(kind, chunk_size):
    torch.manual_seed(0)
    extra = dict(learnable_temperature=True) if kind == "softvq" else {}
    vq = (SoftVQ if kind == "softvq" else GMMVQ)(6, 20, chunk_size=chunk_size, codebook_loss=True, commit_loss=True,
                                                 **extra)
    z = torch.randn(2, 5, vq.input_dim, requires_grad=True)  # GMMVQ: channel 6 is ω's
    params = [p for p in vq.parameters()]  # the codebook, and log τ when learnable
    out = vq(z)
    g_z, g_book, *g_rest = _grads(out.losses["codebook"], z, *params)
    assert g_z.abs().sum() == 0 and g_book.abs().sum() > 0  # Eq. 2: sg[ẑ], the codewords move
    assert all(g.abs().sum() == 0 for g in g_rest)  # nor τ: only the codebook
    g_z, *g_params = _grads(out.losses["commit"], z, *params)
    assert g_z[..., :6].abs().sum() > 0 and all(g.abs().sum() == 0 for g in g_params)  # sg[z]: the encoder moves
    assert g_z[..., 6:].abs().sum() == 0  # ... through ẑ alone, not GMMVQ's ω


# --- the memory-lean path equals the straightforward one -------------------------------------

CASES = [
    dict(distance="l2"),
    dict(distance="cosine", detach_codebook_in_logits=True, entropy_temperature=0.01),
    dict(distance="cosine", learnable_temperature=True),
    dict(distance="l2", learnable_temperature=True, entropy_temperature=0.05),
]


def _run(chunk_size, case, z, upstream):
    torch.manual_seed(0)
    vq = SoftVQ(6, 40, temperature=0.1, chunk_size=chunk_size, **case)
    z = z.clone().requires_grad_()
    out = vq(z)
    ((out.latents * upstream).sum() + 0.3 * out.losses["kl"]).backward()
    grads = [z.grad, vq.codebook.grad]
    if case.get("learnable_temperature"):
        grads.append(vq.log_temperature.grad.reshape(1))
    return [out.latents.detach(), out.losses["kl"].detach().reshape(1), out.indices.float()] + grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_chunked_equals_straightforward_outputs_and_gradients(case):
    torch.manual_seed(2)
    z = torch.randn(5, 13, 6)  # 65 tokens: chunks of 16 leave a ragged last chunk
    upstream = torch.randn(5, 13, 6)
    lean = _run(16, case, z, upstream)
    plain = _run(0, case, z, upstream)
    for a, b in zip(lean, plain):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_chunked_token_entropy_keeps_float32_accuracy_at_the_release_temperature(distance):
    """At τ_H = 0.01 the entropy is small next to |a/τ_H| ~ 100: a float32 formula that subtracts
    two such numbers loses digits (it was off by 3.5e-5 here). Both paths against float64."""
    torch.manual_seed(0)
    x, book = F.normalize(torch.randn(2048, 16), dim=-1), F.normalize(torch.randn(1024, 16), dim=-1)
    exact = soft_assign(x.double(), book.double(), scale=torch.tensor(10.0, dtype=torch.float64),
                        distance=distance, entropy_temperature=0.01, chunk_size=0).token_entropy
    for chunk in (0, 300):
        got = soft_assign(x, book, scale=torch.tensor(10.0), distance=distance, entropy_temperature=0.01,
                          chunk_size=chunk).token_entropy
        assert abs(float(got) - float(exact)) <= 1e-5 * float(exact), chunk


def test_chunked_softmax_of_wide_rows_has_no_subnormal_numbers_and_keeps_float32_values():
    """x86 CPUs compute on subnormal floats through microcode assists: at the release's τ_H = 0.01
    (a range of 200 on cosine affinities) a (128, 8192) softmax took 5x as long as usual. The
    chunked path raises the far tail to probability >= 1e-30, below anything float32 resolves."""
    torch.manual_seed(0)
    x, book = F.normalize(torch.randn(64, 16), dim=-1), F.normalize(torch.randn(4096, 16), dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    plain = torch.softmax(affinity(x, book, "cosine") * 100, -1)
    assert ((plain > 0) & (plain < tiny)).any()  # the plain float32 softmax does have them here
    with torch.no_grad():
        probs = soft_assign(x, book, scale=torch.tensor(100.0), distance="cosine", chunk_size=16).probs
    assert probs.min() >= 1e-30
    kept = plain > 1e-20
    assert torch.equal(probs[kept], plain[kept])  # every probability float32 resolves is unchanged
    assert (probs[~kept] - plain[~kept]).abs().max() < 1e-25


def test_chunked_assignment_passes_gradcheck_with_per_token_scale():
    """Independent of the reference path: finite differences in float64, GMMVQ-style ω."""
    torch.manual_seed(3)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    book = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()

    def f(x, book, scale):
        lat, h, post, *_ = ChunkedSoftAssign.apply(x, book, book, scale, "l2", 0.7, 3, False)
        return lat, h, post

    assert torch.autograd.gradcheck(f, (x, book, scale))


def test_probs_are_materialised_without_grad_and_match():
    vq_lean, vq_plain = make(chunk_size=4), make(chunk_size=0)
    z = torch.randn(2, 9, 6)
    assert vq_lean(z.requires_grad_()).probs is None  # lean while recording gradients
    with torch.no_grad():
        lean, plain = vq_lean(z), vq_plain(z)
    assert torch.allclose(lean.probs, plain.probs, atol=1e-6)
    assert torch.allclose(lean.probs.sum(-1), torch.ones(2, 9))
    assert torch.equal(lean.indices, lean.probs.argmax(-1))


def test_automatic_choice_keeps_small_problems_straightforward_and_chunks_large_ones():
    small, large = SoftVQ(4, 64), SoftVQ(4, 1024)  # chunk_size=None
    z = torch.randn(2, 300, 4, requires_grad=True)
    assert small(z).probs is not None  # 600 x 64 pairs: straightforward (probs kept)
    assert large(z).probs is None  # 600 x 1024 pairs: chunked, nothing (T, K) kept for backward


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_bf16_autocast_leaves_outputs_float32(chunk_size):
    vq = make("cosine", chunk_size=chunk_size, entropy_temperature=0.01)
    z = torch.randn(2, 4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z.bfloat16())
        out.losses["kl"].backward(retain_graph=True)
    assert out.latents.dtype == torch.float32 and out.losses["kl"].dtype == torch.float32
    with torch.no_grad():
        ref = vq(z.bfloat16().float())
    assert torch.allclose(out.latents, ref.latents, atol=1e-6)


def test_gmmvq_chunked_equals_straightforward():
    from softvq.bottlenecks.gmmvq import GMMVQ

    torch.manual_seed(4)
    z = torch.randn(3, 11, 7)
    upstream = torch.randn(3, 11, 6)
    results = []
    for chunk_size in (0, 5):
        torch.manual_seed(0)
        gmm = GMMVQ(6, 30, chunk_size=chunk_size)
        zz = z.clone().requires_grad_()
        out = gmm(zz)
        ((out.latents * upstream).sum() + out.losses["kl"]).backward()
        results.append([out.latents.detach(), zz.grad, gmm.codebook.grad])
    for a, b in zip(*results):
        assert (a - b).norm() <= 1e-5 * b.norm()


class OpCounter(TorchDispatchMode):
    """Counts the aten overloads that run under it."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def softmaxes(self) -> int:
        """The composite op (what inference mode dispatches) or its kernel."""
        return self.counts["aten.softmax"] + self.counts["aten._softmax"]


@pytest.mark.parametrize("chunk_size, chunks", [(0, 1), (4, 5)])  # 18 tokens: one chunk, or 5 of <= 4
def test_latents_alone_run_one_softmax_per_chunk_and_nothing_for_the_regulariser(chunk_size, chunks):
    vq = make("cosine", chunk_size=chunk_size, entropy_temperature=0.01)
    z = torch.randn(2, 9, 6)
    with torch.inference_mode():
        with OpCounter() as full:
            vq(z)
        with OpCounter() as alone:
            vq.latents(z)
    # forward: the posterior's softmax and the regulariser's at τ_H, and the argmax indices
    assert full.softmaxes() == 2 * chunks and full.counts["aten.argmax"] >= 1
    assert alone.softmaxes() == chunks and alone.counts["aten.argmax"] == 0
    assert alone.counts["aten.log"] == 0  # no entropy term


def test_a_bottleneck_named_what_it_takes_when_given_no_tensor():
    import numpy as np

    from softvq.bottlenecks import SoftVQ

    with pytest.raises(TypeError, match=r"SoftVQ takes a torch.Tensor \(\.\.\., 4\), got ndarray; convert it"):
        SoftVQ(latent_dim=4, codebook_size=8)(np.zeros((2, 3, 4), dtype=np.float32))


def test_constructor_defaults_are_the_config_defaults():
    """Building a bottleneck in Python gives the model the config gives: SoftVQ(D, K) once had τ
    only in the config (a changed constructor default went unseen by every config-built test)."""
    import inspect

    from softvq.bottlenecks import VQ, GroupedLookupFree, SegmentCodebooks, SoftVQ
    from softvq.config import BottleneckConfig

    same = {
        SoftVQ: {name: name for name in ("temperature", "learnable_temperature", "distance", "entropy_temperature",
                                         "detach_codebook_in_logits", "chunk_size", "codebook_loss", "commit_loss")},
        VQ: {"distance": "distance"},
        GroupedLookupFree: {"groups": "lfq_groups", "entropy_form": "lfq_entropy"},
        SegmentCodebooks: {"entropy_form": "segment_entropy"},
    }
    config = BottleneckConfig()
    for cls, fields in same.items():
        parameters = inspect.signature(cls.__init__).parameters
        for argument, field_name in fields.items():
            assert parameters[argument].default == getattr(config, field_name), (cls.__name__, argument)
