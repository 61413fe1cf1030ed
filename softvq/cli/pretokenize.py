"""``softvq pretokenize``: encode images into latent shards for generator training.

    softvq pretokenize runs/latents --bundled --model softvq-tiny          # embedded photos
    softvq pretokenize runs/latents --images data/train --model runs/tok    # a folder (sub-folders = classes)

Shards are written as they fill; an interrupted run continues when the same command is run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softvq.cli.common import (
    add_model_arguments, is_preset, load_tokenizer, non_negative_int, portable_spec, positive_int, resolve_device,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretokenize", help="encode images into latent shards (+ latent mean/std)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder for latents-*.safetensors and meta.json: empty, or an interrupted "
                                "pretokenize to continue")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="FOLDER", help="image folder; first-level sub-folders are classes")
    src.add_argument("--bundled", action="store_true",
                     help="random crops of the photos bundled in scikit-image / scikit-learn (one class per photo)")
    add_model_arguments(p)
    p.add_argument("--crops-per-photo", type=positive_int, default=32,
                   help="with --bundled: crops of each photo (default 32)")
    p.add_argument("--single-class", action="store_true", help="put every image in one class 0")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="with --images: processes that decode images (default 0: this one); on a GPU, "
                        "decoding is the bottleneck without them")
    p.add_argument("--shard-size", type=positive_int, default=4096, help="samples per shard file")
    p.add_argument("--seed", type=int, default=0, help="crop seed for --bundled")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq.generation.pretokenize import bundled_source, folder_source, interrupted_run, pretokenize

    device = resolve_device(args.device)
    out = Path(args.out)
    resuming = interrupted_run(out)  # a finished set is refused here, before anything is written
    kept = out / "tokenizer"
    if is_preset(args.model) and resuming and kept.is_dir():
        # an interrupted run on a random preset continues with the weights it started with
        print(f"continuing with the {args.model} weights saved at {kept}")
        tokenizer = load_tokenizer(str(kept), device, precision=args.precision)
    else:
        tokenizer = load_tokenizer(args.model, device, precision=args.precision)
    size = tokenizer.config.image_size
    if args.bundled:
        source = bundled_source(size, args.crops_per_photo, seed=args.seed, single_class=args.single_class)
    else:
        source = folder_source(args.images, size, single_class=args.single_class, workers=args.workers)
    spec = args.model
    if is_preset(args.model):
        # a preset is re-randomised on every load: keep these exact weights so decoding matches
        spec = str(kept)
        if not resuming:
            tokenizer.save_pretrained(kept)
            print(f"saved the randomly initialised {args.model} next to the latents: {spec}")
    spec = portable_spec(spec)
    result = pretokenize(tokenizer, source, args.out, tokenizer_spec=spec, batch_size=args.batch_size,
                         shard_size=args.shard_size)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable file(s):", file=sys.stderr)
        for line in result.skipped:
            print(f"  {line}", file=sys.stderr)
    print(f"wrote {result.count} latents of shape ({tokenizer.num_tokens}, {tokenizer.latent_dim}) in "
          f"{len(result.shards)} shard(s) to {result.folder}; {len(source.classes)} class(es); "
          f"latent mean {result.latent_mean:.4f}, std {result.latent_std:.4f}")
    return 0
