"""Generator efficiency table (paper Tab. 1): DiT / SiT GMACs per image (the "GFLOPs" of the paper
and of DiT: multiply-accumulates) and sampling throughput
for sizes S..XL on 1D latent tokens (32, 64) and 2D grids (16x16, 32x32, patch 2).

Same as ``softvq bench gen``; every flag of that command works here:

    python benchmarks/bench_generation.py                     # CPU: throughput for the small models
    python benchmarks/bench_generation.py --device cuda       # all sizes on a GPU
"""

from __future__ import annotations

import argparse
import sys

from softvq.cli.bench import add_gen_arguments, run_gen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gen_arguments(parser)
    return run_gen(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
