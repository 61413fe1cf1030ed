"""Images -> latent shards a generator trains on (the release pre-extracts latents the same way).

A shard folder holds

* ``latents-00000.safetensors``, ... : tensors ``latents`` (N, L, D) float32 and ``labels`` (N,)
  int64, with the sample names as JSON in the file's metadata (key ``names``);
* ``meta.json``: the tokenizer that made them, L, D, the class names, and the latent statistics
  ``latent_mean`` / ``latent_std`` (scalars over every element of the set, float64 sums) that the
  generator normalises with, (z − mean) / std (the release stores such scalars with each tokenizer).

Sources: an image folder (one class per sub-folder, or a single class when the images sit
directly in it), or random crops of the photos bundled in scikit-image / scikit-learn (one class
per photo, or a single class).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from softvq.checkpoint.pretrained import atomic_write
from softvq.data.folder import scan_folder
from softvq.data.images import ImageReadError, bundled_photos, load_rgb, read_image, to_tensor

META_NAME = "meta.json"
FORMAT = "softvq-latents"

Sample = tuple[Tensor, int, str]  # image (3, H, W) in [-1, 1], label, name


@dataclass
class LatentSource:
    """Samples to encode, their class names, and how many there are."""

    samples: Iterable[Sample]
    classes: list[str]
    count: int
    skipped: list[str] = field(default_factory=list)  # unreadable files, filled while iterating


def folder_source(folder: str | Path, image_size: int, single_class: bool = False) -> LatentSource:
    """Images under ``folder``, centre-cropped and resized to ``image_size``. Labels come from the
    first-level sub-folder names (sorted); images directly in ``folder`` form one class."""
    folder = Path(folder)
    files = scan_folder(folder, "pass --images a folder of images (sub-folders = classes)")[0]
    names = sorted({f.relative_to(folder).parts[0] for f in files if len(f.relative_to(folder).parts) > 1})
    if single_class or not names:
        classes, label_of = [folder.name or "images"], (lambda f: 0)
    else:
        if any(len(f.relative_to(folder).parts) == 1 for f in files):
            raise ValueError(f"{folder} mixes images and class sub-folders; move the loose images into a "
                             f"sub-folder or pass --single-class")
        index = {n: i for i, n in enumerate(names)}
        classes, label_of = names, (lambda f: index[f.relative_to(folder).parts[0]])

    skipped: list[str] = []

    def samples() -> Iterator[Sample]:
        for f in files:
            try:  # a corrupt file is skipped and counted, as in `softvq encode`, not the end of the run
                image = read_image(f, image_size, resize=True)
            except ImageReadError as exc:
                skipped.append(str(exc))
                continue
            yield image, label_of(f), str(f.relative_to(folder))

    return LatentSource(samples(), classes, len(files), skipped)


def bundled_source(image_size: int, crops_per_photo: int = 32, seed: int = 0, single_class: bool = False,
                   scales: tuple[float, float] = (0.25, 1.0)) -> LatentSource:
    """Random square crops (side a log-uniform fraction ``scales`` of the shorter side, random
    horizontal flip) of each bundled photo, resized to ``image_size``; one class per photo."""
    from softvq.data.transforms import random_flip, random_scale_crop, sample_rng

    photos = bundled_photos()
    classes = ["photos"] if single_class else [p.stem for p in photos]

    def samples() -> Iterator[Sample]:
        position = 0
        for label, path in enumerate(photos):
            img = load_rgb(path)
            for k in range(crops_per_photo):
                rng = sample_rng(seed, position)
                position += 1
                crop = random_flip(random_scale_crop(img, image_size, rng, scales), rng)
                yield to_tensor(crop), 0 if single_class else label, f"{path.stem}-{k:04d}"

    return LatentSource(samples(), classes, len(photos) * crops_per_photo)


@dataclass
class PretokenizeResult:
    folder: Path
    count: int
    latent_mean: float
    latent_std: float
    shards: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def pretokenize(tokenizer, source: LatentSource, out_dir: str | Path, *, tokenizer_spec: str | None = None,
                batch_size: int = 32, shard_size: int = 4096, progress: bool = True) -> PretokenizeResult:
    """Encode every sample of ``source`` with ``tokenizer`` (eval mode) and write shards + meta.json."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if shard_size < 1 or batch_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("latents-*.safetensors")):
        raise FileExistsError(f"{out} already holds latent shards; choose an empty folder")
    tokenizer = tokenizer.eval()
    device = next(tokenizer.parameters()).device
    total, sq_total, elements, count = 0.0, 0.0, 0, 0
    pending: list[tuple[Tensor, Tensor, list[str]]] = []
    shards: list[str] = []

    def flush() -> None:
        if not pending:
            return
        latents = torch.cat([p[0] for p in pending])
        labels = torch.cat([p[1] for p in pending])
        names = [n for p in pending for n in p[2]]
        name = f"latents-{len(shards):05d}.safetensors"
        tensors = {"latents": latents.contiguous(), "labels": labels.contiguous()}
        atomic_write(out / name, lambda p: save_file(tensors, str(p), metadata={"names": json.dumps(names)}))
        shards.append(name)
        pending.clear()

    bar = tqdm(total=source.count, desc="pretokenize", unit="img", disable=not progress)
    buffered = 0
    for batch in _batches(source.samples, batch_size):
        images = torch.stack([b[0] for b in batch]).to(device)
        z = tokenizer.encode_latents(images).float().cpu()
        z64 = z.double()
        total += float(z64.sum())
        sq_total += float((z64 * z64).sum())
        elements += z.numel()
        count += len(batch)
        pending.append((z, torch.tensor([b[1] for b in batch], dtype=torch.long), [b[2] for b in batch]))
        buffered += len(batch)
        if buffered >= shard_size:
            flush()
            buffered = 0
        bar.update(len(batch))
    bar.close()
    flush()
    if count == 0:
        raise ValueError(f"no samples to pretokenize ({len(source.skipped)} unreadable file(s) skipped)")
    mean = total / elements
    std = math.sqrt(max(sq_total / elements - mean * mean, 0.0))
    meta = {
        "format": FORMAT,
        "count": count,
        "num_tokens": tokenizer.num_tokens,
        "latent_dim": tokenizer.latent_dim,
        "image_size": tokenizer.config.image_size,
        "latent_mean": mean,
        "latent_std": std,
        "tokenizer_latent_mean": tokenizer.latent_mean,
        "tokenizer_latent_std": tokenizer.latent_std,
        "tokenizer": tokenizer_spec,
        "tokenizer_precision": tokenizer.precision,
        "classes": source.classes,
        "shards": shards,
        "skipped": source.skipped,
    }
    atomic_write(out / META_NAME, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return PretokenizeResult(out, count, mean, std, shards, source.skipped)


@dataclass
class LatentSet:
    """A whole shard folder in memory: latents (N, L, D), labels (N,), names, and its meta."""

    latents: Tensor
    labels: Tensor
    names: list[str]
    meta: dict

    @property
    def mean(self) -> float:
        return float(self.meta["latent_mean"])

    @property
    def std(self) -> float:
        return float(self.meta["latent_std"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def load_latents(folder: str | Path) -> LatentSet:
    """Read every shard listed in ``meta.json`` (errors name the missing or corrupt file)."""
    from safetensors import safe_open

    folder = Path(folder)
    meta_file = folder / META_NAME
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} has no {META_NAME}; make it with `softvq pretokenize`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file} is not a softvq latent folder")
    latents, labels, names = [], [], []
    for shard in meta["shards"]:
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"latent shard {path} listed in {META_NAME} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                latents.append(f.get_tensor("latents"))
                labels.append(f.get_tensor("labels"))
                names += json.loads((f.metadata() or {}).get("names", "[]"))
        except Exception as exc:
            raise ValueError(f"latent shard {path} is corrupt ({type(exc).__name__})") from None
    return LatentSet(torch.cat(latents), torch.cat(labels), names, meta)
