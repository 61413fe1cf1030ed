"""``softvq train-generator``: train a DiT or SiT on latent shards from ``softvq pretokenize``.

    softvq train-generator --latents runs/latents --out runs/sit --objective sit --size XL
    softvq train-generator --latents runs/latents --out runs/sit-tiny --width 128 --depth 4 --heads 4 --steps 600

Same machinery as the tokenizer trainer: Accelerate (``accelerate launch -m softvq.cli.main
train-generator ...`` for several processes), EMA, atomic checkpoints, ``--resume``, progress bar,
JSONL log. Every flag is a field of :class:`softvq.generation.train.GeneratorTrainConfig`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from softvq.generation.train import add_arguments

    p = subparsers.add_parser("train-generator", help="train a DiT/SiT on pretokenized latents",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq.generation.train import run_from_args

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    return run_from_args(fields)
