"""``softvq train-generator``: train a DiT, SiT or MAR on latent shards from ``softvq pretokenize``.

    softvq train-generator --latents runs/latents --out runs/sit --objective sit --size XL
    softvq train-generator --latents runs/latents --out runs/sit-tiny --width 128 --depth 4 --heads 4 --steps 600
    softvq train-generator --latents runs/latents --out runs/mar-h --objective mar --epochs 500

Fields left unset take the objective's recipe (paper Sec. 4.1 and supp. C.2): DiT/SiT XL for 3M
steps, lr 1e-4, batch 256; MAR H for 500 epochs with 100 of warm-up, lr 2e-4, batch 2048, AdamW β2
0.95, weight decay 0.02, gradient clipping 3.0.

Same machinery as the tokenizer trainer: Accelerate (``accelerate launch -m softvq.cli.main
train-generator ...`` for several processes), EMA, atomic checkpoints, progress bar, JSONL log. A
run resumes by itself: when ``--out`` already holds checkpoints, training continues from the newest
(with the same model settings; others are an error). Ctrl-C or SIGTERM writes a checkpoint after
the current step and stops (exit status 130); a second one stops at once. Every flag is a field of
:class:`softvq.generation.train.GeneratorTrainConfig`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from softvq.generation.train import add_arguments

    p = subparsers.add_parser("train-generator", help="train a DiT/SiT/MAR on pretokenized latents",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq.generation.train import run_from_args

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    return run_from_args(fields)
