"""``softvq train-generator``: train a DiT, SiT or MAR on latent shards from ``softvq pretokenize``.

    softvq train-generator --latents runs/latents --out runs/sit --objective sit --size XL
    softvq train-generator --latents runs/latents --out runs/sit-tiny --width 128 --depth 4 --heads 4 --steps 600
    softvq train-generator --latents runs/latents --out runs/mar-h --objective mar --epochs 500
    softvq train-generator --latents runs/latents --out runs/sit-xl --steps 4000000 --export-at 400000 1000000 2000000 3000000

``--export-at`` also writes the EMA generator at those steps to ``RUN/generator-step-NNNNNNNN`` (the
generation over training of supp. Tab. 9, arXiv Tab. 8; kept whatever ``--keep-checkpoints`` deletes),
and ``softvq generate`` also takes a kept checkpoint, ``RUN/checkpoints/step-NNNNNNNN.pt``, with its
EMA weights.

Fields left unset take the objective's recipe (paper Sec. 4.1 and supp. C.2): DiT/SiT XL for 3M
steps, lr 1e-4, batch 256; MAR H for 500 epochs with 100 of warm-up, lr 2e-4, batch 2048, AdamW β2
0.95, weight decay 0.02, gradient clipping 3.0.

Same machinery as the tokenizer trainer: Accelerate (``accelerate launch -m softvq.cli.main
train-generator ...`` for several processes), EMA, atomic checkpoints, progress bar, JSONL log. A
run resumes by itself: when ``--out`` already holds checkpoints, training continues from the newest
(with the same model settings; others are an error). Without ``--latents``, the settings come from
``RUN/config.json``: ``--out RUN`` alone continues a run, ``--out RUN --steps N`` lengthens it. Ctrl-C or SIGTERM writes a checkpoint after
the current step and stops (exit status 130); a second one stops at once. A step whose loss or
gradient is not finite is skipped; after ``--max-nonfinite`` of them the run stops (exit status 3),
naming its last good checkpoint, and never saves non-finite weights. Every flag is a field of
:class:`softvq.generation.train_config.GeneratorTrainConfig`, which holds the recipes (the loop is
:mod:`softvq.generation.train`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from softvq.cli.common import add_quiet_argument

if TYPE_CHECKING:
    from softvq.generation.train_config import GeneratorTrainConfig

# --help of each GeneratorTrainConfig field; "(recipe)" marks fields that default to the objective's recipe.
FLAG_HELP: dict[str, str] = {
    "latents": "latent folder written by `softvq pretokenize` (required for a new run; a rerun with --out RUN "
               "continues from its config.json)",
    "out": "run folder: checkpoints, log.jsonl, config.json and generator/ (default runs/generator); "
           "a folder with checkpoints continues",
    "objective": "sit (velocity, paper's main), dit (ε + learned σ) or mar (masked autoregressive + diffusion head)",
    "size": "DiT/SiT S, B, L, XL or MAR B, L, H (recipe: XL / H)",
    "width": "transformer width; overrides --size's",
    "depth": "number of blocks; overrides --size's",
    "heads": "attention heads; overrides --size's",
    "head_width": "MAR: width of the diffusion head's MLP; overrides --size's",
    "head_depth": "MAR: residual blocks of the diffusion head; overrides --size's",
    "buffer_size": "MAR: class-embedding buffer tokens (default 64; 4 is far cheaper on few tokens)",
    "diffusion_batch_mul": "MAR: noise draws per token for the head's loss (default 4)",
    "grad_checkpointing": "MAR: recompute activations in backward to save memory",
    "path": "SiT interpolant: cosine (GVP, default) or linear",
    "schedule": "DiT / MAR noise schedule: cosine (supp. C.2, default) or linear",
    "diffusion_steps": "DiT / MAR diffusion steps T (default 1000)",
    "vlb_weight": "DiT: weight of the L_vlb term that trains σ (default 1)",
    "class_dropout": "probability of dropping the label, for classifier-free guidance (default 0.1)",
    "steps": "optimiser steps (recipe: DiT/SiT 3000000, Sec. 4.1's XL runs; Tab. 3's SiT-L: 400000)",
    "epochs": "training length in passes over the latent set, instead of --steps (recipe: MAR 500)",
    "batch_size": "global batch (recipe: 256; MAR 2048)",
    "lr": "peak learning rate (recipe: 1e-4; MAR 2e-4)",
    "weight_decay": "AdamW weight decay, not on biases and norms (recipe: 0; MAR 0.02)",
    "adam_beta2": "AdamW β2 (recipe: 0.999; MAR 0.95)",
    "warmup_steps": "linear learning-rate warm-up from 0, then constant (recipe: DiT/SiT 0)",
    "warmup_epochs": "the warm-up in passes over the latent set, instead of --warmup-steps (recipe: MAR 100)",
    "max_grad_norm": "gradient clipping norm, 0 = off (recipe: off; MAR 3.0)",
    "ema_decay": "EMA decay of the exported weights (default 0.9999)",
    "ema_warmup": "EMA decay min(decay, (1+n)/(10+n)), so short runs do not average the random init (ours; "
                  "DiT/SiT's plain decay: --no-ema-warmup, which differs from it only in the first ~10^5 steps)",
    "max_nonfinite": "steps with a non-finite loss or gradient are skipped; the run stops after this many "
                     "(default 20)",
    "mixed_precision": "no, bf16 or fp16 (Accelerate's autocast, fp16 on a GPU only; the paper's DiT runs used bf16, "
                       "supp. C.2)",
    "seed": "seed of the initialisation, the batch order and the noise",
    "log_every": "steps between log lines (default 50)",
    "checkpoint_every": "steps between checkpoints (default 5000; also written when stopped)",
    "keep_checkpoints": "checkpoints kept (default 3; 0 keeps them all, as softvq train's run.keep_checkpoints)",
    "export_at": "steps at which the EMA generator is also exported, to RUN/generator-step-NNNNNNNN, kept whatever "
                 "--keep-checkpoints deletes (supp. Tab. 9, arXiv Tab. 8: 400000 1000000 2000000 3000000 4000000); "
                 "a rerun may add steps, and exports the one it is at from its last checkpoint",
    "tokenizer": "tokenizer SPEC `generate` decodes with (default: the one in the latents' meta.json): a preset, "
                 "a tokenizer folder or run, a hub id or official:...; checked at the start",
    "cpu": "train on the CPU even where a GPU is present",
}
def flag_type(hint: typing.Any) -> tuple[type, tuple[str, ...] | None]:
    """The argparse type and choices of a field annotated ``hint``: ``int`` for ``int``, for
    ``int | None`` and for ``list[int]`` (one or more values); ``str`` and the values of a
    ``Literal[...]`` (with or without ``| None``)."""
    if typing.get_origin(hint) is list:
        return flag_type(typing.get_args(hint)[0])
    unions = (typing.Union, types.UnionType)
    members = [arg for arg in typing.get_args(hint) if arg is not type(None)] if typing.get_origin(hint) in unions else [hint]
    if len(members) == 1 and typing.get_origin(members[0]) is Literal:
        return str, typing.get_args(members[0])
    if len(members) != 1 or not isinstance(members[0], type):
        raise TypeError(f"no command-line type for a field of type {hint!r}")
    return members[0], None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One ``--flag`` per :class:`~softvq.generation.train_config.GeneratorTrainConfig` field, typed by its
    annotation; ``--quiet`` turns the progress bar off. A flag not given is absent from the parsed
    namespace (no default), so :func:`given_config` can tell it from one given at its default."""
    from softvq.generation.train_config import GeneratorTrainConfig, flag_name

    hints = typing.get_type_hints(GeneratorTrainConfig)
    for f in dataclasses.fields(GeneratorTrainConfig):
        flag, unset = flag_name(f.name), argparse.SUPPRESS
        kind, choices = flag_type(hints[f.name])
        help_text = FLAG_HELP[f.name]  # a new field without help fails here and in the tests
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=unset, help=help_text)
        elif typing.get_origin(hints[f.name]) is list:
            parser.add_argument(flag, type=kind, nargs="+", default=unset, help=help_text, metavar="STEP")
        else:
            parser.add_argument(flag, type=kind, default=unset, help=help_text, choices=choices)
    add_quiet_argument(parser)
    return parser


def given_config(args: argparse.Namespace) -> "GeneratorTrainConfig":
    """The flags given, over the settings of the run in ``--out`` as its ``config.json`` records
    them where it is a train-generator run (else over the library's defaults): ``--out RUN`` alone
    continues a run, ``--out RUN --steps N`` lengthens it, ``--latents`` says where its latent set
    is now (what a rerun may change is checked when it starts)."""
    from softvq.generation.train_config import GeneratorTrainConfig, config_from_record, flag_name, recorded_run

    names = {f.name for f in dataclasses.fields(GeneratorTrainConfig)}
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    saved = Path(given.get("out", GeneratorTrainConfig.out)).expanduser() / "config.json"
    # None where damaged: the run's checkpoints still record its settings, checked at the start
    payload = recorded_run(saved)
    recorded = payload.get("train") if payload is not None else None
    if not isinstance(recorded, dict):
        return GeneratorTrainConfig(**given)  # a new run; another kind of folder is named when it starts
    unknown = sorted(set(recorded) - names)
    if unknown:
        raise ValueError(f"{saved} records settings this version does not have ({', '.join(unknown)}); continue it "
                         f"with the softvq version that started it, or pass --latents and the flags yourself")
    from softvq.training.accelerator import first_launched_process

    flags = ", ".join(flag_name(name) for name in sorted(given) if name != "out")
    if first_launched_process():
        print(f"continuing {saved.parent} with the settings its config.json records"
              + (f" and the flags given ({flags})" if flags else ""), file=sys.stderr)
    return config_from_record(recorded, **{**given, "out": str(saved.parent)})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-generator", help="train a DiT/SiT/MAR on pretokenized latents",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq.generation.train import train_generator
    from softvq.training.accelerator import first_launched_process
    from softvq.training.stopping import NonFiniteLossError

    cfg = given_config(args)
    try:
        result = train_generator(cfg, progress=not args.quiet)
    except NonFiniteLossError as exc:  # every process stops; one says why
        if first_launched_process():
            print(f"softvq train-generator: error: {exc}", file=sys.stderr)
        return 3
    if first_launched_process():  # one result line for a launched run, not one per process
        print(json.dumps(result))
    return 130 if result["stopped"] else 0
