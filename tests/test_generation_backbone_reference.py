"""DiT / SiT backbone and MAR's denoising MLP against a naive float64 forward written here.

The reference follows DiT (Peebles & Xie 2023), Sec. 3.2 "adaLN-Zero" and Fig. 3:

* conditioning c = embed(t) + embed(y); embed(t) is an MLP (Linear, SiLU, Linear) of the
  sinusoidal features [cos(t·f_i), sin(t·f_i)], f_i = 10000^(−i/half), i = 0..half−1;
* each block regresses (shift, scale, gate) for attention and for the MLP from Linear(SiLU(c)) and
  computes  x ← x + gate₁·Attn(LN(x)·(1 + scale₁) + shift₁),  x ← x + gate₂·MLP(LN(x)·(1 + scale₂) + shift₂);
* the final layer is LN(x)·(1 + scale) + shift (adaLN) followed by a linear decoder to the output
  channels (2·C with DiT's learned sigma: [ε, Σ] stacked on the channel axis).

Where the code follows the DiT *release* rather than the paper text, the reference does too and
says so: the "1 + scale" parametrisation of the paper's γ (so an all-zero modulation is the
identity), the (shift, scale, gate) chunk order, LayerNorm without affine parameters and eps 1e-6,
the tanh approximation of GELU, and [cos, sin] feature order (GLIDE/ADM's ``timestep_embedding``).

Every parameter is re-initialised to random non-zero values first: at DiT's adaLN-Zero init every
gate and the head are zero, which would hide any mistake in the modulation.
"""

import math

import pytest
import torch

from softvq.generation.diffloss import DenoisingMLP
from softvq.generation.embeddings import timestep_frequencies
from softvq.generation.models import GeneratorConfig, build_generator

F64 = torch.float64


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random and away from zero: weights ~ U(±1/√fan_in), vectors ~ U(±0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            u = torch.rand(p.shape, generator=g, dtype=F64) * 2 - 1
            bound = 1 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.5
            p.copy_((u * bound).to(p.dtype))


# --- the naive float64 reference ------------------------------------------------------------------

def ref_timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t·f_0..f_{half−1}), sin(t·f_0..f_{half−1})], f_i = 10000^(−i/half), zero-padded if dim is odd."""
    half = dim // 2
    rows = []
    for tv in t.to(F64).tolist():
        cos = [math.cos(tv * 10000.0 ** (-i / half)) for i in range(half)]
        sin = [math.sin(tv * 10000.0 ** (-i / half)) for i in range(half)]
        rows.append(cos + sin + [0.0] * (dim % 2))
    return torch.tensor(rows, dtype=F64)


def ref_sincos_1d(dim: int, positions: list[float]) -> torch.Tensor:
    """MAE's fixed positions (used by DiT): [sin(p·ω_i), cos(p·ω_i)], ω_i = 10000^(−2i/dim)."""
    half = dim // 2
    return torch.tensor([[math.sin(p * 10000.0 ** (-2 * i / dim)) for i in range(half)]
                         + [math.cos(p * 10000.0 ** (-2 * i / dim)) for i in range(half)] for p in positions],
                        dtype=F64)


def silu(x):
    return x / (1 + torch.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, eps=1e-6):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def attention(x, sd, name, heads):
    """Multi-head self-attention, one head and one query at a time: qkv columns are [q | k | v],
    each split into consecutive head slices of width d (timm's layout, which DiT uses)."""
    b, n, w = x.shape
    d = w // heads
    qkv = linear(x, sd, f"{name}.qkv")
    out = torch.zeros(b, n, w, dtype=F64)
    for bi in range(b):
        for h in range(heads):
            q = qkv[bi, :, h * d:(h + 1) * d]
            k = qkv[bi, :, w + h * d:w + (h + 1) * d]
            v = qkv[bi, :, 2 * w + h * d:2 * w + (h + 1) * d]
            for i in range(n):
                logits = torch.tensor([float(q[i] @ k[j]) / math.sqrt(d) for j in range(n)], dtype=F64)
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                out[bi, i, h * d:(h + 1) * d] = (weights[:, None] * v).sum(dim=0)
    return linear(out, sd, f"{name}.proj")


def adaln(x, shift, scale):
    """The paper's γ·LN(x) + β with the release's γ = 1 + scale (per image, broadcast over tokens)."""
    return layer_norm(x) * (1 + scale[:, None, :]) + shift[:, None, :]


def ref_patchify(x, p):
    """(B, C, H, W) -> (B, (H/p)(W/p), p·p·C): row-major patches, each flattened as (row in patch,
    column in patch, channel) -- the code's order (a Conv2d patch embed is the same map with
    permuted weights)."""
    b, c, hh, ww = x.shape
    tokens = []
    for i in range(hh // p):
        for j in range(ww // p):
            tokens.append(torch.stack([x[:, ch, i * p + r, j * p + q]
                                       for r in range(p) for q in range(p) for ch in range(c)], dim=-1))
    return torch.stack(tokens, dim=1)


def ref_unpatchify(tokens, side, p, c):
    b = tokens.shape[0]
    img = torch.zeros(b, c, side * p, side * p, dtype=F64)
    for i in range(side):
        for j in range(side):
            vec = tokens[:, i * side + j]
            k = 0
            for r in range(p):
                for q in range(p):
                    for ch in range(c):
                        img[:, ch, i * p + r, j * p + q] = vec[:, k]
                        k += 1
    return img


def ref_backbone(sd, cfg: GeneratorConfig, x, t, y):
    sd = {k: v.to(F64) for k, v in sd.items()}
    w = cfg.width
    if cfg.layout == "1d":
        tokens = x.to(F64)
        pos = ref_sincos_1d(w, list(range(cfg.num_tokens)))
    else:
        side = cfg.grid // cfg.patch_size
        tokens = ref_patchify(x.to(F64), cfg.patch_size)
        # the code's 2D layout: first half of the channels encodes the row, second half the column
        # (MAE's / the DiT release's get_2d_sincos_pos_embed puts the column first: a transposed but
        # equivalent convention for a model trained from scratch)
        rows = [float(k // side) for k in range(side * side)]
        cols = [float(k % side) for k in range(side * side)]
        pos = torch.cat([ref_sincos_1d(w // 2, rows), ref_sincos_1d(w // 2, cols)], dim=1)
    h = linear(tokens, sd, "x_embed") + pos
    t_emb = linear(silu(linear(ref_timestep_features(t, cfg.t_embed_frequencies), sd, "t_embed.mlp.0")),
                   sd, "t_embed.mlp.2")
    c = t_emb + sd["y_embed.table.weight"][y]  # eval mode: no label dropout
    for i in range(cfg.depth):
        blk = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(silu(c), sd, f"{blk}.modulation.1").split(w, dim=-1)
        h = h + gate1[:, None] * attention(adaln(h, shift1, scale1), sd, f"{blk}.attn", cfg.heads)
        hidden = gelu_tanh(linear(adaln(h, shift2, scale2), sd, f"{blk}.mlp.fc1"))
        h = h + gate2[:, None] * linear(hidden, sd, f"{blk}.mlp.fc2")
    shift, scale = linear(silu(c), sd, "final.modulation.1").split(w, dim=-1)
    out = linear(adaln(h, shift, scale), sd, "final.linear")
    if cfg.layout == "1d":
        return out
    return ref_unpatchify(out, cfg.grid // cfg.patch_size, cfg.patch_size, cfg.out_channels)


# --- tests ------------------------------------------------------------------------------------------

def test_timestep_frequencies_are_cos_then_sin_of_geometric_frequencies():
    """DiT Sec. 3.2 / GLIDE: features [cos(t f_i), sin(t f_i)], f_i = 10000^(−i/half); odd dim zero-padded."""
    t = torch.tensor([0.0, 0.25, 1.0, 3.0, 17.5, 250.0, 999.0])
    for dim in (256, 16, 7):
        got = timestep_frequencies(t, dim).to(F64)
        ref = ref_timestep_features(t, dim)
        assert got.shape == (len(t), dim)
        # the code forms t·f_i in float32 (as the DiT release does): error ≈ t · 2⁻²³ per feature
        tol = (1e-6 + 3e-7 * t.to(F64)).view(-1, 1)
        assert bool(((got - ref).abs() <= tol).all()), (got - ref).abs().max()
    # t = 0: cos half is all ones, sin half all zeros (a fixed, easily-checked pattern)
    z = timestep_frequencies(torch.zeros(1), 8)
    assert torch.equal(z, torch.tensor([[1.0] * 4 + [0.0] * 4]))


CASES = {
    # SiT: velocity output (C channels), t ∈ [0, 1]
    "sit-1d": (dict(kind="sit", layout="1d", num_tokens=5, latent_dim=4), [0.0, 0.37, 0.93]),
    # DiT: learned sigma, 2·C output channels, integer steps (small so float32 time features stay exact)
    "dit-1d": (dict(kind="dit", layout="1d", num_tokens=5, latent_dim=4), [0.0, 3.0, 9.0]),
    # the original 2D latent-grid layout, patch 2 on a 4x4 grid of 3 channels
    "dit-2d": (dict(kind="dit", layout="2d", grid=4, patch_size=2, latent_dim=3), [1.0, 0.0, 7.0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backbone_matches_naive_float64_adaln_zero_forward(case):
    """DiT Sec. 3.2 (adaLN-Zero blocks, adaptive final layer, t/y conditioning) on random weights."""
    fields, ts = CASES[case]
    cfg = GeneratorConfig(width=32, depth=2, heads=2, num_classes=3, class_dropout=0.1, **fields)
    model = build_generator(cfg)
    _randomise(model, seed=list(CASES).index(case))
    model = model.double().eval()
    gates = [b.modulation[1].weight for b in model.blocks]
    assert all(bool(g.abs().min() > 0) for g in gates)  # nothing left at adaLN-Zero's zeros
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *model.input_shape, generator=g, dtype=F64)
    t = torch.tensor(ts, dtype=F64)
    y = torch.tensor([2, 0, 3])  # 3 = the null class (row num_classes) used for guidance
    with torch.no_grad():
        got = model(x, t, y)
    ref = ref_backbone(model.state_dict(), cfg, x, t, y)
    assert got.dtype == F64 and got.shape == ref.shape
    assert got.shape[1 if cfg.layout == "2d" else -1] == (2 if cfg.kind == "dit" else 1) * cfg.latent_dim
    assert ref.abs().max() > 0.1  # a non-trivial output
    assert torch.allclose(got, ref, rtol=0, atol=1e-6), (got - ref).abs().max()


def ref_denoising_mlp(sd, depth, x, t, cond):
    """MAR (Li et al. 2024, Sec. 3 / the release's SimpleMLPAdaLN): c = embed(t) + Linear(z);
    blocks x + gate·MLP(LN_affine(x)·(1 + scale) + shift) with (shift, scale, gate) = Linear(SiLU(c));
    final layer as DiT's (non-affine LN, adaLN, Linear to [ε, v])."""
    sd = {k: v.to(F64) for k, v in sd.items()}
    width = sd["input_proj.weight"].shape[0]
    h = linear(x, sd, "input_proj")
    t_emb = linear(silu(linear(ref_timestep_features(t, 256), sd, "time_embed.mlp.0")), sd, "time_embed.mlp.2")
    c = t_emb + linear(cond, sd, "cond_embed")
    for i in range(depth):
        blk = f"blocks.{i}"
        shift, scale, gate = linear(silu(c), sd, f"{blk}.modulation.1").split(width, dim=-1)
        normed = layer_norm(h) * sd[f"{blk}.norm.weight"] + sd[f"{blk}.norm.bias"]
        a = normed * (1 + scale) + shift
        h = h + gate * linear(silu(linear(a, sd, f"{blk}.mlp.0")), sd, f"{blk}.mlp.2")
    shift, scale = linear(silu(c), sd, "final_modulation.1").split(width, dim=-1)
    return linear(layer_norm(h) * (1 + scale) + shift, sd, "output")


def test_mar_denoising_mlp_matches_naive_float64_forward():
    """MAR's per-token denoiser ε_θ(x_t | t, z) (Li et al. 2024 Eq. 2's network) with adaLN blocks."""
    net = DenoisingMLP(token_dim=3, cond_dim=5, width=16, depth=2)
    _randomise(net, seed=7)
    net = net.double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    cond = torch.randn(4, 5, generator=g, dtype=F64)
    t = torch.tensor([0.0, 1.0, 4.0, 8.0], dtype=F64)
    with torch.no_grad():
        got = net(x, t, cond)
    ref = ref_denoising_mlp(net.state_dict(), 2, x, t, cond)
    assert got.shape == (4, 6) and ref.abs().max() > 0.1
    assert torch.allclose(got, ref, rtol=0, atol=1e-6), (got - ref).abs().max()
