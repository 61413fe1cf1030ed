"""``softvq generate``: class labels -> latents (DiT / SiT / MAR sampler) -> tokenizer.decode -> images.

    softvq generate runs/sit-tiny/generator --out runs/samples --per-class 4 --steps 50
    softvq generate GEN --out OUT --classes 207,360 --per-class 8 --cfg 1.75 --interval 0 0.7
    softvq generate MAR_GEN --out OUT --cfg 3.0 --ar-steps 64 --temperature 1.0   # MAR (paper: cfg 3.0)
    softvq generate GEN --out OUT --per-class 50 --fid-ref stats.npz      # + gFID
    softvq generate RUN/checkpoints/step-00400000.pt --out OUT --per-class 50   # supp. Tab. 9 (arXiv Tab. 8)

GEN is a generator folder (RUN/generator, or RUN/generator-step-NNNNNNNN from train-generator
--export-at), the run folder RUN, or a training checkpoint RUN/checkpoints/step-NNNNNNNN.pt (its EMA
weights, as an export at that step would hold them).

Writes OUT/images/000000.png ... (one file per sample, readable by FID tools), OUT/grid.png
(one row per class, at most 16 x 16), OUT/samples.json (labels, class names, sampler settings),
with --fid-ref OUT/fid.json (the gFID, its reference and the sample count), and with --npz
OUT/samples.npz (the images as one array: the sample batch of ADM's evaluator, from which the
papers report gFID).
Images are written batch by batch: an interrupted run continues when the same command is run
again, and makes the same images it would have made without the interruption. Under torchrun or
accelerate launch the batches are split over the processes (one per GPU), with the same images:

    torchrun --nproc_per_node 8 -m softvq.cli.main generate GEN --out OUT --per-class 50 --cfg 1.75
Guidance interval: noise levels τ in [low, high] with τ = 0 data and τ = 1 noise (SiT's t; t/T for DiT).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from softvq.cli.common import (add_precision_argument, add_quiet_argument, positive_int, refuse_unwritable,
                               resolve_device, seed_int)
from softvq.messages import first_few, ignored_flags

if TYPE_CHECKING:
    from softvq.generation.sampling import SamplerSpec

FID_RECORD = "fid.json"  # gFID of --fid-ref, written into OUT beside samples.json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample images from a trained DiT / SiT / MAR generator",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generator", help="generator folder (RUN/generator written by the generator trainer, or "
                                     "RUN/generator-step-N of --export-at), the run folder RUN, or a training "
                                     "checkpoint RUN/checkpoints/step-N.pt (its EMA weights)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", metavar="SPEC", help="tokenizer to decode with (default: the one the latents came from)")
    p.add_argument("--classes", default="all", help="comma-separated class names or indices (a name wins: with class folders 0 1 2 10, '2' is folder 2), "
                        "or 'all' (default)")
    p.add_argument("--per-class", type=positive_int, default=4, help="samples per class (default 4)")
    p.add_argument("--method", choices=["euler", "heun", "sde", "ddpm", "mar"],
                   help="sampler (default: sde for SiT, ddpm for DiT, mar for MAR)")
    p.add_argument("--steps", type=positive_int,
                   help="sampling steps (default 250; MAR: 100 diffusion steps per token)")
    p.add_argument("--cfg", type=guidance_scale, default=1.0,
                   help="classifier-free guidance scale (1 = off, the default; paper supp. C.2: SiT 1.75 / 2.25 "
                        "on --interval 0 0.7, DiT 1.35 / 1.45, for 64 / 32 tokens; MAR 3.0; the figures' samples "
                        "4.0, at 512 px 2.0)")
    p.add_argument("--interval", type=noise_level, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="guidance interval in noise level τ (0 data .. 1 noise; default 0 1, all steps); the "
                        "paper uses 0 0.7 for SiT")
    p.add_argument("--ar-steps", type=positive_int, help="MAR: autoregressive steps (default: one per token)")
    p.add_argument("--temperature", type=temperature, help="MAR: noise temperature of the diffusion head (default 1)")
    p.add_argument("--cfg-schedule", choices=["linear", "constant"],
                   help="MAR: guidance scale ramped linearly over the steps (default) or constant")
    p.add_argument("--clip-x0", type=clip_bound, metavar="C",
                   help="MAR and DiT: clamp the predicted clean latent to [-C, C] in normalised latent units "
                        "in each DDPM step (off, as in their releases; try 5 if a small run's samples diverge)")
    p.add_argument("--seed", type=seed_int, default=0, help="base seed: each batch's noise comes from a seed derived from it (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="samples per batch (default 64); each batch has its own seed, so the images depend on it "
                        "and a continued run must keep it")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    add_quiet_argument(p)
    add_precision_argument(p)  # the tokenizer's decode; the generator samples in float32
    p.add_argument("--fid-ref", metavar="NPZ_OR_FOLDER",
                   help="reference Inception statistics (.npz with mu/sigma) or an image folder: also print gFID "
                        "and write it to OUT/fid.json")
    p.add_argument("--npz", action="store_true",
                   help="also pack the images into OUT/samples.npz (arr_0: N x H x W x 3 uint8, arr_1: labels), "
                        "the sample batch ADM's reference evaluator reads (the papers' gFID)")
    p.set_defaults(func=run)


def _number(text: str, usable, wants: str) -> float:
    """``text`` as a float that ``usable`` accepts, else argparse's usage error saying what ``wants``:
    NaN and infinity parse as floats and pass plain comparisons, then sample NaN images."""
    value = float(text)  # argparse turns a ValueError into "invalid ... value"
    if not (math.isfinite(value) and usable(value)):
        raise argparse.ArgumentTypeError(f"{wants}, got {text}")
    return value


def guidance_scale(text: str) -> float:
    """Parse a CFG scale (argparse type): finite and 0 or more."""
    return _number(text, lambda v: v >= 0, "the guidance scale is a finite number of 0 or more (1 = off)")


def noise_level(text: str) -> float:
    """Parse a noise level (argparse type): in [0, 1]."""
    return _number(text, lambda v: 0 <= v <= 1, "noise levels lie in [0, 1] (0 data .. 1 noise)")


def temperature(text: str) -> float:
    """Parse a sampling temperature (argparse type): finite and 0 or more."""
    return _number(text, lambda v: v >= 0, "the temperature is a finite number of 0 or more (1 = the release's)")


def clip_bound(text: str) -> float:
    """Parse a latent clipping bound (argparse type): finite and positive."""
    return _number(text, lambda v: v > 0, "the bound is a finite positive number (normalised latent units)")


def parse_classes(text: str, names: list[str], num_classes: int) -> list[int]:
    """'all' | '3,7' | 'chelsea,coffee' -> class indices, with an error naming a bad entry. A class
    name wins over an index: with folders named 0, 1, 2, 10 (sorted 0, 1, 10, 2), '2' is folder 2."""
    if text.strip().lower() == "all":
        return list(range(num_classes))
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in names:
            index = names.index(part)
        elif part.lstrip("-").isdigit():
            index = int(part)
        else:
            raise ValueError(f"unknown class {part!r}; use indices 0..{num_classes - 1}"
                             + (f" or names {first_few(names, 12)}" if names else ""))
        if not 0 <= index < num_classes:
            raise ValueError(f"class index {index} is out of range 0..{num_classes - 1}")
        out.append(index)
    if not out:
        raise ValueError("no classes given")
    return out


def run(args: argparse.Namespace) -> int:
    from softvq.atomic import write_json
    from softvq.checkpoint.pretrained import training_run_export
    from softvq.checkpoint.specs import portable_spec
    from softvq.cli.common import generator_tokenizer
    from softvq.data.images import require_folder
    from softvq.generation.checkpoint import generator_run_export, load_generator
    from softvq.generation.run_folder import stale_export_note
    from softvq.generation.samples import OtherTokenizerWarning, pack_npz, write_samples
    from softvq.resume import weights_sha1
    from softvq.run_lock import lock_run_folder
    from softvq.training.accelerator import first_launched_process, launched_accelerator, said_by_main_process

    try:
        refuse_unwritable(Path(args.out), "--out", "generate writes the samples there")
    except OSError as exc:  # every process of a launched run finds it: the first one says it
        raise said_by_main_process(exc, first_launched_process()) from None
    if args.fid_ref:  # checked before sampling, which may take hours, not after
        reference = Path(args.fid_ref).expanduser()
        if reference.suffix == ".npz" and not reference.is_file():
            raise FileNotFoundError(f"--fid-ref {reference} does not exist")
        if reference.suffix == ".npz":
            from softvq.evaluation.fid import load_reference_stats

            load_reference_stats(reference)  # a file that is not reference statistics is named now
        if reference.suffix != ".npz":
            require_folder(reference, "--fid-ref takes a .npz of reference statistics or an image folder")
            check_reference_images(reference)

    accelerator = launched_accelerator(cpu=resolve_device(args.device).type == "cpu")  # torchrun: split the batches
    device = accelerator.device if accelerator is not None else resolve_device(args.device)
    model, meta = load_generator(args.generator, map_location=str(device), tokenizer_flag="--tokenizer")
    main_process = accelerator is None or accelerator.is_main_process
    if main_process and generator_run_export(args.generator) is not None and \
            (stale := stale_export_note(Path(args.generator))):
        print(f"softvq: warning: {stale}", file=sys.stderr)
    try:
        spec = sampler_spec(args, model, meta)
    except ValueError as exc:  # every process of a launched run finds it: the main process says it
        raise said_by_main_process(exc, main_process) from None
    spec_name, tokenizer = generator_tokenizer(args.generator, meta.tokenizer, args.tokenizer, "--tokenizer", device,
                                               args.precision)
    if (other := meta.other_tokenizer(weights_sha1(tokenizer), f"decoding with {spec_name}")) is not None:
        print(f"softvq: warning: {other}: the images may not show what the generator learned; pass --tokenizer "
              f"with the tokenizer pretokenize used", file=sys.stderr)
    classes = parse_classes(args.classes, meta.classes, model.config.num_classes)
    labels = torch.tensor([c for c in classes for _ in range(args.per_class)])
    # recorded as the folders they load, so RUN and RUN/generator, or tok and /abs/tok, continue one another
    checkpoint = Path(args.generator).expanduser()
    record = {"generator": str(checkpoint.resolve()) if checkpoint.is_file()
              else portable_spec(str(generator_run_export(args.generator) or args.generator)),
              "tokenizer": portable_spec(str(training_run_export(spec_name) or spec_name))}
    # the folder's lock for the whole command: samples, then their pack and their FID record
    with lock_run_folder(Path(args.out), accelerator):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OtherTokenizerWarning)  # said above, before any work
            result = write_samples(model, meta, tokenizer, labels, spec, args.out, seed=args.seed,
                                   batch_size=args.batch_size, record=record, accelerator=accelerator,
                                   progress=not args.quiet)
        if accelerator is not None and not accelerator.is_main_process:
            return 0
        if result.made == 0:
            print(f"{result.images} already holds all {result.count} images of these settings; grid {result.grid}")
        else:
            kept = ("" if result.made == result.count else
                    f" ({result.count - result.made} kept from an interrupted run)")
            print(f"wrote {result.count} images to {result.images}{kept} and the grid {result.grid}")
        if result.diverged:
            what = "diffusion head" if meta.objective == "mar" else "generator"
            hint = (f"the {what} is not trained enough for the unclipped first steps; sample again with "
                    "--clip-x0 5 into another --out" if meta.objective in ("mar", "dit") and args.clip_x0 is None
                    else "the generator is not trained enough (or its latents' statistics do not match this "
                         "tokenizer)")
            print(f"softvq: warning: some samples diverged (|latent| > 50 standard deviations): {hint}",
                  file=sys.stderr)
        if args.npz:
            print(f"packed the {result.count} images into {pack_npz(result.folder)} for ADM's evaluator")
        if args.fid_ref:
            scored = generation_fid(result.folder, args.fid_ref, device, progress=not args.quiet)
            gfid = scored["gfid"]
            reference = Path(args.fid_ref).expanduser()
            # kept beside the images it scores: the printed line alone is lost with the terminal
            write_json(result.folder / FID_RECORD,
                       {"gfid": gfid, "reference": str(reference.resolve()) if reference.exists() else args.fid_ref,
                        "samples": result.count,
                        **{key: scored[key] for key in ("num_reference", "skipped_reference") if key in scored}})
            print(f"gFID vs {args.fid_ref}: {gfid:.3f} ({result.count} samples; the paper's protocol uses 50,000); "
                  f"saved to {result.folder / FID_RECORD}")
        return 0


def sampler_spec(args: argparse.Namespace, model: Any, meta: Any) -> SamplerSpec:
    """The sampler the flags ask for, checked against the generator (before the tokenizer is loaded,
    a download perhaps, and before anything is written): flags it would ignore are refused."""
    from softvq.generation.guidance import Guidance
    from softvq.generation.sampling import NAMES, SamplerSpec

    mar_only = [flag for flag, value in (("--ar-steps", args.ar_steps), ("--temperature", args.temperature),
                                         ("--cfg-schedule", args.cfg_schedule)) if value is not None]
    if meta.objective != "mar" and mar_only:
        raise ignored_flags(mar_only, "MAR generators",
                            reason=f"{args.generator} is a {NAMES.get(meta.objective, meta.objective)} one")
    if args.interval is not None and args.cfg == 1.0:  # given but ignored would read as "it made no difference"
        raise ValueError("--interval says where guidance applies, and --cfg 1 (the default) guides nowhere: pass a "
                         "--cfg above 1, or drop --interval")
    spec = SamplerSpec(method=args.method, steps=args.steps, guidance=Guidance(args.cfg, *(args.interval or (0.0, 1.0))),
                       ar_steps=args.ar_steps, temperature=1.0 if args.temperature is None else args.temperature,
                       cfg_schedule=args.cfg_schedule or "linear", clip_x0=args.clip_x0)
    spec.check(model, meta)
    return spec


REFERENCE_CHECKED = 1000  # reference images looked at before sampling


def check_reference_images(reference: Path) -> None:
    """A ``--fid-ref`` folder has images and one of them reads: found before sampling, not after
    (the others are read when scoring, where unreadable ones are skipped and named)."""
    from softvq.evaluation.sources import first_readable, list_image_refs

    refs, _, _ = list_image_refs(reference, REFERENCE_CHECKED)  # a shard folder's first ones: not a million
    first_readable(refs, f"--fid-ref {reference}: none of its first {len(refs)} images is readable")


def generation_fid(samples: Path, reference: str, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """FID of the PNGs under ``samples`` (as written, 8-bit, the usual protocol) against a .npz of
    reference statistics or a folder of images, as ``evaluate_samples``' report (``gfid``, and for a
    folder ``num_reference`` and ``skipped_reference``); unreadable reference images are skipped and named."""
    from softvq.evaluation.generated import evaluate_samples

    # every sample and every reference image; no precision/recall here (`softvq eval --samples` has them)
    report = evaluate_samples(samples, reference, num_images=sys.maxsize, device=device, pr_samples=0,
                              progress=progress)
    for note in report["notes"]:
        if note.startswith("reference: "):
            print(f"softvq: warning: --fid-ref: {note.removeprefix('reference: ')}", file=sys.stderr)
    return report
