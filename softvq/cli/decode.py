"""``softvq decode latents.safetensors --model SPEC --out DIR``: latents -> named PNG images.

Reads a file written by ``softvq encode``; each row becomes ``DIR/<its image name>.png`` (the
sub-folders of the encoded folder are kept). Without ``--model`` the SPEC recorded in the file
is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath

import torch
from tqdm import tqdm

from softvq.checkpoint.specs import portable_spec
from softvq.cli.common import (add_model_arguments, load_tokenizer, make_distinct, positive_int,
                               refuse_to_overwrite)
from softvq.cli.encode import read_latents
from softvq.data.images import to_pil


def output_names(names: list[str]) -> list[str]:
    """``a/b.jpg`` -> ``a/b.png``; where two names would collide the old suffix is kept (``b.jpg.png``),
    and a name still taken (by an input called ``b.jpg.png``, say) gets a counter (``b.jpg-1.png``)."""
    plain = [str(PurePosixPath(n).with_suffix(".png")) for n in names]
    counts: dict[str, int] = {}
    for n in plain:
        counts[n] = counts.get(n, 0) + 1
    return make_distinct([p if counts[p] == 1 else f"{n}.png" for n, p in zip(names, plain)])


def _safe_relative(name: str) -> Path:
    """A stored name as a path that stays inside the output folder."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".", "..", "/")]
    if not parts:
        raise ValueError(f"latents file holds an empty image name {name!r}")
    return Path(*parts)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("decode", help="latents file -> images",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("latents", metavar="LATENTS", help="file written by softvq encode")
    add_model_arguments(p, default=None)  # None: the SPEC recorded in the latents file
    p.add_argument("--out", default="decoded", metavar="DIR", help="output folder (default: decoded)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=None,
                   help="seed for a preset's random weights and a generative decoder's noise "
                        "(default: the one encode recorded for a preset, else 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = read_latents(args.latents)
    recorded = data.meta.get("model")
    spec = args.model or recorded
    if not spec:
        raise ValueError(f"{args.latents} does not record its model; pass --model SPEC")
    if args.model and recorded and portable_spec(args.model) != recorded:
        print(f"softvq: warning: {args.latents} was encoded with {recorded}; decoding with {args.model}",
              file=sys.stderr)
    out = Path(args.out)
    files = [out / _safe_relative(n) for n in output_names(data.names)]
    refuse_to_overwrite(files, "choose another --out (decode never replaces images, such as the originals it encoded)")
    # A preset's random weights are only the encoding model's when drawn from the same seed.
    torch.manual_seed(args.seed if args.seed is not None else int(data.meta.get("seed", 0)))
    model = load_tokenizer(spec, args.device, precision=args.precision)
    expected = (model.num_tokens, model.latent_dim)
    if tuple(data.latents.shape[1:]) != expected:
        raise ValueError(
            f"{args.latents} holds latents of shape (L, D) = {tuple(data.latents.shape[1:])} but model "
            f"{spec} takes {expected}; pass the --model that encoded them"
        )
    size = data.image_size or model.config.image_size
    if size % model.config.patch_size:
        raise ValueError(f"recorded image size {size} is not a multiple of the patch size {model.config.patch_size}")
    device = next(model.parameters()).device
    batch = args.batch_size
    with torch.inference_mode():
        for start in tqdm(range(0, len(files), batch), desc="decode", unit="batch", disable=None):
            z = data.latents[start:start + batch].to(device)
            images = model.decode(z, size).float().cpu()
            for image, file in zip(images, files[start:start + batch]):
                file.parent.mkdir(parents=True, exist_ok=True)
                to_pil(image).save(file)
    print(f"decoded {len(files)} image(s) with {model.source} -> {out}")
    return 0
