"""WeTok Tab. 1 on our bottleneck: peak memory of LFQ, BSQ and GQ as the latent width d grows.

WeTok's point (Sec. 3.2, Tab. 1): LFQ's entropy loss enumerates all 2^d codes, so its memory
explodes with d (OOM from d = 24 on their GPU), while splitting the d channels into groups keeps
it flat. The three rows are one module, :class:`softvq.bottlenecks.lfq.GroupedLookupFree`
(``kind: lfq``), with a different group count:

* LFQ: one group of d channels (2^d codes);
* BSQ-like: d groups of one channel (WeTok Sec. 3.2 calls g = d BSQ-like);
* GQ: groups of d' = 8 channels (WeTok's setting for Tab. 1), d / 8 groups of 2^8 codes.

Measured: one forward + backward of the bottleneck alone (latents, entropy and commit losses all
in the loss), on ``--tokens`` tokens of width d, each cell in a fresh process. Peak memory is the
growth of the resident set (CPU, ``ru_maxrss``) or ``max_memory_allocated`` (CUDA) over the
inputs. WeTok measures a whole training step of its CNN tokenizer (10.5 GB of which the quantizer
is the part that changes); here only the quantizer's part is measured. An LFQ with more than
2^16 codes per group is refused when it is built (``lfq_groups`` must make d' <= 16): the table
prints what its probabilities alone would take, the reason WeTok's runs ran out of memory.

    python benchmarks/bench_lfq_memory.py                     # d = 8 .. 40, 4096 tokens, CPU
    python benchmarks/bench_lfq_memory.py --tokens 16384 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import torch

from softvq.bottlenecks.lfq import MAX_GROUP_BITS, GroupedLookupFree
from softvq.cli.common import positive_int, timing_device_argument

GQ_BITS = 8  # WeTok Tab. 1: "We set d' = 8 in GFQ"


def groups_of(method: str, dim: int) -> int | None:
    """The group count of a row at width ``dim`` (None: GQ needs d divisible by d' = 8)."""
    if method == "LFQ":
        return 1
    if method == "BSQ":
        return dim
    return dim // GQ_BITS if dim % GQ_BITS == 0 else None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(dim: int, groups: int, tokens: int, device: str) -> None:
    """One forward + backward in this (fresh) process; prints {"peak": bytes} as JSON."""
    gen = torch.Generator().manual_seed(0)
    bottleneck = GroupedLookupFree(dim, groups=groups).to(device)
    z = torch.randn(tokens, dim, generator=gen).to(device).requires_grad_()
    upstream = torch.randn(tokens, dim, generator=gen).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()
    out = bottleneck(z)
    ((out.latents * upstream).sum() + sum(out.losses.values())).backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak": peak}))


def cell(method: str, dim: int, args, measured: dict[tuple[int, int], tuple[str, str]]) -> str:
    from bench_tokenizer import child_result  # this folder; imported here, not in the measured children

    groups = groups_of(method, dim)
    if (dim, groups) in measured:  # the same module (GQ's one group at d = 8 is LFQ): one measurement,
        value, first = measured[(dim, groups)]  # or RSS noise would read as a difference
        return f"{value} (the same module as {first})"
    if groups is None:
        return "—"
    bits = dim // groups
    if bits > MAX_GROUP_BITS:  # refused at construction: say what the probabilities alone would take
        need = args.tokens * groups * 2.0**bits * 4
        return f"refused (probs {need / 2**30:,.0f} GiB)"
    cmd = [sys.executable, __file__, "--worker", str(dim), str(groups), "--tokens", str(args.tokens),
           "--device", args.device]
    value = f"{child_result(cmd, f'{method} d={dim}')['peak'] / 2**20:,.1f} MiB"
    measured[(dim, groups)] = (value, method)
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=positive_int, nargs="+", default=[8, 16, 24, 32, 40],
                   help="latent widths d (WeTok Tab. 1: 8 16 24 32 40)")
    p.add_argument("--tokens", type=positive_int, default=4096, help="tokens in the batch (B x L)")
    p.add_argument("--device", default="cpu", type=timing_device_argument)
    p.add_argument("--worker", nargs=2, type=positive_int, metavar=("DIM", "GROUPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.device = str(args.device)
    if args.worker:
        worker(*args.worker, args.tokens, args.device)
        return
    from bench_tokenizer import machine

    print(f"# WeTok Tab. 1 (quantizer only): peak memory of one forward + backward, {args.tokens} tokens, "
          f"{machine(torch.device(args.device))}\n")
    print("| method | " + " | ".join(f"d = {d}" for d in args.dims) + " |")
    print("|---|" + "---|" * len(args.dims))
    measured: dict[tuple[int, int], tuple[str, str]] = {}
    for method in ("LFQ", "BSQ", "GQ"):
        label = "BSQ as WeTok casts it" if method == "BSQ" else method
        print(f"| {label} | " + " | ".join(cell(method, d, args, measured) for d in args.dims) + " |", flush=True)


if __name__ == "__main__":
    main()
