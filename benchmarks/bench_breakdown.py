"""Where one CPU encode or decode spends its time, kernel class by kernel class, against the matmul peak.

``bench_tokenizer.py`` says how far a preset's forward is from the dense-matmul peak; this script
says where that gap sits. A few passes run under the torch profiler; every aten call made from
Python (not from inside another aten op) is put in one class: GEMMs, attention (the fused SDPA
kernel), the patch convolution, GELU, LayerNorm, the other element-wise work (residual adds,
LayerScale and bias folding), and the bottleneck (SoftVQ's soft assignment as
``Tokenizer.encode_latents`` runs it; encode only). One call is split: the copy with which
``addmm`` broadcasts a bias into its output before accumulating the product is its own class, so
the GEMM row shows the matrix products alone. The rest of the wall time is Python and dispatch.
FLOPs come from ``torch.utils.flop_counter`` on the plain path, as in ``bench_tokenizer.py``, and
are attributed to the class that performs them.

Columns: ms per pass; GFLOP and GFLOP/s where the class does dense arithmetic; ``ms over peak`` =
the class's time minus its FLOPs at the matmul peak (the whole row for classes without FLOPs).
The ``ms over peak`` column sums to the forward's whole gap to the peak, so the largest entries
are where any further speed must come from. The profiler costs a few microseconds per call; the
unprofiled time of the same forward is printed beside it. Both run the whole batch at once
(:func:`softvq.cpu_streams.whole_batch`): the classes are ATen calls on one thread, as the
whole-batch path makes them (``bench_tokenizer.py`` times the split path too).

Not all of that gap can go. FLOP counters count only multiply-adds, yet a ViT must also
exponentiate every attention score, take an erf per MLP hidden unit and normalise every token. The
``floor`` column is a class's FLOPs at the peak plus that work timed alone (ATen's softmax, GELU
and LayerNorm on random tensors of the shapes the ViT feeds them, recorded from one pass, each
writing into a buffer allocated once), and ``ms over floor`` is what remains for fusion or better
kernels to win. The bottleneck's floor is its FLOPs only. The floors add up to a ceiling on the %
of peak that any implementation built on these kernels can reach: a lower bound on the time, so
the true ceiling is lower still.

    python benchmarks/bench_breakdown.py                                   # softvq-s-64 encode
    python benchmarks/bench_breakdown.py --preset softvq-b-64 --part decode
    python benchmarks/bench_breakdown.py --plot breakdown.png             # the table as a bar chart
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

import softvq
from softvq.cli.common import positive_int
from softvq.cpu_allocator import retain_freed_memory
from softvq.cpu_streams import whole_batch
from softvq.networks.vit import reference_math

from bench_tokenizer import MatmulPeak, machine, significant, timed  # this folder: run as ``python benchmarks/bench_breakdown.py``

GEMM = "GEMM (linear layers)"
# aten names of the calls made from Python, by class. SDPA is counted whole (its inner GEMMs are
# children and never reach this table); F.linear's inner addmm likewise.
CLASSES = {
    GEMM: {"aten::linear", "aten::addmm", "aten::addmm_", "aten::mm", "aten::matmul"},
    "attention (SDPA)": {"aten::scaled_dot_product_attention"},
    "patch conv": {"aten::conv2d", "aten::convolution"},
    "GELU": {"aten::gelu", "aten::gelu_"},
    "LayerNorm": {"aten::layer_norm"},
}
OTHER = "other element-wise"
# addmm with a bias first copies the bias, broadcast, into its output, then accumulates the product
# onto it: a memory pass over the output that would otherwise hide inside the GEMMs' time.
BIAS_COPY = "bias broadcast (inside addmm)"
BOTTLENECK = "bottleneck (soft assignment)"
# flop_counter op name -> class; on the plain path attention is two bmm per layer.
FLOP_CLASSES = {"addmm": GEMM, "mm": GEMM, "bmm": "attention (SDPA)",
                "convolution": "patch conv"}


def class_of(name: str) -> str:
    return next((label for label, names in CLASSES.items() if name in names), OTHER)


def ancestor_names(event) -> Iterator[str]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def bias_copy_us(event) -> float:
    """Microseconds ``event`` spent in copies that an ``aten::addmm`` below it made."""
    return sum(child.cpu_time_total if event.name == "aten::addmm" and child.name == "aten::copy_"
               else bias_copy_us(child) for child in event.cpu_children)


def top_level(event) -> bool:
    """An aten call made from Python: none of its ancestors is another aten op."""
    return event.name.startswith("aten::") and not any(n.startswith("aten::") for n in ancestor_names(event))


def flops_by_class(fn) -> dict[str, float]:
    with FlopCounterMode(display=False) as counter:
        fn()
    out: dict[str, float] = defaultdict(float)
    for op, flops in counter.get_flop_counts()["Global"].items():
        out[FLOP_CLASSES.get(str(op).split(".")[-1], OTHER)] += flops
    return out


# Work that FLOP counters do not see but no forward can skip, by the function's name -> class.
UNCOUNTED = {"softmax": "attention (SDPA)", "gelu": "GELU", "layer_norm": "LayerNorm"}


class ShapeRecorder(TorchFunctionMode):
    """Records the input shape of every softmax, GELU and LayerNorm a forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in UNCOUNTED:
            self.shapes.append((name, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def alone_ms(name: str, shape: tuple[int, ...], repeats: int = 7) -> float:
    """Median ms of one such op on a random tensor of that shape, outside the model, written into
    a buffer allocated once (a fused kernel would not allocate the softmax or GELU output either)."""
    x, out = torch.randn(shape) * 3, torch.empty(shape)
    weight, bias = torch.ones(shape[-1]), torch.zeros(shape[-1])
    op = {"attention (SDPA)": lambda: torch.ops.aten._softmax.out(x, -1, False, out=out),
          "GELU": lambda: torch._C._nn.gelu(x, out=out),
          "LayerNorm": lambda: F.layer_norm(x, shape[-1:], weight, bias, 1e-6)}[UNCOUNTED[name]]
    with torch.inference_mode():
        return 1e3 * timed(op, torch.device("cpu"), repeats)


def uncounted_floor_ms(vit_pass) -> dict[str, float]:
    """ms per class of the ViT's softmax, GELU and LayerNorm work, each timed alone (plain path,
    where attention's softmax is an op of its own)."""
    with torch.inference_mode(), ShapeRecorder() as recorder:
        vit_pass()
    out: dict[str, float] = defaultdict(float)
    for key in set(recorder.shapes):
        out[UNCOUNTED[key[0]]] += recorder.shapes.count(key) * alone_ms(*key)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Bad values are usage errors before any model is built or profiled, as in ``softvq bench gen``.
    parser.add_argument("--preset", default="softvq-s-64", choices=sorted(softvq.PRESETS), metavar="PRESET",
                        help="preset to profile (default softvq-s-64; softvq info lists them)")
    parser.add_argument("--part", choices=["encode", "decode"], default="encode")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--passes", type=positive_int, default=3, help="profiled passes (the table is their mean)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the table: per class, time at the peak, "
                                                      "the uncounted floor and what lies above it")
    args = parser.parse_args()
    if args.plot:  # checked before minutes of profiling, not after
        args.plot = plot_path(parser, args.plot)
    retain_freed_memory()
    torch.manual_seed(0)

    model = softvq.Tokenizer.from_preset(args.preset).eval()
    size = model.config.image_size
    images = torch.rand(args.batch, 3, size, size) * 2 - 1
    with torch.inference_mode():
        features = model.to_latent(model.encoder(images))
        latents = model.bottleneck(features).latents

    def encode():
        with torch.inference_mode():
            features = model.to_latent(model.encoder(images))
            with record_function(BOTTLENECK):  # as Tokenizer.encode_latents runs it
                return model.bottleneck.latents(features)

    def decode():
        with torch.inference_mode(), whole_batch():
            return model.decode(latents)

    fn = encode if args.part == "encode" else decode
    vit_pass = (lambda: model.encoder(images)) if args.part == "encode" else decode
    with reference_math(model):  # FLOPs on the plain path (see bench_tokenizer.count_flops)
        flops = flops_by_class(fn)
        floor_ms = uncounted_floor_ms(vit_pass)
    if args.part == "encode":
        with torch.inference_mode():
            bottleneck_flops = flops_by_class(lambda: model.bottleneck.latents(features))
        for label, value in bottleneck_flops.items():
            flops[label] -= value
        flops[BOTTLENECK] = sum(bottleneck_flops.values())

    for _ in range(2):
        fn()
    matmul = MatmulPeak(torch.device("cpu"), torch.float32)
    peak_before = matmul()
    unprofiled = timed(fn, torch.device("cpu"), args.passes, warmup=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.passes):
            fn()
        profiled = (time.perf_counter() - start) / args.passes
    peak = (peak_before + matmul()) / 2

    seconds: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if not top_level(event):
            continue
        label = BOTTLENECK if BOTTLENECK in ancestor_names(event) else class_of(event.name)
        seconds[label] += event.cpu_time_total / 1e6 / args.passes
        if label == GEMM:
            copy = bias_copy_us(event) / 1e6 / args.passes
            seconds[GEMM] -= copy
            seconds[BIAS_COPY] += copy
    seconds["Python and dispatch"] = max(0.0, profiled - sum(seconds.values()))

    total_flops = sum(flops.values())
    print(f"\n{args.preset} {args.part}, batch {args.batch}, fp32, {machine(torch.device('cpu'))}; "
          f"matmul peak {peak:.0f} GFLOP/s (2048^3, mean of before and after)")
    achieved = 100 * total_flops / unprofiled / 1e9 / peak
    print(f"unprofiled forward {1e3 * unprofiled:.1f} ms = {total_flops / unprofiled / 1e9:.0f} GFLOP/s = "
          f"{achieved:.1f}% of peak; at the peak it would take "
          f"{1e3 * total_flops / peak / 1e9:.1f} ms; profiled: {1e3 * profiled:.1f} ms (the table's total)")
    print("| class | ms | share | GFLOP | GFLOP/s | % of peak | ms over peak | floor ms | ms over floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = sorted(seconds, key=lambda k: -seconds[k])
    floor_total = 0.0
    bars = []  # (class, ms at the peak, uncounted floor ms, ms over the floor)
    for label in order:
        s, f = seconds[label], flops.get(label, 0.0)
        rate = f"{f / s / 1e9:.0f}" if f and s else ""
        frac = f"{100 * f / s / 1e9 / peak:.0f}%" if f and s else ""
        over = s - f / peak / 1e9
        floor = f / peak / 1e9 + floor_ms.get(label, 0.0) / 1e3
        floor_total += floor
        bars.append((label, 1e3 * f / peak / 1e9, floor_ms.get(label, 0.0), 1e3 * (s - floor)))
        gflop = significant(f / 1e9) if f else ""  # a tiny preset's classes are below 0.01 GFLOP
        print(f"| {label} | {1e3 * s:.1f} | {100 * s / profiled:.1f}% | {gflop} | {rate} | {frac} | "
              f"{1e3 * over:+.1f} | {1e3 * floor:.1f} | {1e3 * (s - floor):+.1f} |")
    ceiling = 100 * total_flops / floor_total / 1e9 / peak
    print(f"floor {1e3 * floor_total:.1f} ms (FLOPs at the peak + ATen's softmax, GELU and LayerNorm "
          f"timed alone): with these kernels no forward passes {ceiling:.1f}% "
          f"of peak; the unprofiled forward runs at {100 * floor_total / unprofiled:.1f}% of the floor's speed")
    if args.plot:
        title = (f"{args.preset} {args.part}, batch {args.batch}, fp32: {achieved:.1f}% of the matmul peak "
                 f"({peak:.0f} GFLOP/s), ceiling {ceiling:.1f}%\n{machine(torch.device('cpu'))}")
        plot_breakdown(bars, title, str(args.plot))
        print(f"wrote {args.plot}")


def plot_path(parser: argparse.ArgumentParser, text: str) -> Path:
    """``--plot``'s file: ``.png`` added where no suffix is given (as matplotlib would, unsaid), in a
    folder that exists and can be written; anything else is a usage error before the profile."""
    path = Path(text).expanduser()
    if path.is_dir():
        parser.error(f"--plot {text} is a folder; name the PNG to write, e.g. {path / 'breakdown.png'}")
    path = path if path.suffix else path.with_suffix(".png")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        parser.error(f"--plot {text}: cannot write {path} ({exc.strerror or type(exc).__name__})")
    if not existed:
        path.unlink()
    return path


def plot_breakdown(bars: list[tuple[str, float, float, float]], title: str, path: str) -> None:
    """One horizontal bar per class: its FLOPs at the matmul peak, the work FLOP counters do not
    see (the floor's softmax, GELU and LayerNorm), and the time above that floor; a class measured
    below its floor (faster than the peak measured around it) gets a black mark at its measured time."""
    from softvq.evaluation.plots import _figure, _save  # the package's Agg figure, no pyplot state

    labels = [b[0] for b in bars][::-1]
    at_peak, uncounted, over = ([b[i] for b in bars][::-1] for i in (1, 2, 3))
    fig = _figure(9, 0.45 * len(bars) + 1.6)
    ax = fig.add_subplot()
    from matplotlib.colors import to_rgba

    def shades(colour: str) -> list:  # a floor the class beat is drawn faint: its time is the black mark
        return [to_rgba(colour, 0.3 if o < 0 else 1.0) for o in over]

    ax.barh(labels, at_peak, color=shades("#2b6cb0"), label="FLOPs at the matmul peak")
    ax.barh(labels, uncounted, left=at_peak, color=shades("#90cdf4"), label="uncounted work (ATen's kernel alone)")
    starts = [a + u for a, u in zip(at_peak, uncounted)]
    ax.barh(labels, [max(o, 0.0) for o in over], left=starts, color="#e53e3e", label="above the floor")
    below = [(y, start + extra) for y, (start, extra) in enumerate(zip(starts, over)) if extra < 0]
    if below:  # the floor's bar would read as the class's time: mark what was measured
        ax.scatter([t for _, t in below], [y for y, _ in below], marker="|", s=300, color="black", zorder=3,
                   label="measured, below the floor")
    end = max(start + max(extra, 0.0) for start, extra in zip(starts, over))
    for y, (start, extra) in enumerate(zip(starts, over)):
        note = f"{extra:+.1f} ms" + (" (below the floor)" if extra < 0 else "")
        ax.text(start + max(extra, 0.0) + 0.01 * end, y, note, va="center", fontsize=8)
    ax.set_xlim(0, 1.3 * end)  # room for the longest bar's note inside the axes
    ax.set_xlabel("ms per pass")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


if __name__ == "__main__":
    main()
