"""``softvq decode latents.safetensors --model SPEC --out DIR``: latents -> named PNG images.

Reads a file written by ``softvq encode``; each row becomes ``DIR/<its image name>.png`` (the
sub-folders of the encoded folder are kept). Without ``--model`` the SPEC recorded in the file
is used. ``DIR/decode.json`` records what was decoded: an interrupted decode continues when run
again with the same latents and options (each image is written whole or not at all; the batch
size may change unless the decoder is generative, whose noise is drawn per batch); a different
decode into that folder is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path, PurePosixPath

import torch
from tqdm import tqdm

from softvq.atomic import atomic_write, remove_stale_temporaries, write_json
from softvq.checkpoint.specs import portable_spec
from softvq.cli.common import (add_model_arguments, load_tokenizer, make_distinct, positive_int, refuse_to_overwrite,
                               refuse_unwritable, seed_int)
from softvq.cli.encode import LatentsFile, read_latents
from softvq.data.images import to_pil
from softvq.randomness import derived_seed
from softvq.resume import changed_settings, weights_sha1

RECORD = "decode.json"  # what the images in --out were decoded from, for a rerun to continue


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
    p.add_argument("--seed", type=seed_int, default=None,
                   help="seed for a preset's random weights and a generative decoder's noise "
                        "(default: the one encode recorded for a preset, else 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softvq.run_lock import RunLock

    out = Path(args.out)
    refuse_unwritable(out, "--out", "decode writes a folder of images")
    with RunLock(out):  # one decode per folder: two would overwrite each other's images, and temporaries
        return _decode(args, out)


def _decode(args: argparse.Namespace, out: Path) -> int:
    data = read_latents(args.latents)
    recorded = data.meta.get("model")
    spec = args.model or recorded
    if not spec:
        raise ValueError(f"{args.latents} does not record its model; pass --model SPEC")
    files = [out / _safe_relative(n) for n in output_names(data.names)]
    saved = _saved_record(out)
    if saved is None:
        refuse_to_overwrite(files, "choose another --out (decode never replaces images, such as the originals it encoded)")
    seed = args.seed if args.seed is not None else int(data.meta.get("seed") or 0)
    # A preset's random weights are only the encoding model's when drawn from the same seed.
    torch.manual_seed(seed)
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
    weights = weights_sha1(model)
    encoded_by = data.meta.get("tokenizer_sha1")
    if encoded_by is not None and encoded_by != weights:
        print(f"softvq: warning: {args.latents} was encoded by other weights than {spec}'s (encode had "
              f"{recorded}; trained further since, or another model): the images may not show what was encoded; "
              f"pass the --model that encoded them", file=sys.stderr)
    elif encoded_by is None and args.model and recorded and portable_spec(args.model) != recorded:
        # a file of an older softvq records the model's path alone
        print(f"softvq: warning: {args.latents} was encoded with {recorded}; decoding with {args.model}",
              file=sys.stderr)
    batch = args.batch_size
    digest = _latents_sha1(data)
    record = {"latents": str(Path(args.latents).resolve()), "latents_sha1": digest,
              "model": portable_spec(spec), "tokenizer_sha1": weights, "seed": seed,
              "precision": model.precision, "batch_size": batch, "image_size": size, "images": len(files)}
    if saved is not None:
        if saved.get("latents_sha1") not in (None, digest) and saved["latents_sha1"] == _file_sha1(args.latents):
            saved["latents_sha1"] = digest  # an older softvq recorded the file's own sha1
        # where the latents and the tokenizer are is no part of what was decoded: their sha1s are;
        # nor, without a generative decoder's per-batch noise, is the batch size
        apart = ("latents", "model") + (() if model.config.decoder_noise_dim else ("batch_size",))
        changed = changed_settings({k: v for k, v in saved.items() if k not in apart},
                                   {k: v for k, v in record.items() if k not in apart})
        # images there, under this decode's names or the earlier one's: none made yet, nothing to mix
        if changed and _holds_images(out):
            raise FileExistsError(f"{out} holds a decode of other latents or options ({'; '.join(changed)}); run "
                                  f"that decode again to continue it, or choose another --out")
    write_json(out / RECORD, record)
    remove_stale_temporaries(out, recursive=True)  # images a killed decode was writing
    device = next(model.parameters()).device
    starts = [s for s in range(0, len(files), batch) if not all(f.is_file() for f in files[s:s + batch])]
    with torch.inference_mode():
        for start in tqdm(starts, desc="decode", unit="batch", disable=None):
            z = data.latents[start:start + batch].to(device)
            # each batch its own noise (a generative decoder): a continued decode makes the same images
            generator = torch.Generator().manual_seed(derived_seed(seed, start))
            images = model.decode(z, size, generator=generator).float().cpu()
            for image, file in zip(images, files[start:start + batch]):
                # mypy cannot infer the type of a lambda with a default argument (im binds this image)
                atomic_write(file, lambda p, im=image: to_pil(im).save(p, format="PNG"))  # type: ignore[misc]
    made = sum(len(files[s:s + batch]) for s in starts)
    kept = f" ({len(files) - made} already there from an earlier run)" if made < len(files) else ""
    print(f"decoded {made} image(s) with {model.source} -> {out}{kept}")
    return 0


def _saved_record(out: Path) -> dict | None:
    """The settings an earlier decode into ``out`` recorded, or None where it holds no record."""
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        raise FileExistsError(f"{path} is not a record softvq decode wrote; choose another --out")
    return saved


def _holds_images(out: Path) -> bool:
    """Whether ``out`` holds a finished image of any decode (a killed one's temporaries aside)."""
    return any(p.suffix == ".png" and not p.name.startswith(".") and p.is_file() for p in out.rglob("*"))


def _latents_sha1(data: LatentsFile) -> str:
    """sha1 of what a latents file holds (the latents, their names, the sorted metadata), not of its
    bytes: safetensors writes the metadata in another order in every process, so the same images
    encoded again made another file."""
    digest = hashlib.sha1(json.dumps([data.names, data.meta], sort_keys=True).encode("utf-8", "surrogateescape"))
    digest.update(data.latents.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
