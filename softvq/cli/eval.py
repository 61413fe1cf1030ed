"""``softvq eval --model SPEC --images DATA``: the paper's reconstruction metrics on a fixed image set.

Prints a markdown table (rFID, PSNR, SSIM, LPIPS-VGG/Alex, codebook usage and perplexity,
latent mean/std, encoder/decoder GMACs and throughput) and writes ``eval.json`` + ``eval.md`` to
``--out`` (default: ``RUN/eval`` for a run folder or checkpoint folder, ``RUN/eval/step-N`` for a
run's checkpoint ``RUN/checkpoints/step-N.pt``, ``SAMPLES/eval`` for a folder ``generate`` wrote,
else ``./eval``).

DATA is an image folder (sorted by path) or webdataset ``.tar`` shards (a folder of them, a
file, or a pattern such as ``val-{000..063}.tar``). The first ``--num-images`` images (default
50,000 as in the paper's ImageNet-val rFID) are centre-cropped and resized to the model's size.
See ``softvq.evaluation.evaluate`` for the full protocol. Every few minutes the running sums are
saved to ``OUT/eval-state.pt``: after an interruption the same command continues from them
(with ``--samples``, from the Inception features kept in ``OUT/eval-samples-state.pt`` and
``OUT/eval-reference-state.pt``).

``--probe FOLDER`` adds linear-probe accuracy (paper C.3) on a labelled folder (one sub-folder per
class); the features extracted so far are kept in ``OUT/probe-*.pt`` and the finished evaluation
in ``OUT/eval-state.pt`` until the report is written, so a stopped probe continues too. ``--samples DIR`` instead scores generated samples against DATA: gFID, precision/recall
and, with pytorch-fid's weights, the Inception Score.

``--probe-generator GEN --probe FOLDER`` instead probes a trained DiT / SiT (paper Fig. 3(b)): the
mean-pooled output of block ``--probe-layer`` (default 20) for latents noised to ``--probe-t``
(default 0.5, ours: the paper gives none), with the null class label so the label does not leak
into the features (see ``softvq.evaluation.generator_probe``). FOLDER is a labelled image folder,
encoded by the generator's tokenizer (or ``--model``), or a latent set from ``softvq pretokenize``
(for ImageNet, pretokenize first: it continues after an interruption and splits over GPUs). GEN is
a generator folder, its train-generator run, or a checkpoint RUN/checkpoints/step-N.pt; no
``--images`` is needed, and the report goes to GEN/eval (a folder) or ./eval.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from softvq.cli.common import (add_model_arguments, add_quiet_argument, generator_tokenizer, load_tokenizer,
                               non_negative_int, positive_int, refuse_unwritable, resolve_device, seed_int)
from softvq.messages import ignored_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="rFID / PSNR / SSIM / LPIPS / codebook use of a tokenizer on an image set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, default=None)
    p.add_argument("--images", default=None, metavar="DATA",
                   help="image folder or .tar shards (the reference images with --samples); required except "
                        "with --probe-generator")
    p.add_argument("--num-images", type=positive_int, default=50_000,
                   help="first N images in sorted order (default 50000)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--image-size", type=positive_int, default=None, help="evaluation resolution (default: the model's)")
    p.add_argument("--out", default=None, metavar="DIR", help="where eval.json and eval.md go")
    p.add_argument("--reference-stats", default=None, metavar="NPZ",
                   help="cache file for the originals' Inception statistics (checked against the "
                        "image list and protocol; default: ~/.cache/softvq/fid-stats/)")
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="FID Inception weights: a pytorch-fid .pth, a TorchScript .pt, or 'download' "
                        "(default: found automatically)")
    p.add_argument("--fid-normalization", choices=("tf", "pytorch-fid"), default="tf",
                   help="Inception input scaling: TF graph (x-128)/128 (default) or pytorch-fid x/127.5-1")
    p.add_argument("--fid-resize", choices=("tf", "pytorch-fid"), default="tf",
                   help="resize to 299: the TF graph's bilinear without half-pixel centres, as ADM's evaluator "
                        "(default), or pytorch-fid's F.interpolate")
    p.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception pass)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--no-flops", action="store_true", help="skip counting encoder/decoder FLOPs")
    p.add_argument("--probe", default=None, metavar="FOLDER", help="labelled folder for linear probing (C.3)")
    p.add_argument("--probe-val", default=None, metavar="FOLDER", help="held-out labelled folder (default: 20%% split)")
    p.add_argument("--probe-epochs", type=positive_int, default=90,
                   help="probe training epochs (paper: 90); a small folder trains at least 1000 steps, so more "
                        "epochs (the report says how many)")
    p.add_argument("--probe-which", choices=("latents", "features"), default="latents",
                   help="probe z (latents, default) or the pre-bottleneck ẑ (features)")
    p.add_argument("--probe-generator", default=None, metavar="GEN",
                   help="probe a DiT/SiT generator's block features on --probe (Fig. 3b) instead of a tokenizer: "
                        "a generator folder, its run, or a checkpoint RUN/checkpoints/step-N.pt")
    p.add_argument("--probe-layer", type=positive_int, default=None,
                   help="with --probe-generator: the block whose output is probed, counted from 1 (default 20, "
                        "Fig. 3b)")
    p.add_argument("--probe-t", type=float, default=None,
                   help="with --probe-generator: the noise level the latents get, 0 data .. 1 noise (SiT's t; "
                        "t/T for DiT); default 0.5 (ours: the paper gives none)")
    p.add_argument("--samples", default=None, metavar="DIR_OR_NPZ",
                   help="score generated samples (a folder, generate's OUT, or a sample batch .npz) against --images")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    add_quiet_argument(p)
    p.add_argument("--seed", type=seed_int, default=None,
                   help="seed for a preset's random weights (so two evaluations of one preset agree, and a stopped "
                        "one continues; default 0)")
    p.set_defaults(func=run)


def resolve_model_spec(spec: str) -> tuple[str, Path]:
    """(spec, where its report goes without ``--out``): a training run folder stands for its
    ``export/`` and is reported in ``RUN/eval``, as any checkpoint folder in ``FOLDER/eval``; a
    run's checkpoint ``RUN/checkpoints/step-N.pt`` in ``RUN/eval/step-N``, so the steps of a run
    each keep their report; anything else (a preset, a hub id) in ``./eval``."""
    from softvq.checkpoint.pretrained import checkpoint_run, training_run_export
    from softvq.training.checkpointing import checkpoint_step

    path = Path(spec).expanduser()
    export = training_run_export(spec)
    if export is not None:
        return str(export), path / "eval"
    run = checkpoint_run(path)  # a tokenizer run's (a generator's is refused when loaded)
    if path.is_file() and checkpoint_step(path) is not None and run is not None:
        return spec, run / "eval" / path.stem
    return spec, (path / "eval" if path.is_dir() else Path("eval"))


STATE_NAME = "eval-state.pt"  # an interrupted evaluation's running sums, beside its report


def samples_report_folder(samples: Path) -> Path:
    """Where ``--samples`` reports go without ``--out``: inside the folder ``generate`` wrote
    (``SAMPLES/eval``, also when given its ``images/``), so that two sample sets never share a
    report; ``./eval`` for any other folder of images, which we do not write into."""
    from softvq.generation.samples import SAMPLE_IMAGES, SAMPLE_RECORD

    if (samples / SAMPLE_RECORD).is_file():
        return samples / "eval"
    if samples.suffix == ".npz" and (samples.parent / SAMPLE_RECORD).is_file():  # generate --npz's pack
        return samples.parent / "eval"
    if samples.name == SAMPLE_IMAGES and (samples.parent / SAMPLE_RECORD).is_file():
        return samples.parent / "eval"
    return Path("eval")


def report_folder(args: argparse.Namespace, default: Path, held: contextlib.ExitStack) -> Path:
    """Where the report (and an interrupted evaluation's state) goes: ``--out``, else ``default``;
    refused before any work where it could not be written, and locked until ``held`` closes (two
    evals into one folder would race on its saved state and its report)."""
    from softvq.run_lock import RunLock

    out = Path(args.out) if args.out else default
    refuse_unwritable(out, "--out", "eval writes its report there")
    held.enter_context(RunLock(out))
    return out


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:  # the report folder's lock, once its place is known
        return _evaluate(args, held)


def _evaluate(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from softvq.evaluation.evaluate import EvalOptions, evaluate_tokenizer
    from softvq.evaluation.generated import evaluate_samples
    from softvq.evaluation.report import to_markdown, write_report

    device = resolve_device(args.device)
    given = [flag for flag, value in (("--probe-layer", args.probe_layer), ("--probe-t", args.probe_t))
             if value is not None]
    if given and not args.probe_generator:
        raise ignored_flags(given, "--probe-generator GEN", instead="pass it")
    if args.probe_generator:
        if args.samples or args.images:
            raise ValueError("--probe-generator probes a generator on the labelled --probe data alone: drop "
                             + ("--samples (score samples in a separate eval)" if args.samples else "--images"))
        report, out = generator_probe_report(args, device, held)
        json_path, md_path = write_report(report, out)
        print(to_markdown(report))
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
        return 0
    if not args.images:
        raise ValueError("pass --images DATA: the image folder or .tar shards to evaluate on")
    state = None  # the tokenizer evaluation's saved state, removed once the report is written
    if args.samples:
        if args.model or args.probe:
            raise ValueError("--samples scores generated images against --images; --model and --probe evaluate a "
                             "tokenizer instead: run them as a separate eval")
        tokenizer_only = [flag for flag, given in (
            ("--no-fid", args.no_fid), ("--no-lpips", args.no_lpips), ("--no-flops", args.no_flops),
            ("--image-size", args.image_size is not None), ("--precision", args.precision != "fp32"),
            ("--seed", args.seed is not None)) if given]
        if tokenizer_only:
            raise ignored_flags(tokenizer_only, "a tokenizer's evaluation (--model)",
                                reason="--samples always measures gFID and precision/recall, at the samples' own size")
        if args.reference_stats:
            raise ValueError("--reference-stats is the rFID statistics file of --model; with --samples the "
                             "reference statistics are cached by checksum in ~/.cache/softvq/fid-stats/, "
                             "or pass a .npz of them as --images")
        out = report_folder(args, samples_report_folder(Path(args.samples)), held)
        # the features extracted so far are kept in OUT, and the same command continues from them
        report = evaluate_samples(args.samples, args.images, num_images=args.num_images,
                                  batch_size=args.batch_size, fid_weights=args.fid_weights,
                                  normalization=args.fid_normalization, resize=args.fid_resize, device=device,
                                  workers=args.workers, progress=not args.quiet, state_dir=out)
        report["model"] = f"samples {args.samples}"
        report["num_images"] = report["num_samples"]
    else:
        if not args.model:
            raise ValueError("pass --model SPEC (a checkpoint folder, a run folder, official:ID or a preset)")
        spec, default_out = resolve_model_spec(args.model)
        out = report_folder(args, default_out, held)
        torch.manual_seed(args.seed or 0)  # a preset's random weights: the same ones on every run
        model = load_tokenizer(spec, device, precision=args.precision)
        options = EvalOptions(
            num_images=args.num_images, batch_size=args.batch_size, image_size=args.image_size,
            fid=not args.no_fid, fid_weights=args.fid_weights, fid_normalization=args.fid_normalization,
            fid_resize=args.fid_resize,
            reference_stats=args.reference_stats, lpips_nets=() if args.no_lpips else ("vgg", "alex"),
            workers=args.workers, progress=not args.quiet, count_flops=not args.no_flops,
        )
        # hours of work on a CPU: the running sums go here, and the same command continues from them
        # (a preset's random weights too: seeded above, and the saved state names the weights it measured)
        state = out / STATE_NAME
        # with --probe the finished report stays in the state until the probe too is done
        report = evaluate_tokenizer(model, args.images, options, device=device,
                                    model_name=model.source, state_file=state, keep_state=bool(args.probe))
        if args.probe:
            from softvq.evaluation.probe import probe_folder

            result = probe_folder(model, args.probe, val_folder=args.probe_val, which=args.probe_which,
                                  device=device, batch_size=args.batch_size, epochs=args.probe_epochs,
                                  progress=not args.quiet, state_dir=None if state is None else out)
            add_probe(report, result, args.probe_epochs)
    json_path, md_path = write_report(report, out)
    if state is not None:
        state.unlink(missing_ok=True)
    print(to_markdown(report))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def add_probe(report: dict, result, epochs: int) -> None:
    """A linear probe's result into a report, with notes on what differs from the asked protocol."""
    report["linear_probe"] = result.to_dict()
    report["linear_probe_top1"] = result.top1
    if result.epochs > epochs:
        report["notes"].append(f"linear probe: {result.epochs} epochs instead of {epochs}, "
                               f"to reach the minimum of 1000 optimizer steps on this small folder")
    if result.skipped_images:
        report["notes"].append(f"linear probe: skipped {result.skipped_images} unreadable labelled image(s)")
    if result.empty_classes:
        report["notes"].append(f"linear probe: left out {len(result.empty_classes)} class(es) with no readable "
                               f"training image: {', '.join(result.empty_classes)}")


def generator_probe_report(args: argparse.Namespace, device: torch.device,
                           held: contextlib.ExitStack) -> tuple[dict, Path]:
    """``--probe-generator``: the report of a linear probe on a DiT / SiT's block features (Fig. 3(b)),
    and the folder it goes to."""
    from softvq.evaluation.generator_probe import (DEFAULT_LAYER, DEFAULT_T, check_probe_target, latent_set_meta,
                                                   probe_generator)
    from softvq.generation.checkpoint import load_generator
    from softvq.resume import weights_sha1

    if not args.probe:
        raise ValueError("--probe-generator needs --probe FOLDER: a labelled image folder (one sub-folder per class) "
                         "or a latent set from softvq pretokenize")
    model, meta = load_generator(args.probe_generator, map_location=str(device), tokenizer_flag="--model")
    layer = DEFAULT_LAYER if args.probe_layer is None else args.probe_layer
    t = DEFAULT_T if args.probe_t is None else args.probe_t
    check_probe_target(model, meta, layer, t)  # before a tokenizer is loaded (a download, perhaps)
    notes: list[str] = []
    folders = [folder for folder in (args.probe, args.probe_val) if folder]
    sets = {folder: latent_set_meta(folder) for folder in folders}
    tokenizer = None
    for folder, data in sets.items():
        if data is not None and data.get("tokenizer_sha1") is not None:
            other = meta.other_tokenizer(data["tokenizer_sha1"], f"{folder} was encoded by a tokenizer")
            notes += [other] if other is not None else []
    if any(data is None for data in sets.values()):  # image folders: encoded by the generator's tokenizer
        torch.manual_seed(args.seed or 0)  # a preset's random weights: the same ones on every run
        spec, tokenizer = generator_tokenizer(args.probe_generator, meta.tokenizer, args.model, "--model", device,
                                              args.precision)  # to encode --probe's images
        other = meta.other_tokenizer(weights_sha1(tokenizer), f"--probe's images were encoded by {spec}")
        if other is not None:
            notes.append(f"{other}; pass --model with the tokenizer pretokenize used")
    for note in notes:
        print(f"softvq: warning: {note}", file=sys.stderr)
    home = Path(args.probe_generator).expanduser()
    out = report_folder(args, home / "eval" if home.is_dir() else Path("eval"), held)
    # the latents and features extracted so far are kept in OUT; the same command continues from them
    result = probe_generator(model, meta, args.probe, val_folder=args.probe_val, tokenizer=tokenizer, layer=layer,
                             t=t, device=device, batch_size=args.batch_size, epochs=args.probe_epochs,
                             progress=not args.quiet, state_dir=out)
    sizes = [data.get("image_size") for data in sets.values() if data is not None]
    report = {"model": f"generator {args.probe_generator}, block {layer} at t = {t:g}",
              "num_images": result.num_train + result.num_val,
              "image_size": tokenizer.config.image_size if tokenizer is not None else (sizes[0] if sizes else None),
              "protocol": {"probe layer": layer, "noise level t": t, "class label": "null (unconditional)",
                           "pooling": "mean over tokens", "objective": meta.objective},
              "notes": notes}
    add_probe(report, result, args.probe_epochs)
    return report, out
