"""``softvq plot RUN_DIR... --out DIR``: pictures of training runs (or checkpoint folders).

Per run, under ``DIR/<run name>/``:
  training_curves.png   every scalar of log.jsonl against the step: raw (faint) and smoothed
                        from 10 log points on, else the raw line alone; the held-out PSNR /
                        LPIPS of each grid (heldout/*) after the losses, unsmoothed;
  reconstructions.png   original | reconstruction | error map, with PSNR per row;
  codebook_usage.png    code counts (from eval/eval.json when `softvq eval` ran, else from the
                        plot images), usage and perplexity;
  codewords.png         the first codebook's codewords among the tokens it reads (first segment,
                        level, group), PCA of the tokens, coloured by use (supp. Fig. 5; learned
                        codebooks: not KL / AE / LFQ);
  latents.png           2D projection of ẑ and z coloured by class (UMAP if umap-learn is
                        installed, else PCA; --projection chooses).
Across runs: DIR/rate_quality.png, tokens x dim against rFID / PSNR (PSNR from every run's
eval/eval.json, or, where a run has none, from every run's held-out images: one protocol per
axis), and DIR/comparison.md, a row per run with every metric of its eval report (else
its held-out PSNR / LPIPS; a column says which): e.g. Tab. 3's rows from its runs. Missing files
are skipped with a note; a run still training, with no export/ yet, is pictured from the EMA
weights of its newest checkpoint. Images: --images FOLDER (class sub-folders colour the latent plot),
default the bundled photos, several crops of each.
"""

from __future__ import annotations

import argparse
import sys

from softvq.cli.common import positive_int, resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="training curves, reconstructions, codebook and latent plots of runs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folders or checkpoint folders")
    p.add_argument("--out", default="plots", metavar="DIR", help="output folder (default: plots)")
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="images to reconstruct and project (class sub-folders give the colours)")
    p.add_argument("--per-class", type=positive_int, default=8, help="images per class for the latent plot (default: 8)")
    p.add_argument("--num-reconstructions", type=positive_int, default=6,
                   help="rows of reconstructions.png, one per class first (default: 6)")
    p.add_argument("--projection", choices=("auto", "pca", "umap"), default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq.evaluation.runs import plot_runs

    written = plot_runs(args.runs, args.out, images=args.images, per_class=args.per_class,
                        num_reconstructions=args.num_reconstructions, projection=args.projection,
                        device=resolve_device(args.device),
                        log=lambda message: print(f"softvq plot: {message}", file=sys.stderr))
    for path in written:
        print(path)
    if not written:
        print("softvq plot: nothing to draw (no log.jsonl, export/ or metrics in the given folders)", file=sys.stderr)
        return 1
    return 0
