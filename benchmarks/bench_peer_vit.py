"""Our encoder ViT against timm's plain ViT of the same shape, on one host, in one run.

The project's CPU target is 85% of the matmul peak, on the premise that plain research
implementations already reach about that. This script checks the premise on the machine at hand:
it builds timm's ``VisionTransformer`` with a preset's encoder shape (width, depth, heads, MLP
ratio, LayerScale, patch and image size, a class token and the L latent tokens as timm's register
tokens, so both run the same 1 + N + L tokens) and times it beside our ``TokenEncoder``, both
forwards bracketed by the same 2048³ matmul peak measurement as in ``bench_tokenizer.py``. timm
runs as its users run it: fused attention (``F.scaled_dot_product_attention``) on, eager, fp32.

FLOPs are counted on explicit-attention paths for both (timm's ``fused_attn`` off, our
``reference_math``), because ``FlopCounterMode`` has no formula for the CPU fused-attention kernel
and would drop its FLOPs. Ours keeps only the latent rows in its last block, so it does slightly
less work per image. ``x timm`` is how much sooner ours finishes the same encode, from the two
peak-normalised rates and FLOP counts, so host drift between the two timings cancels.

timm and torchvision are not dependencies of softvq (timm imports torchvision, whose CUDA build
cannot load its C ops on a CPU-only machine; the tests' helper works around that). Install them
next to it to run this::

    pip install --no-deps timm==1.0.15 torchvision==0.28.0
    python benchmarks/bench_peer_vit.py                     # S and B, batch 8, 256 px
    python benchmarks/bench_peer_vit.py --presets softvq-s-64 --repeats 15
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

import softvq
from softvq.cli.common import positive_int
from softvq.cpu_allocator import retain_freed_memory
from softvq.networks.vit import reference_math

from bench_tokenizer import MatmulPeak, count_flops, machine, paired, significant  # this folder: run as ``python benchmarks/...``


def import_timm():
    """timm, importable where its torchvision's C ops do not load (the tests' helper for that)."""
    if importlib.util.find_spec("timm") is None:
        # An optional peer: skipped, not failed, so ``make bench`` runs on without it.
        print("skipped: timm is not installed (pip install --no-deps timm==1.0.15 torchvision==0.28.0)")
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from torchvision_peer import prepare_torchvision_import

    prepare_torchvision_import()
    import timm.models.vision_transformer as vit

    return vit


def timm_twin(model: softvq.Tokenizer, timm_vit) -> torch.nn.Module:
    """timm's ViT with the preset encoder's shape and token count, as a plain research model."""
    cfg, enc = model.config, model.config.encoder
    return timm_vit.VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=enc.width, depth=enc.depth,
        num_heads=enc.heads, mlp_ratio=enc.mlp_ratio, qkv_bias=True, init_values=enc.layerscale_init,
        class_token=True, reg_tokens=cfg.num_tokens, num_classes=0, global_pool="",
    ).eval()


def set_fused_attention(module: torch.nn.Module, fused: bool) -> None:
    for layer in module.modules():
        if hasattr(layer, "fused_attn"):
            layer.fused_attn = fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Bad values are usage errors before timm is imported or anything is timed, as in ``softvq bench gen``.
    parser.add_argument("--presets", nargs="+", default=["softvq-s-64", "softvq-b-64"],
                        choices=sorted(softvq.PRESETS), metavar="PRESET",
                        help="presets whose encoder shape to compare (default softvq-s-64 softvq-b-64)")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=9)
    args = parser.parse_args()
    timm_vit = import_timm()
    retain_freed_memory()  # as bench_tokenizer does; both models run under the same allocator
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    peak = MatmulPeak(cpu, torch.float32)

    rows = []
    for name in args.presets:
        model = softvq.Tokenizer.from_preset(name).eval()
        peer = timm_twin(model, timm_vit)
        size = model.config.image_size
        images = torch.rand(args.batch, 3, size, size) * 2 - 1

        def ours():
            with torch.inference_mode():
                return model.encoder(images)

        def theirs():
            with torch.inference_mode():
                return peer.forward_features(images)

        with reference_math(model):
            ours_flops = count_flops(ours)
        set_fused_attention(peer, False)
        theirs_flops = count_flops(theirs)
        set_fused_attention(peer, True)
        timed = []
        for label, fn, flops in (("softvq TokenEncoder", ours, ours_flops), ("timm VisionTransformer", theirs, theirs_flops)):
            seconds, fraction, spread = paired(fn, flops, peak, cpu, args.repeats)
            timed.append({"preset": name, "label": label, "tokens": 1 + model.config.num_patches + model.config.num_tokens,
                          "flops": flops, "img_s": args.batch / seconds,
                          "fraction": fraction, "spread": spread, "x_timm": ""})
        # Time ∝ FLOPs / fraction of peak: the peak cancels, the work each model does stays in.
        ours_row, timm_row = timed
        ours_row["x_timm"] = f"{timm_row['flops'] / ours_row['flops'] * ours_row['fraction'] / timm_row['fraction']:.2f}x"
        rows += timed
        print(f"done {name}", flush=True)

    print(f"\nEncoder ViT against timm's: batch {args.batch}, fp32, eager, {machine(cpu)}")
    print(peak.legend("fp32"))
    print("| preset | implementation | tokens | GFLOP/img | img/s | %peak | x timm |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        q1, q3 = row["spread"]
        print(f"| {row['preset']} | {row['label']} | {row['tokens']} | {significant(row['flops'] / args.batch / 1e9)} | "
              f"{row['img_s']:.2f} | {100 * row['fraction']:.1f}% ({100 * q1:.0f}-{100 * q3:.0f}) | {row['x_timm']} |")


if __name__ == "__main__":
    main()
