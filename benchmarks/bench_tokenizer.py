"""Encode / decode throughput of every tokenizer preset, with achieved GFLOP/s.

For each preset at batch 8 and its native resolution: images/s of encode (encoder ViT +
bottleneck, ``Tokenizer.encode_latents``: the latents alone, as ``softvq encode`` and
``softvq pretokenize`` compute them) and decode; the FLOPs of one pass counted by
``torch.utils.flop_counter`` (FLOPs = 2 x multiply-accumulates); the achieved GFLOP/s as a
percentage of the machine's dense matmul GFLOP/s measured in the same run, for encode, for the
encoder ViT alone (the bottleneck's softmax over K codewords is memory-bound work with few FLOPs),
for ``Tokenizer.encode`` (which also returns the posterior, the argmax indices and the entropy
regulariser) and for decode. Every timed call is
bracketed by matmul measurements (see :func:`paired`), so the ratios stay honest on a host whose
speed drifts. ``--baseline`` also times the plain research implementation (explicit fp32 softmax
attention, the residual update as its own ``addcmul`` after the linear layer, out-of-place GELU;
docs/performance.md says what it shares with ours) and prints the speed ratio. The process keeps
freed memory for reuse (:mod:`softvq.cpu_allocator`, as ``softvq``'s inference commands do),
which the baseline shares; ``--default-malloc`` keeps glibc's defaults to show what that is worth.
On a multi-core CPU our path computes one piece of the batch per core (:mod:`softvq.cpu_streams`);
the baseline runs the whole batch at once, as plain PyTorch does, and ``--whole-batch`` also times
our path that way and prints what the pieces gain.

    python benchmarks/bench_tokenizer.py                       # CPU, fp32, all presets
    python benchmarks/bench_tokenizer.py --presets softvq-s-64 softvq-b-64 --baseline
    python benchmarks/bench_tokenizer.py --presets softvq-s-64 --freeze      # torch.compile, freezing
    python benchmarks/bench_tokenizer.py --device cuda --dtype bf16 --baseline   # on a GPU
    python benchmarks/bench_tokenizer.py --presets softvq-s-64 --default-malloc  # glibc's defaults
    python benchmarks/bench_tokenizer.py --presets softvq-s-64 --whole-batch     # the pieces' gain
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import softvq
from softvq.cpu_allocator import retain_freed_memory
from softvq.cpu_streams import split_over_cores, whole_batch
from softvq.cli.common import positive_int, timing_device_argument
from softvq.networks.vit import reference_math
from softvq.precision import PRECISIONS, cpu_has_matrix_instructions


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: torch.device) -> str:
    """The device a table was measured on: the GPU's name, or the CPU's name, vector and matrix
    instructions and threads (numbers from different hosts differ by tens of percent)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    caps = torch.cpu.get_capabilities()
    matrix = [name.upper().replace("_", "-") for name in ("amx_bf16", "amx_fp16", "avx512_bf16") if caps.get(name)]
    features = ", ".join([torch.backends.cpu.get_cpu_capability(), *matrix])
    return f"CPU {caps.get('cpu_name', '?')} ({features}), {torch.get_num_threads()} threads"


def child_result(cmd: list[str], what: str) -> dict:
    """Run one measurement in a fresh process and return the JSON of its last output line; a failed
    child ends the benchmark with its own error, not a CalledProcessError around its command line."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class MatmulPeak:
    """Dense n x n x n matmul throughput: the machine's practical peak for this dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int | None = None) -> None:
        # a GPU finishes 2048^3 in ~25 us, where launch and sync overheads would understate its peak
        n = n or (8192 if device.type == "cuda" else 2048)
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.device, self.n, self.flops = device, n, 2 * n**3
        self.seen: list[float] = []

    def __call__(self, repeats: int = 3) -> float:
        rate = self.flops / timed(lambda: self.a @ self.b, self.device, repeats) / 1e9
        self.seen.append(rate)
        return rate

    def legend(self, dtype_name: str) -> str:
        """The line under a table of ``paired`` results: the peaks seen and how %peak was taken."""
        return (f"matmul ({self.n}^3, {dtype_name}) measured before and after every timed call: "
                f"{min(self.seen):.0f}-{max(self.seen):.0f} GFLOP/s (median {self.median:.0f}); "
                f"%peak = median over calls of achieved / the mean of its two neighbours "
                f"(in brackets: the 25th-75th percentile over calls). It differs from the plain ratio, "
                f"GFLOP/s / the median matmul (% of median), when the host's speed drifts, and passes 100% for "
                f"a call whose neighbours ran slow. x baseline: the baseline's time / ours, each against its "
                f"own neighbouring matmuls (in brackets: the plain ratio of the median times); x whole batch "
                f"likewise for our path run on the whole batch at once instead of one piece per core")

    @property
    def median(self) -> float:
        return statistics.median(self.seen)


def paired(fn, flops: int, peak: MatmulPeak, device: torch.device, repeats: int, warmup: int = 1):
    """Seconds per call and achieved GFLOP/s as a fraction of the matmul peak.

    Shared hosts drift by tens of percent within a minute, so every timed call is bracketed by a
    peak measurement just before and just after it and the ratio is taken per call. Returns the
    medians over ``repeats`` calls (seconds, fraction of peak) and the fraction's interquartile
    range, which shows how far the host's noise moves a single call.
    """
    for _ in range(warmup):
        fn()
    seconds, fractions = [], []
    for _ in range(repeats):
        before = peak()
        t = timed(fn, device, 1, warmup=0)
        after = peak()
        seconds.append(t)
        fractions.append(flops / t / 1e9 / ((before + after) / 2))
    # "inclusive": the quartiles of the calls seen; the default extrapolates past them (below 0 at two calls)
    q1, _, q3 = statistics.quantiles(fractions, n=4, method="inclusive") if len(fractions) > 1 else fractions * 3
    return statistics.median(seconds), statistics.median(fractions), (q1, q3)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_preset(name: str, device, dtype, batch: int, repeats: int, baseline: bool, peak: MatmulPeak,
                 compile_model: bool = False, whole: bool = False) -> dict:
    model = softvq.Tokenizer.from_preset(name).to(device).eval()
    model.enable_autocast(dtype)  # the user's switch; float32 leaves autocast off
    size = model.config.image_size
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def encode():
        with torch.inference_mode():
            return model.encode_latents(images)

    def full_encode():  # Tokenizer.encode: the latents plus posterior, indices and regulariser
        with torch.inference_mode():
            return model.encode(images)

    latents = encode()

    def decode():
        with torch.inference_mode():
            return model.decode(latents)

    def encoder_network():  # the encoder ViT alone, without the bottleneck, split as encode splits it
        def vit(part):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return model.encoder(part)

        with torch.inference_mode():
            return split_over_cores(vit, images)

    row = {"preset": name, "params_M": model.num_parameters() / 1e6}
    if compile_model:
        # Counting needs the eager modules; the timed calls go through the compiled ones
        # (wrapped once, so each is compiled once).
        eager = model.encoder, model.decoder
        compiled = torch.compile(model.encoder), torch.compile(model.decoder)
    for label, fn in (("enc", encode), ("vit", encoder_network), ("full", full_encode), ("dec", decode)):
        # Counted on the plain path: FlopCounterMode has no formula for the CPU fused SDPA kernel
        # or the in-place fused GEMM and would silently drop those FLOPs.
        with reference_math(model):
            flops = count_flops(fn)
        if compile_model:
            model.encoder, model.decoder = compiled
        seconds, fraction, spread = paired(fn, flops, peak, device, repeats, warmup=2 if compile_model else 1)
        if compile_model:
            model.encoder, model.decoder = eager
        row[f"{label}_img_s"] = batch / seconds
        row[f"{label}_gflops"] = flops / seconds / 1e9
        row[f"{label}_peak_fraction"] = fraction
        row[f"{label}_peak_iqr"] = spread
        row[f"{label}_gflop_per_img"] = flops / batch / 1e9
        if baseline and label in ("enc", "dec"):  # the plain research baseline: explicit softmax attention, fp32
            model.disable_autocast()
            with reference_math(model), whole_batch():
                base_seconds, base_fraction, _ = paired(fn, flops, peak, device, repeats)
            model.enable_autocast(dtype)
            # Both are normalised by the peak measured around them, so host drift cancels.
            row[f"{label}_speedup"] = fraction / base_fraction
            row[f"{label}_time_ratio"] = base_seconds / seconds
        if whole and label in ("enc", "dec"):  # our path on the whole batch at once
            with whole_batch():
                whole_seconds, whole_fraction, _ = paired(fn, flops, peak, device, repeats)
            row[f"{label}_whole_speedup"] = fraction / whole_fraction
            row[f"{label}_whole_time_ratio"] = whole_seconds / seconds
    return row


def significant(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures, never in exponent form: 0.0736, 14.9, 1234.
    (softvq-tiny encodes 0.07 GFLOP an image; one decimal printed 0.1, from which the GFLOP/s
    columns could not be rebuilt.)"""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def percent(row: dict, label: str) -> str:
    """A %peak cell: the median and, in brackets, the interquartile range over calls."""
    q1, q3 = row[f"{label}_peak_iqr"]
    return f"{100 * row[f'{label}_peak_fraction']:.1f}% ({100 * q1:.0f}-{100 * q3:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Bad values are usage errors before any model is built or timed, as in ``softvq bench gen``.
    parser.add_argument("--presets", nargs="+", default=[p for p in softvq.PRESETS if p != "softvq-tiny"],
                        choices=sorted(softvq.PRESETS), metavar="PRESET",
                        help="presets to time (default: all but softvq-tiny; softvq info lists them)")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per pass (default 5)")
    parser.add_argument("--device", default="cpu", type=timing_device_argument)
    parser.add_argument("--dtype", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--baseline", action="store_true", help="also time the fp32 explicit-softmax-attention baseline")
    parser.add_argument("--compile", action="store_true", help="time the encoder/decoder under torch.compile")
    parser.add_argument("--whole-batch", action="store_true",
                        help="also time our path on the whole batch at once, not one piece per core, and print "
                             "the ratio")
    parser.add_argument("--freeze", action="store_true",
                        help="torch.compile with inductor freezing (weights as constants; inference only)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's allocation defaults instead of softvq.cpu_allocator.retain_freed_memory")
    parser.add_argument("--slow-bf16", action="store_true",
                        help="run --dtype bf16/fp16 on a CPU without those matrix instructions anyway")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = PRECISIONS[args.dtype]
    emulated = device.type == "cpu" and args.dtype != "fp32" and not cpu_has_matrix_instructions(args.dtype)
    if emulated and not args.slow_bf16:  # the peak's 2048^3 matmul, twice around every timed call, takes minutes
        parser.error(f"this CPU has no {args.dtype} matrix instructions (AMX or AVX512-{args.dtype.upper()}): "
                     f"{args.dtype} runs emulated, over 10x slower than fp32, and this benchmark would take "
                     f"hours; time fp32, or pass --slow-bf16 to run it anyway")
    retained = not args.default_malloc and retain_freed_memory()
    torch.manual_seed(0)
    if args.freeze:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold weights, fuse GEMM epilogues (inference only)
    peak = MatmulPeak(device, dtype)
    rows = []
    for name in args.presets:
        rows.append(bench_preset(name, device, dtype, args.batch, args.repeats, args.baseline, peak,
                                 args.compile or args.freeze, args.whole_batch))
        print(f"done {name}", flush=True)

    mode = "torch.compile (freezing)" if args.freeze else "torch.compile" if args.compile else "eager"
    allocator = "freed memory retained" if retained else "default malloc"
    print(f"\nTokenizer throughput: batch {args.batch}, {args.dtype}, {mode}, {args.repeats} timed calls a pass, "
          f"{machine(device)}, {allocator}")
    print(peak.legend(args.dtype))
    header = ("preset", "params M", "enc GFLOP/img", "enc img/s", "enc GFLOP/s", "enc %peak", "enc % of median",
              "enc ViT %peak", "encode() %peak", "dec GFLOP/img", "dec img/s", "dec GFLOP/s", "dec %peak",
              "dec % of median")
    if args.baseline:
        header += ("enc x baseline", "dec x baseline")
    if args.whole_batch:
        header += ("enc x whole batch", "dec x whole batch")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["preset"], f"{r['params_M']:.2f}",
                 significant(r["enc_gflop_per_img"]), f"{r['enc_img_s']:.2f}", significant(r["enc_gflops"]),
                 percent(r, "enc"), f"{100 * r['enc_gflops'] / peak.median:.1f}%", percent(r, "vit"),
                 percent(r, "full"), significant(r["dec_gflop_per_img"]), f"{r['dec_img_s']:.2f}",
                 significant(r["dec_gflops"]), percent(r, "dec"), f"{100 * r['dec_gflops'] / peak.median:.1f}%"]
        if args.baseline:
            cells += [f"{r[f'{side}_speedup']:.2f}x ({r[f'{side}_time_ratio']:.2f}x)" for side in ("enc", "dec")]
        if args.whole_batch:
            cells += [f"{r[f'{side}_whole_speedup']:.2f}x ({r[f'{side}_whole_time_ratio']:.2f}x)"
                      for side in ("enc", "dec")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
