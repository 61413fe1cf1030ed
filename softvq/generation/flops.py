"""Forward cost of a generator per image, in multiply-accumulates (what DiT / SiT call "GFLOPs").

Two independent counts that must agree:

* :func:`count_macs` runs the model once on the ``meta`` device (no memory, no time, so XL is
  free) under ``torch.utils.flop_counter.FlopCounterMode`` and halves its FLOPs (it counts
  2 per multiply-accumulate); matrix products of linear layers (``addmm``/``mm``) and of the
  attention core (``bmm`` from scaled-dot-product attention) are kept apart;
* :func:`analytic_macs` sums the layer shapes: per block N·(4w² + 2w·h) for qkv/proj/MLP,
  2N²w for QKᵀ and AV, 6w² for the adaLN modulation of one image; plus the patch embedding,
  timestep MLP, final adaLN and output head.

What reproduces the SoftVQ paper's Tab. 1 (see ``softvq bench gen``): the DiT-XL numbers
14.52 / 28.81 at 32 / 64 tokens are the *linear layers only* (attention-core matmuls not
counted; ours 14.50 / 28.77, −0.1%), with D = 64 / 32 in the input/output projections (they
change the count by < 0.1%). The SiT-XL numbers 14.73 / 29.23 additionally include the REPA
projector MLP (w -> 2048 -> 2048 -> 768 on every token) that the released SiT (REPA's code)
computes in each forward pass: ours 14.76 / 29.29 (+0.2%). Counting everything, as the DiT
paper does (DiT-XL/2 at 256x256 = 118.6 GFLOPs), gives 14.57 / 29.04.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from softvq.generation.mar import MARConfig
from softvq.generation.models import GeneratorConfig, build_generator

# SoftVQ paper Tabs. 1 (ImageNet 256x256) and 2 (512x512): generator GFLOPs and sampling throughput
# (images/s, fp32, batch 64, one AMD MI250). Keys: (kind, layout label).
PAPER_GFLOPS: dict[tuple[str, str], tuple[float, float]] = {
    ("dit", "32 tokens"): (14.52, 8.74),
    ("dit", "64 tokens"): (28.81, 4.51),
    ("sit", "32 tokens"): (14.73, 10.11),
    ("sit", "64 tokens"): (29.23, 5.39),
    ("dit", "32x32/2"): (80.73, 0.51),   # DiT-XL/2 on a KL-VAE 32x32x4 grid
    ("sit", "32x32/2"): (81.92, 0.54),   # SiT-XL/2
    # Tab. 2 (512 px): XL/2 on a KL-8 64x64x4 grid; the SoftVQ rows repeat the 1D values above
    ("dit", "64x64/2"): (373.34, 0.10),
    ("sit", "64x64/2"): (373.32, 0.10),
}


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward pass of one image, split by where they happen."""

    linear: float     # linear layers (embeddings, qkv, proj, MLP, adaLN, head)
    attention: float  # QKᵀ and attention·V

    @property
    def total(self) -> float:
        """Multiply-accumulates of the linear layers and attention together."""
        return self.linear + self.attention


def example_inputs(config: GeneratorConfig, batch: int = 1, device: str | torch.device = "meta"):
    """Random (x, t, y) of the right shapes for ``config``."""
    shape: tuple[int, ...]
    if config.layout == "1d":
        shape = (batch, config.num_tokens, config.latent_dim)
    else:
        shape = (batch, config.latent_dim, config.grid, config.grid)
    x = torch.randn(shape, device=device)
    t = torch.rand(batch, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    return x, t, y


def count_macs(config: GeneratorConfig) -> MacCount:
    """Count one image's forward MACs with FlopCounterMode on the meta device."""
    with torch.device("meta"):
        model = build_generator(config).eval()
    x, t, y = example_inputs(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    # attention core: bmm from SDPA's math decomposition (meta / CPU), or a fused SDPA kernel
    attention = sum(v for k, v in by_op.items() if "bmm" in k or "attention" in k)
    return MacCount(linear=(sum(by_op.values()) - attention) / 2, attention=attention / 2)


def analytic_macs(config: GeneratorConfig) -> MacCount:
    """The same count from the module shapes alone."""
    c = config
    n, w, p = c.sequence_length, c.width, c.patch_size
    hidden = int(w * c.mlp_ratio)
    per_block_linear = n * (4 * w * w + 2 * w * hidden) + 6 * w * w
    per_block_attention = 2 * n * n * w
    embed = n * (p * p * c.latent_dim) * w + (c.t_embed_frequencies * w + w * w)
    head = 2 * w * w + n * w * (p * p * c.out_channels)
    return MacCount(linear=float(c.depth * per_block_linear + embed + head),
                    attention=float(c.depth * per_block_attention))


def repa_projector_macs(config: GeneratorConfig, projector_dim: int = 2048, z_dim: int = 768) -> float:
    """MACs of REPA's alignment projector (Linear w->2048, SiLU, 2048->2048, SiLU, 2048->768) that
    the released SiT evaluates on every token in every forward pass, sampling included."""
    n, w = config.sequence_length, config.width
    return float(n * (w * projector_dim + projector_dim * projector_dim + projector_dim * z_dim))


# --- MAR (paper Tab. 1) -------------------------------------------------------------------------

# SoftVQ paper Tab. 1: MAR-H generator GFLOPs at 256x256, keyed by the tokenizer's (tokens, D).
PAPER_TABLE1_MAR: dict[tuple[int, int], tuple[str, float, float]] = {  # tokenizer, GFLOPs, images/s
    (256, 16): ("KL-16 (MAR's VAE)", 145.08, 0.12),
    (64, 32): ("SoftVQ-BL", 86.55, 0.89),
    (32, 64): ("SoftVQ-L", 67.93, 2.08),
}


def count_mar_macs(config: MARConfig) -> MacCount:
    """MACs of one MAR sampling step per image, counted with FlopCounterMode on the meta device.

    The convention that comes closest to the paper's Tab. 1 (printed by ``softvq bench gen``): the
    transformer at the first step (every token masked, so the encoder sees only the buffer, the
    decoder the whole sequence) plus one evaluation of the diffusion head for every token."""
    model = build_generator(config, device="meta").eval()
    c = config
    with torch.device("meta"):
        tokens = torch.zeros(1, c.num_tokens, c.latent_dim)
        labels = torch.zeros(1, dtype=torch.long)
        orders = torch.arange(c.num_tokens).unsqueeze(0)
        steps = torch.zeros(c.num_tokens)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        z = model.condition(model.encode(tokens, orders, c.num_tokens, labels), orders, c.num_tokens)
        model.head.net(tokens[0], steps, z[0])
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    attention = sum(v for k, v in by_op.items() if "bmm" in k or "attention" in k)
    return MacCount(linear=(sum(by_op.values()) - attention) / 2, attention=attention / 2)


def analytic_mar_macs(config: MARConfig) -> MacCount:
    """:func:`count_mar_macs` from the layer shapes alone."""
    c = config
    w, hidden, hw, L = c.width, int(c.width * c.mlp_ratio), c.head_width, c.num_tokens
    n_enc, n_dec = c.buffer_size, c.sequence_length  # first step: only the buffer is visible

    def blocks(n: int) -> tuple[int, int]:
        return c.depth * n * (4 * w * w + 2 * w * hidden), c.depth * 2 * n * n * w

    enc_lin, enc_att = blocks(n_enc)
    dec_lin, dec_att = blocks(n_dec)
    embed = L * c.latent_dim * w + n_enc * w * w  # token projection (all tokens), decoder embedding
    head = L * (c.latent_dim * hw + 256 * hw + hw * hw + w * hw  # input, time MLP, condition
                + c.head_depth * 5 * hw * hw + 2 * hw * hw + hw * 2 * c.latent_dim)  # blocks, final adaLN, output
    return MacCount(linear=float(enc_lin + dec_lin + embed + head), attention=float(enc_att + dec_att))
