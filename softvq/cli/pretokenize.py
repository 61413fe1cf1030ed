"""``softvq pretokenize``: encode images into latent shards for generator training.

    softvq pretokenize runs/latents --bundled --model softvq-tiny          # embedded photos
    softvq pretokenize runs/latents --images data/train --model runs/tok    # a folder (sub-folders = classes)

Shards are written as they fill; an interrupted run continues when the same command is run again.
Under torchrun or accelerate launch each process (one per GPU) encodes its share of the images:

    torchrun --nproc_per_node 8 -m softvq.cli.main pretokenize runs/latents --images data/train --model runs/tok
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softvq.checkpoint.specs import is_preset, portable_spec
from softvq.cli.common import (add_model_arguments, add_quiet_argument, load_tokenizer, non_negative_int, positive_int,
                               refuse_unwritable, resolve_device, seed_int)


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
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="images encoded at once (default 32; larger is faster on a GPU while memory allows)")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="with --images: processes that decode images (default 0: this one); on a GPU, "
                        "decoding is the bottleneck without them")
    p.add_argument("--shard-size", type=positive_int, default=4096, help="samples per shard file")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of a preset's random weights (as encode's) and of --bundled's crops")
    add_quiet_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq.run_lock import lock_run_folder
    from softvq.training.accelerator import launched_accelerator, said_by_main_process

    accelerator = launched_accelerator(cpu=resolve_device(args.device).type == "cpu")
    device = accelerator.device if accelerator is not None else resolve_device(args.device)
    main_process = accelerator is None or accelerator.is_main_process
    out = Path(args.out)
    if Path(args.model).expanduser().is_file():  # before OUT is made
        from softvq.generation.run_inputs import checkpoint_file_refused

        raise said_by_main_process(checkpoint_file_refused("--model", args.model), main_process)
    try:
        refuse_unwritable(out, "OUT", "pretokenize writes a folder of latent shards")
    except OSError as exc:  # every process of a launched run finds it: the main process says it
        raise said_by_main_process(exc, main_process) from None
    with lock_run_folder(out, accelerator):  # one pretokenize per folder, its kept tokenizer included
        return _in_locked_folder(args, out, accelerator, device, main_process)


def _in_locked_folder(args: argparse.Namespace, out: Path, accelerator, device, main_process: bool) -> int:
    from softvq.generation.latent_sources import bundled_source, folder_source
    from softvq.generation.pretokenize import interrupted_run, interrupted_tokenizer, pretokenize
    from softvq.training.accelerator import decided_by_main_process

    # a finished set is refused here, before anything is written
    resuming = decided_by_main_process(accelerator, lambda: interrupted_run(out))
    kept = out / "tokenizer"
    spec = args.model
    if is_preset(args.model):
        # a preset is re-randomised on every load: keep these exact weights so decoding matches, and
        # give the same ones to every process
        spec = str(kept)
        if resuming and not kept.is_dir():
            started = interrupted_tokenizer(out)
            if started not in (str(kept.expanduser().resolve()), str(kept)):  # not a random preset's run
                raise FileExistsError(f"{out} holds an interrupted pretokenize started with --model {started}, not "
                                      f"{args.model}; rerun it with that model to continue, or choose an empty folder")
            raise FileNotFoundError(f"{out} holds an interrupted pretokenize with random {args.model} weights, but "
                                    f"{kept}, which kept them, is gone; choose an empty folder")
        if resuming:
            if main_process:
                print(f"continuing with the {args.model} weights saved at {kept}")
        elif main_process:
            import torch

            torch.manual_seed(args.seed)  # the same random weights as encode / eval --model PRESET --seed
            load_tokenizer(args.model, device, precision=args.precision).save_pretrained(kept)
            print(f"saved the randomly initialised {args.model} next to the latents: {spec}")
        if accelerator is not None:
            accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(spec, device, precision=args.precision)
    size = tokenizer.config.image_size
    if args.bundled:
        source = bundled_source(size, args.crops_per_photo, seed=args.seed, single_class=args.single_class)
    else:
        source = folder_source(args.images, size, single_class=args.single_class, workers=args.workers)
    result = pretokenize(tokenizer, source, args.out, tokenizer_spec=portable_spec(spec), batch_size=args.batch_size,
                         shard_size=args.shard_size, accelerator=accelerator, progress=not args.quiet)
    if not main_process:
        return 0
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable file(s):", file=sys.stderr)
        for line in result.skipped:
            print(f"  {line}", file=sys.stderr)
    processes = "" if accelerator is None else f" by {accelerator.num_processes} processes"
    print(f"wrote {result.count} latents of shape ({tokenizer.num_tokens}, {tokenizer.latent_dim}) in "
          f"{len(result.shards)} shard(s) to {result.folder}{processes}; {len(source.classes)} class(es); "
          f"latent mean {result.latent_mean:.4f}, std {result.latent_std:.4f}")
    if result.latent_std == 0:  # said now, not when train-generator refuses the set later
        print("warning: every latent is the same number (std 0): the tokenizer's latents collapsed, and "
              "train-generator cannot normalise them, (z - mean) / std; check the tokenizer's weights",
              file=sys.stderr)
    return 0
