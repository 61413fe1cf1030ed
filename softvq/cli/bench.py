"""``softvq bench TARGET``: efficiency tables measured on this machine.

    softvq bench gen                          # DiT/SiT S..XL x {32, 64 tokens, 16x16/2, 32x32/2, 64x64/2}
    softvq bench gen --sizes XL --no-throughput   # GFLOPs only (counted on the meta device, nothing timed)
    softvq bench gen --device cuda            # throughput of every size on a GPU
    (then MAR-H's GFLOPs and sampling throughput, paper Tab. 1; --no-mar leaves them out)

Targets are sub-commands so others (e.g. the tokenizer) can be added beside ``gen``.
"""

from __future__ import annotations

import argparse

from softvq.cli.common import non_negative_float, positive_int, timing_device_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="efficiency tables (bench gen: generator GFLOPs and throughput)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    gen = targets.add_parser("gen", help="DiT / SiT GFLOPs per image and sampling throughput (paper Tab. 1)",
                             description="DiT / SiT forward GFLOPs per image (multiply-accumulates, counted on the "
                                         "meta device) and sampling throughput in images/s for every kind, size and "
                                         "latent layout, beside paper Tab. 1; then MAR-H's GFLOPs and "
                                         "sampling throughput.")
    add_gen_arguments(gen)
    gen.set_defaults(func=run_gen)


def add_gen_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``softvq bench gen`` (Tab. 1's generator GFLOPs and throughput)."""
    from softvq.generation.benchmark import LAYOUTS

    p.add_argument("--kinds", nargs="+", default=["dit", "sit"], choices=["dit", "sit"])
    p.add_argument("--sizes", nargs="+", default=["S", "B", "L", "XL"], choices=["S", "B", "L", "XL"])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--device", default="cpu", type=timing_device_argument, help="cpu (default), cuda, auto")
    p.add_argument("--batch", "--batch-size", dest="batch", type=positive_int, default=64,
                   help="batch for throughput (paper: 64); --batch-size as the other commands call it")
    p.add_argument("--sampling-steps", type=positive_int, default=250,
                   help="network evaluations per image to extrapolate to")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed forward passes (default 1 on CPU, 5 on GPU)")
    p.add_argument("--max-gmacs-cpu", type=non_negative_float, default=6.0,
                   help="on CPU, skip throughput of models above this many GMACs per image (default 6)")
    p.add_argument("--no-throughput", action="store_true", help="GFLOPs and parameters only")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-mar", action="store_true",
                   help="leave out the MAR-H table (paper Tab. 1: GFLOPs and sampling throughput)")


def run_gen(args: argparse.Namespace) -> int:
    """Print Tab. 1's generator table measured on this machine."""
    import torch

    from softvq.generation.benchmark import format_table, generator_table, mar_table

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)  # resolved and checked by device_argument
    repeats = args.repeats or (1 if device.type == "cpu" else 5)
    rows = generator_table(args.kinds, args.sizes, args.layouts, device=device, batch=args.batch,
                           sampling_steps=args.sampling_steps, repeats=repeats, max_gmacs_cpu=args.max_gmacs_cpu,
                           throughput=not args.no_throughput)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(format_table(rows, label, args.sampling_steps, args.batch))
    if not args.no_mar:
        print()
        print(mar_table(throughput=not args.no_throughput, device=device, batch=args.batch,
                        max_gmacs_cpu=args.max_gmacs_cpu))
    return 0
