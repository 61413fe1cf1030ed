"""Peak memory and time of one SoftVQ forward + backward: straightforward vs memory-lean (chunked).

The target: at B·L = 16384 tokens, K = 8192 codewords, D = 32, forward + backward, the lean
version must use at most 25% of the straightforward version's peak memory, at most 1.3x its time,
and give the same outputs and gradients within 1e-5 relative (float32).

The workload is the soft assignment of :mod:`softvq.bottlenecks.soft_assign` with the release's
semantics by default (cosine logits, detached codebook in the logits, τ = 0.07, entropy
temperature 0.01) and the loss  <latents, g> + (H(q) − H(E q)),  so every gradient path is used
(latents, token entropy and the batch-level term).

How memory is measured:
* CPU: every variant runs in a fresh subprocess. Peak = the process's resident-set high-water mark
  (``resource.getrusage(...).ru_maxrss``) after one forward + backward, minus its resident set just
  before it (inputs already built). This counts every byte torch allocates and touches.
* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the step.
Time is the median over ``--repeats`` steps after that first step, over ``--rounds`` rounds that
alternate the variants (the CPU is shared, so alternating evens out the noise).

    python benchmarks/bench_softvq_memory.py                  # the issue's size, CPU
    python benchmarks/bench_softvq_memory.py --tokens 2048    # quicker
    python benchmarks/bench_softvq_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

from softvq.bottlenecks.soft_assign import auto_chunk_size, soft_assign
from softvq.cli.common import non_negative_int, positive_int, timing_device_argument



def make_inputs(tokens: int, codes: int, dim: int, device: str, distance: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=gen)
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
    book = torch.randn(codes, dim, generator=gen) / dim**0.5
    if distance == "cosine":
        book = torch.nn.functional.normalize(book, dim=-1)
    upstream = torch.randn(tokens, dim, generator=gen)
    x, book, upstream = (t.to(device) for t in (x, book, upstream))
    scale = torch.tensor(1 / 0.07, device=device)
    return x.requires_grad_(), book.requires_grad_(), scale.requires_grad_(), upstream


def step(x, book, scale, upstream, chunk: int, distance: str, detach: bool, tau_h: float | None):
    for t in (x, book, scale):
        t.grad = None
    out = soft_assign(x, book, scale=scale, distance=distance, detach_codebook_in_logits=detach,
                      entropy_temperature=tau_h, chunk_size=chunk)
    post = out.mean_posterior
    kl = out.token_entropy + (post * torch.log(post.clamp_min(1e-30))).sum()
    ((out.latents * upstream).sum() + kl).backward()
    return out.latents.detach(), kl.detach(), x.grad, book.grad, scale.grad


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One variant in this (fresh) process: print {"peak": bytes, "times": [s, ...]} as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    tau_h = None if args.entropy_temperature <= 0 else args.entropy_temperature
    x, book, scale, up = make_inputs(args.tokens, args.codes, args.dim, args.device, args.distance)
    run = lambda: step(x, book, scale, up, args.lean_chunk, args.distance, not args.no_detach, tau_h)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss()
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peak": peak, "times": times}))


def check(args) -> None:
    """Both variants in one process: the largest relative difference of outputs and gradients."""
    tau_h = None if args.entropy_temperature <= 0 else args.entropy_temperature
    x, book, scale, up = make_inputs(args.tokens, args.codes, args.dim, args.device, args.distance)
    lean = [t.clone() for t in step(x, book, scale, up, args.lean_chunk, args.distance, not args.no_detach, tau_h)]
    plain = step(x, book, scale, up, 0, args.distance, not args.no_detach, tau_h)
    names = ["latents", "kl", "grad x", "grad codebook", "grad 1/tau"]
    rel = {n: ((a - b).norm() / b.norm().clamp_min(1e-30)).item() for n, a, b in zip(names, lean, plain)}
    print(json.dumps(rel))


def spawn(args, mode: str, chunk: int) -> dict:
    from bench_tokenizer import child_result  # this folder; imported here, not in the measured children

    cmd = [sys.executable, __file__, f"--{mode}", "--lean-chunk", str(chunk)]  # 0: straightforward
    for key in ("tokens", "codes", "dim", "device", "distance", "repeats", "threads", "entropy_temperature"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.no_detach:
        cmd.append("--no-detach")
    return child_result(cmd, f"{mode} (chunk {chunk})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Bad values are usage errors before any process is started, as in ``softvq bench gen``.
    p.add_argument("--tokens", type=positive_int, default=16384, help="B*L tokens (default: batch 256 x 64 tokens)")
    p.add_argument("--codes", type=positive_int, default=8192, help="codebook size K")
    p.add_argument("--dim", type=positive_int, default=32, help="latent dim D")
    p.add_argument("--distance", choices=["cosine", "l2"], default="cosine")
    p.add_argument("--entropy-temperature", type=float, default=0.01, help="<=0: the posterior's own")
    p.add_argument("--no-detach", action="store_true", help="codebook not detached in the logits")
    p.add_argument("--device", default="cpu", type=timing_device_argument)
    p.add_argument("--chunk", type=positive_int, default=None, help="lean chunk (default: the automatic one)")
    p.add_argument("--lean-chunk", type=non_negative_int, default=None, help=argparse.SUPPRESS)  # a spawned variant's
    p.add_argument("--repeats", type=positive_int, default=2, help="timed steps per process")
    p.add_argument("--rounds", type=positive_int, default=2, help="alternating rounds of both variants")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.check:
        return check(args)

    from tqdm import tqdm

    lean_chunk = args.chunk or auto_chunk_size(args.codes, args.device)
    variants = {"straightforward": 0, f"lean (chunk {lean_chunk})": lean_chunk}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    jobs = [(r, name) for r in range(args.rounds) for name in variants]
    for _, name in tqdm(jobs, desc="fwd+bwd runs", unit="process"):
        results[name].append(spawn(args, "worker", variants[name]))
    rel = spawn(args, "check", lean_chunk)

    base_peak = max(r["peak"] for r in results["straightforward"])
    base_time = statistics.median(t for r in results["straightforward"] for t in r["times"])
    print(f"\nSoftVQ forward+backward  T={args.tokens} K={args.codes} D={args.dim}  {args.distance}, "
          f"detached codebook in logits={not args.no_detach}, entropy temperature="
          f"{args.entropy_temperature if args.entropy_temperature > 0 else 'posterior'}  device={args.device} "
          f"threads={args.threads or torch.get_num_threads()}")
    print("memory: " + ("CUDA max_memory_allocated" if args.device.startswith("cuda")
                        else "RSS high-water of a fresh process minus RSS before the step"))
    print("vs plain: this variant's peak memory and time over the straightforward one's (lower is better)")
    print(f"{'variant':<22}{'peak MiB':>10}{'vs plain':>10}{'time ms':>10}{'vs plain':>10}")
    for name, runs in results.items():
        peak = max(r["peak"] for r in runs)
        t = statistics.median(x for r in runs for x in r["times"])
        print(f"{name:<22}{peak / 2**20:>10.0f}{peak / base_peak:>10.1%}{1e3 * t:>10.1f}{t / base_time:>9.2f}x")
    print("relative difference lean vs straightforward (||a-b||/||b||): "
          + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))


if __name__ == "__main__":
    main()
