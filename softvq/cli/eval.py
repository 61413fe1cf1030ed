"""``softvq eval --model SPEC --images DATA``: the paper's reconstruction metrics on a fixed image set.

Prints a markdown table (rFID, PSNR, SSIM, LPIPS-VGG/Alex, codebook usage and perplexity,
latent mean/std, encoder/decoder GMACs and throughput) and writes ``eval.json`` + ``eval.md`` to
``--out`` (default: ``RUN/eval`` for a run folder or checkpoint folder, ``SAMPLES/eval`` for a
folder ``generate`` wrote, else ``./eval``).

DATA is an image folder (sorted by path) or webdataset ``.tar`` shards (a folder of them, a
file, or a pattern such as ``val-{000..063}.tar``). The first ``--num-images`` images (default
50,000 as in the paper's ImageNet-val rFID) are centre-cropped and resized to the model's size.
See ``softvq.evaluation.evaluate`` for the full protocol. Every few minutes the running sums are
saved to ``OUT/eval-state.pt``: after an interruption the same command continues from them
(with ``--samples``, from the Inception features kept in ``OUT/eval-samples-state.pt`` and
``OUT/eval-reference-state.pt``).

``--probe FOLDER`` adds linear-probe accuracy (paper C.3) on a labelled folder (one sub-folder per
class). ``--samples DIR`` instead scores generated samples against DATA: gFID, precision/recall
and, with pytorch-fid's weights, the Inception Score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from softvq.checkpoint.specs import is_preset
from softvq.cli.common import add_model_arguments, load_tokenizer, non_negative_int, positive_int, resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="rFID / PSNR / SSIM / LPIPS / codebook use of a tokenizer on an image set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, default=None)
    p.add_argument("--images", required=True, metavar="DATA",
                   help="image folder or .tar shards (the reference images with --samples)")
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
    p.add_argument("--samples", default=None, metavar="DIR", help="score generated samples against --images")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for a preset's random weights (so two evaluations of one preset agree)")
    p.set_defaults(func=run)


def resolve_model_spec(spec: str) -> tuple[str, Path | None]:
    """A training run folder stands for its ``export/``; returns (spec, folder for default output)."""
    from softvq.checkpoint.pretrained import training_run_export

    path = Path(spec).expanduser()
    export = training_run_export(spec)
    if export is not None:
        return str(export), path
    return spec, (path if path.is_dir() else None)


STATE_NAME = "eval-state.pt"  # an interrupted evaluation's running sums, beside its report


def samples_report_folder(samples: Path) -> Path:
    """Where ``--samples`` reports go without ``--out``: inside the folder ``generate`` wrote
    (``SAMPLES/eval``, also when given its ``images/``), so that two sample sets never share a
    report; ``./eval`` for any other folder of images, which we do not write into."""
    from softvq.generation.samples import SAMPLE_IMAGES, SAMPLE_RECORD

    if (samples / SAMPLE_RECORD).is_file():
        return samples / "eval"
    if samples.name == SAMPLE_IMAGES and (samples.parent / SAMPLE_RECORD).is_file():
        return samples.parent / "eval"
    return Path("eval")


def run(args: argparse.Namespace) -> int:
    from softvq.evaluation.evaluate import EvalOptions, evaluate_tokenizer
    from softvq.evaluation.generated import evaluate_samples
    from softvq.evaluation.report import to_markdown, write_report

    from softvq.training.accelerator import launched_worker

    if launched_worker():
        # every process would evaluate every image and write the same report
        raise ValueError("eval runs in one process on one device; start it without torchrun / accelerate "
                         "launch")
    device = resolve_device(args.device)
    if args.samples:
        if args.model or args.probe:
            raise ValueError("--samples scores generated images against --images; --model and --probe evaluate a "
                             "tokenizer instead: run them as a separate eval")
        if args.reference_stats:
            raise ValueError("--reference-stats is the rFID statistics file of --model; with --samples the "
                             "reference statistics are cached by checksum in ~/.cache/softvq/fid-stats/, "
                             "or pass a .npz of them as --images")
        out = Path(args.out) if args.out else samples_report_folder(Path(args.samples))
        # the features extracted so far are kept in OUT, and the same command continues from them
        report = evaluate_samples(args.samples, args.images, num_images=args.num_images,
                                  batch_size=args.batch_size, fid_weights=args.fid_weights,
                                  normalization=args.fid_normalization, device=device,
                                  workers=args.workers, progress=not args.no_progress, state_dir=out)
        report["model"] = f"samples {args.samples}"
        report["num_images"] = report["num_samples"]
    else:
        if not args.model:
            raise ValueError("pass --model SPEC (a checkpoint folder, a run folder, official:ID or a preset)")
        spec, home = resolve_model_spec(args.model)
        torch.manual_seed(args.seed)  # a preset's random weights: the same ones on every run
        model = load_tokenizer(spec, device, precision=args.precision)
        options = EvalOptions(
            num_images=args.num_images, batch_size=args.batch_size, image_size=args.image_size,
            fid=not args.no_fid, fid_weights=args.fid_weights, fid_normalization=args.fid_normalization,
            reference_stats=args.reference_stats, lpips_nets=() if args.no_lpips else ("vgg", "alex"),
            workers=args.workers, progress=not args.no_progress, count_flops=not args.no_flops,
        )
        out = Path(args.out) if args.out else (home / "eval" if home else Path("eval"))
        # hours of work on a CPU: the running sums go here, and the same command continues from them
        # (not for a random preset: its weights differ on every load)
        state = None if is_preset(args.model) else out / STATE_NAME
        report = evaluate_tokenizer(model, args.images, options, device=device,
                                    model_name=model.source, state_file=state)
        if args.probe:
            from softvq.evaluation.probe import probe_folder

            result = probe_folder(model, args.probe, val_folder=args.probe_val, which=args.probe_which,
                                  device=device, batch_size=args.batch_size, epochs=args.probe_epochs,
                                  progress=not args.no_progress)
            report["linear_probe"] = result.to_dict()
            if result.epochs > args.probe_epochs:
                report["notes"].append(f"linear probe: {result.epochs} epochs instead of {args.probe_epochs}, "
                                       f"to reach the minimum of 1000 optimizer steps on this small folder")
            report["linear_probe_top1"] = result.top1
            if result.skipped_images:
                report["notes"].append(f"linear probe: skipped {result.skipped_images} unreadable labelled image(s)")
    json_path, md_path = write_report(report, out)
    print(to_markdown(report))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0
