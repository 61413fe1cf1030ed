"""``softvq encode FOLDER --model SPEC --out latents.safetensors``: a folder of images -> latents.

The output file holds one tensor ``latents`` (N, L, D) float32 and, in its metadata, the image
names (paths relative to FOLDER, in the order of the rows), the model SPEC, the image size and,
where the checkpoint has them (released ones do), the latent mean / std, so ``softvq decode`` can
turn it back into named images. Unreadable files are skipped and listed at the end; an image of
the wrong size is an error unless ``--resize`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from softvq.atomic import atomic_write
from softvq.checkpoint.pretrained import CheckpointError
from softvq.checkpoint.specs import is_preset, portable_spec
from softvq.cli.common import (add_model_arguments, indented_lines, load_tokenizer, positive_int, refuse_to_overwrite,
                               refuse_unwritable, seed_int)
from softvq.data.folder import scan_folder
from softvq.data.images import ImageReadError, ImageSizeError, header_sizes, read_image
from softvq.resume import weights_sha1

LATENTS_FORMAT = "softvq-latents"


@dataclass
class LatentsFile:
    """Contents of a latents file written by ``softvq encode``."""

    latents: torch.Tensor  # (N, L, D)
    names: list[str]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def image_size(self) -> int | None:
        """The resolution the latents were encoded at, where the file records it."""
        return int(self.meta["image_size"]) if "image_size" in self.meta else None


def write_latents(path: str | Path, latents: torch.Tensor, names: list[str], meta: dict[str, object]) -> Path:
    """Write latents (N, L, D) with their names atomically (safetensors; metadata is strings)."""
    from safetensors.torch import save_file

    if latents.shape[0] != len(names):
        raise ValueError(f"{latents.shape[0]} latents but {len(names)} names")
    path = Path(path)
    info = {"format": LATENTS_FORMAT, "names": json.dumps(names)}
    info.update({k: str(v) for k, v in meta.items() if v is not None})
    tensors = {"latents": latents.detach().float().contiguous().cpu()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=info))
    return path


def read_latents(path: str | Path) -> LatentsFile:
    """Read a file written by :func:`write_latents`, with one-line errors for bad files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "latents" not in f.keys():
                raise CheckpointError(f"{path} has no 'latents' tensor; is it written by softvq encode?")
            latents = f.get_tensor("latents")
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    if latents.dim() != 3 or not latents.is_floating_point():
        dtype = str(latents.dtype).removeprefix("torch.")
        raise CheckpointError(f"{path}: 'latents' is a {tuple(latents.shape)} {dtype} tensor; softvq encode writes "
                              f"(N, L, D) floats")
    names: object = [f"{i:06d}" for i in range(len(latents))]
    if "names" in meta:
        try:
            names = json.loads(meta.pop("names"))
        except ValueError:
            names = None
    if not (isinstance(names, list) and all(isinstance(n, str) and n.strip("/.") for n in names)):
        raise CheckpointError(f"{path}: its 'names' metadata is not a JSON list of file names, as softvq encode "
                              f"writes it")
    if len(names) != len(latents):
        raise CheckpointError(f"{path}: {len(latents)} latents but {len(names)} names")
    if not meta.get("image_size", "1").isdigit() or meta.get("image_size") == "0":
        raise CheckpointError(f"{path}: its 'image_size' metadata {meta['image_size']!r} is not a size in pixels")
    return LatentsFile(latents, names, meta)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("encode", help="folder of images -> latents file (with names)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    add_model_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE", help="latents file to write (.safetensors)")
    p.add_argument("--resize", action="store_true", help="centre-crop and resize to the model's image size")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=seed_int, default=0, help="seed for a preset's random weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    paths = scan_folder(folder, "pass a folder of images to encode")[0]
    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; name the latents file to write, e.g. {out / 'latents.safetensors'}")
    refuse_to_overwrite([out], "choose another --out, or delete it first")  # before the encoding, not after
    refuse_unwritable(out.parent, "--out", "encode writes the latents file there", given=out)
    torch.manual_seed(args.seed)
    model = load_tokenizer(args.model, args.device, precision=args.precision)
    size = model.config.image_size
    if not args.resize:  # before hours of encoding, all of it at once
        wrong = [f"{path}: {found[0]}x{found[1]}" for path, found in zip(paths, header_sizes(paths))
                 if found is not None and found != (size, size)]
        if wrong:
            raise ImageSizeError(f"{len(wrong)} of the {len(paths)} images are not {size}x{size}, the size the model "
                                 f"takes; pass --resize to centre-crop and resize them:{indented_lines(wrong)}")
    device = next(model.parameters()).device
    chunks: list[torch.Tensor] = []
    names: list[str] = []
    skipped: list[str] = []
    batch_size = args.batch_size
    with torch.inference_mode(), tqdm(total=len(paths), desc="encode", unit="img", disable=None) as bar:
        for start in range(0, len(paths), batch_size):
            images, batch_names = [], []
            for path in paths[start:start + batch_size]:
                try:
                    images.append(read_image(path, size, resize=args.resize))
                    batch_names.append(path.relative_to(folder).as_posix())
                except ImageSizeError:
                    raise  # a usage error: the message suggests --resize
                except ImageReadError as exc:
                    skipped.append(str(exc))
            if images:
                chunks.append(model.encode_latents(torch.stack(images).to(device)).float().cpu())
                names += batch_names
            bar.update(len(paths[start:start + batch_size]))
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)
    if not names:
        raise ImageReadError(f"none of the {len(paths)} image file(s) in {folder} could be read")
    latents = torch.cat(chunks)
    meta = {"model": portable_spec(args.model), "seed": args.seed if is_preset(args.model) else None,
            "tokenizer_sha1": weights_sha1(model),  # decode warns when other weights decode these
            "compute_precision": model.precision, "image_size": size,
            "num_tokens": model.num_tokens, "latent_dim": model.latent_dim,
            "latent_mean": model.latent_mean, "latent_std": model.latent_std}
    write_latents(args.out, latents, names, meta)
    print(f"encoded {len(names)} image(s) of {len(paths)} -> {args.out} latents {tuple(latents.shape)}")
    if Path(args.model).expanduser().is_file():  # decode loads the model the latents name
        print(f"softvq: note: the latents name the training checkpoint {meta['model']}, which its run deletes once "
              f"it has newer ones; then decode needs --model", file=sys.stderr)
    return 0
