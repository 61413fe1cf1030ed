"""Page faults and time of a repeated CPU forward, with and without ``retain_freed_memory``.

:func:`softvq.cpu_allocator.retain_freed_memory` switches glibc's ``mmap`` off and keeps freed heap
mapped, so a forward that allocates and frees activations of several MiB reuses pages instead of
faulting in fresh ones. This prints, for two workloads of S-width ViT blocks (384 wide, 6 heads,
321 tokens), the minor page faults and the wall time of one forward under glibc's default policy
and with the setting applied:

* ``blocks-under-32MiB``: batch 8, 3 blocks; every activation is 4-16 MiB;
* ``block-over-32MiB``: batch 24, 1 block; the MLP's hidden activation is 47 MiB, above the 32 MiB
  that glibc's mmap threshold can reach.

The setting is process-wide, so every measurement runs in a fresh process (``--processes`` per
workload and policy, alternating the two policies). Each process runs 3 untimed forwards (the heap
settles), then ``--forwards`` measured ones and reports their medians: an occasional heap growth
is not the steady state. glibc's default settles per process: on an Intel Xeon host 3 of 10 fresh
processes of the under-32 MiB workload ran at 0 faults and 7 at about 17,000, so the table shows
the range over processes.

    python benchmarks/bench_cpu_allocator.py
    python benchmarks/bench_cpu_allocator.py --processes 5 --threads 4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

from softvq.cli.common import positive_int


WORKLOADS = {"blocks-under-32MiB": (8, 3), "block-over-32MiB": (24, 1)}  # name: (batch, depth)
POLICIES = ("default", "retain")


def worker(args) -> None:
    """One workload under one policy in this (fresh) process: print medians as JSON."""
    import torch

    from softvq.cpu_allocator import retain_freed_memory
    from softvq.networks.vit import Block

    applied = retain_freed_memory() if args.policy == "retain" else False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blocks = [Block(384, 6) for _ in range(args.depth)]
    x = torch.randn(args.batch, 321, 384)

    def forward():
        h = x
        for block in blocks:
            h = block(h)

    faults, times = [], []
    with torch.inference_mode():
        for _ in range(3):
            forward()
        for _ in range(args.forwards):
            start, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    print(json.dumps({"faults": statistics.median(faults), "seconds": statistics.median(times),
                      "applied": applied}))


def spawn(args, policy: str, batch: int, depth: int) -> dict:
    from bench_tokenizer import child_result  # this folder; imported here, not in the measured children

    cmd = [sys.executable, __file__, "--worker", "--policy", policy, "--batch", str(batch), "--depth", str(depth),
           "--forwards", str(args.forwards), "--threads", str(args.threads)]
    return child_result(cmd, f"{policy} (batch {batch}, depth {depth})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Bad values are usage errors before any process is started.
    p.add_argument("--processes", type=positive_int, default=3, help="fresh processes per workload and policy")
    p.add_argument("--forwards", type=positive_int, default=9, help="measured forwards per process (median)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--policy", choices=POLICIES, default="default", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=positive_int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=positive_int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    libc = " ".join(platform.libc_ver()) or "unknown C library"
    print(f"CPU forward of S-width ViT blocks, {args.threads} threads, {libc}; per workload and policy "
          f"{args.processes} fresh processes, each the median of {args.forwards} forwards")
    if platform.libc_ver()[0] != "glibc":
        print("(not glibc: retain_freed_memory does nothing here, both policies are the same)")
    print("vs default: ms/forward over the default policy's (below 1 is faster)")
    header = f"{'workload':<20}{'policy':<9}{'faults/forward (min-max)':>26}{'ms/forward (median)':>21}{'vs default':>12}"
    print(header)
    for name in args.workloads:
        batch, depth = WORKLOADS[name]
        runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
        for _ in range(args.processes):  # alternating, so drift on a shared host hits both alike
            for policy in POLICIES:
                runs[policy].append(spawn(args, policy, batch, depth))
        base = statistics.median(r["seconds"] for r in runs["default"])
        for policy in POLICIES:
            faults = [r["faults"] for r in runs[policy]]
            ms = statistics.median(r["seconds"] for r in runs[policy])
            spread = f"{min(faults):,.0f}-{max(faults):,.0f}"
            print(f"{name:<20}{policy:<9}{spread:>26}{1e3 * ms:>21.1f}{ms / base:>11.2f}x")


if __name__ == "__main__":
    main()
