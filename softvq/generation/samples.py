"""A folder of generated samples, written as they are made and resumed after an interruption.

The layout (what ``softvq eval --samples`` and :func:`softvq.evaluation.generated.sample_folder`
read):

* ``images/000000.png`` ...: one PNG per sample, in label order, each written atomically;
* ``samples.json``: the settings that determine the samples (generator, tokenizer and the sha1 of
  their weights, sampler, guidance, seed, batch size, decode precision), the labels and class
  names, and ``finished``;
* ``grid.png``: the first samples of the first classes, one row per class;
* ``samples.npz`` (on request, :func:`pack_npz`): the images as one uint8 array, the "sample
  batch" that ADM's reference evaluator reads.

The paper's gFID protocol draws 50,000 samples (Sec. 4.1), hours of sampling. Nothing is kept
in memory beyond one batch, and every batch draws its noise from its own seed, derived from the
run's seed and the batch's first index. So a rerun with the same settings skips the batches whose
images exist and makes exactly the images the uninterrupted run would have made; a rerun with
other settings is refused, since its samples would be scored together with these.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from softvq.atomic import atomic_write, write_json
from softvq.generation.checkpoint import Generator, GeneratorMeta
from softvq.generation.sampling import SamplerSpec, denormalize, has_null_class, label_indices, sample_latents
from softvq.messages import first_few
from softvq.randomness import check_seed, derived_seed
from softvq.resume import changed_settings, weights_sha1
from softvq.run_lock import lock_run_folder
from softvq.training.accelerator import decided_by_main_process, same_on_every_process

if TYPE_CHECKING:
    from accelerate import Accelerator

    from softvq.tokenizer import Tokenizer

SAMPLE_IMAGES, SAMPLE_RECORD, SAMPLE_GRID, SAMPLE_NPZ = "images", "samples.json", "grid.png", "samples.npz"
GRID_ROWS = GRID_COLUMNS = 16  # a 1000-class, 50-per-class run would otherwise make a gigapixel grid
DIVERGED = 50.0  # |normalised latent| above this (data is ~N(0, 1)): the sampler ran away


@dataclass
class GeneratedSamples:
    """What :func:`write_samples` did: the folder, how many samples it holds, how many this call
    made (the rest existed from an interrupted run), and whether a sample diverged (a normalised
    latent beyond 50 standard deviations: an undertrained generator, or MAR's unclipped first steps)."""

    folder: Path
    count: int
    made: int
    diverged: bool = False

    @property
    def images(self) -> Path:
        """The folder of sample PNGs."""
        return self.folder / SAMPLE_IMAGES

    @property
    def grid(self) -> Path:
        """The PNG grid of the first samples."""
        return self.folder / SAMPLE_GRID


def batch_seed(seed: int, first_index: int) -> int:
    """The seed of the batch whose first sample has index ``first_index`` (independent streams
    per batch: :func:`softvq.randomness.derived_seed`)."""
    return derived_seed(seed, first_index)


def image_path(folder: Path, index: int) -> Path:
    """Where sample ``index`` of a samples folder is written: ``images/NNNNNN.png``."""
    return folder / SAMPLE_IMAGES / f"{index:06d}.png"


def sample_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``samples.json`` of a samples folder, or None where it is missing or is not one this
    resumable sampler wrote (unreadable, or without ``finished``)."""
    try:
        record = json.loads((Path(folder) / SAMPLE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "finished" in record else None


def _claim(folder: Path, record: dict[str, Any]) -> None:
    """Check that ``folder`` is empty or holds a run with exactly these settings (FileExistsError if not)."""
    record_path = folder / SAMPLE_RECORD
    if record_path.is_file():
        old = sample_record(folder)
        if old is None:
            raise FileExistsError(f"{record_path} was not written by this version's resumable sampler; "
                                  f"choose an empty --out for new samples")
        # class_names follow from the labels and the generator's meta (its weights' sha1 is compared);
        # folders of earlier versions name the null class by its index
        changed = changed_settings(old, record, ignore=["finished", "class_names"])
        images = folder / SAMPLE_IMAGES
        if changed and not (images.is_dir() and any(images.iterdir())):
            return  # a run that stopped before its first image: nothing to mix, so it is made afresh
        if changed:
            raise FileExistsError(
                f"{folder} holds samples made with other settings ({'; '.join(changed)}); their images would be "
                f"scored with these. Rerun with the same settings to continue that run, or choose an empty --out")
        return
    images = folder / SAMPLE_IMAGES
    if images.is_dir() and any(images.iterdir()):
        raise FileExistsError(f"{images} already holds files but {folder} has no {SAMPLE_RECORD}: they are not "
                              f"samples this command can continue; choose an empty --out")
    # an image folder, a run or a latent set would gain images/, grid.png and samples.json (and an image
    # folder a class named "images"): only a new or empty folder becomes a samples folder (dot files are
    # temporaries of atomic writes, or a desktop's own)
    held = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    if held:
        raise FileExistsError(f"{folder} is not empty (it holds {first_few(held, 1)}) and holds no {SAMPLE_RECORD}: "
                              f"writing images/, grid.png and {SAMPLE_RECORD} there would mix them with its files; "
                              f"choose a new or empty --out")


class OtherTokenizerWarning(UserWarning):
    """:func:`write_samples` decodes with other tokenizer weights than those that made the
    generator's latents (``meta.tokenizer_sha1``)."""


def write_samples(model: Generator, meta: GeneratorMeta, tokenizer: "Tokenizer", labels: Tensor | Sequence[int | str],
                  spec: SamplerSpec, folder: str | Path, *, seed: int = 0, batch_size: int = 64,
                  record: dict[str, Any] | None = None, progress: bool = True,
                  accelerator: "Accelerator | None" = None) -> GeneratedSamples:
    """Sample one image per label, decode it with ``tokenizer``, and write the folder described in
    the module docstring; continue an interrupted run with the same settings. ``labels`` are class
    indices or names from ``meta.classes``; index ``num_classes`` samples unconditionally.

    ``record`` adds JSON-able entries to ``samples.json`` (the CLI puts the generator and tokenizer
    it was given there); together with the sampler settings, seed, batch size and labels they are
    what a resumed run must repeat. With an ``accelerate.Accelerator`` of several processes
    (``torchrun`` / ``accelerate launch``), process r makes batches r, r + n, r + 2n, ...: the
    images are those one process makes, since each batch has its own seed. Every process must
    call this; the returned counts are over all of them.
    """
    from tqdm.auto import tqdm

    from softvq.data.images import to_pil

    folder = Path(folder)
    seed = check_seed(seed)
    labels = label_indices(labels, meta.classes, model.config.num_classes, has_null_class(model))
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
    if len(labels) == 0:
        raise ValueError("no labels to sample")
    if (tokenizer.num_tokens, tokenizer.latent_dim) != tuple(model.input_shape):
        raise ValueError(f"{tokenizer.source} makes ({tokenizer.num_tokens}, "
                         f"{tokenizer.latent_dim}) latents but the generator models {tuple(model.input_shape)}: "
                         f"pass the tokenizer it was trained on")
    tokenizer_sha1 = weights_sha1(tokenizer)
    other = meta.other_tokenizer(tokenizer_sha1, f"decoding with {tokenizer.source}")
    if other is not None:
        warnings.warn(f"{other}: the images may not show what the generator learned; pass the tokenizer "
                      f"pretokenize used", OtherTokenizerWarning, stacklevel=2)
    # every sampler setting is checked here, before the folder is claimed: a refused one must not
    # leave a samples.json that makes the corrected rerun "other settings"
    method, steps = spec.check(model, meta), spec.resolved_steps(meta.objective)
    names = [_class_name(c, meta, model.config.num_classes) for c in labels.tolist()]
    settings: dict[str, Any] = {
        **(record or {}), "objective": meta.objective, "method": method, "steps": steps,
        "cfg": spec.guidance.scale, "interval": [spec.guidance.low, spec.guidance.high],
        **({"ar_steps": spec.ar_steps or model.config.num_tokens, "temperature": spec.temperature,
            "cfg_schedule": spec.cfg_schedule} if meta.objective == "mar" else {}),
        **({"clip_x0": spec.clip_x0} if meta.objective != "sit" else {}),
        "precision": tokenizer.precision, "seed": seed, "batch_size": batch_size,
        # the paths above may hold other weights by now (a generator trained further, say)
        "generator_sha1": weights_sha1(model), "tokenizer_sha1": tokenizer_sha1,
        "labels": labels.tolist(), "class_names": names,
    }
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    same_on_every_process({**settings, "out": str(folder)}, world)  # another seed on one process mixed two runs

    def claim() -> None:
        _claim(folder, settings)
        write_json(folder / SAMPLE_RECORD, {**settings, "finished": False})
        (folder / SAMPLE_IMAGES).mkdir(parents=True, exist_ok=True)

    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; --out is the folder the samples are written to")
    # one sampler per folder: two would write each other's images, and clear each other's temporaries
    with lock_run_folder(folder, accelerator, inside_command=True):
        decided_by_main_process(accelerator, claim)  # one process claims the folder; all learn its verdict

        device = next(tokenizer.parameters()).device
        starts = range(0, len(labels), batch_size)
        mine = [s for b, s in enumerate(starts) if b % world == rank]
        todo = [s for s in mine
                if not all(_intact_png(image_path(folder, i)) for i in range(s, min(s + batch_size, len(labels))))]
        made, diverged = 0, False
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress or rank != 0, unit="batch",
                   desc=f"generate ({method}, {steps} steps)" + (", resumed" if len(todo) < len(mine) else "")
                   + (f", {world} processes" if world > 1 else ""))
        for start in todo:
            batch = labels[start:start + batch_size]
            generator = torch.Generator().manual_seed(batch_seed(seed, start))
            x_norm = sample_latents(model, meta, batch, spec, generator=generator)
            if float(x_norm.abs().max()) > DIVERGED:
                diverged = True
            with torch.inference_mode():
                x = tokenizer.decode(denormalize(x_norm, meta).to(device), generator=generator).clamp(-1, 1).cpu()
            for i, image in enumerate(x):
                # mypy cannot infer the type of a lambda with a default argument (im binds this image)
                atomic_write(image_path(folder, start + i),
                             lambda p, im=image: to_pil(im).save(p, format="PNG"))  # type: ignore[misc]
            made += len(batch)
            bar.update(1)
        bar.close()
        if world > 1:
            assert accelerator is not None  # world comes from it
            accelerator.wait_for_everyone()
            totals = accelerator.reduce(torch.tensor([made, int(diverged)], device=accelerator.device), reduction="sum")
            made, diverged = int(totals[0]), bool(totals[1])
        if rank == 0:
            captions = {c: _class_name(c, meta, model.config.num_classes, caption=True) for c in set(labels.tolist())}
            _write_grid(folder, labels, captions)
            write_json(folder / SAMPLE_RECORD, {**settings, "finished": True})
        if world > 1:
            assert accelerator is not None
            accelerator.wait_for_everyone()  # nobody reads the folder before it is finished
        return GeneratedSamples(folder, len(labels), made, diverged)


def _class_name(index: int, meta: GeneratorMeta, num_classes: int, caption: bool = False) -> str:
    """What ``samples.json`` and the grid call class ``index``: its name in the meta, "unconditional"
    for the null class, else the index; a ``caption`` puts the index before a name."""
    if index == num_classes:
        return "unconditional"
    if index < len(meta.classes):
        return f"{index}: {meta.classes[index]}" if caption else meta.classes[index]
    return str(index)


def pack_npz(folder: str | Path) -> Path:
    """Pack a finished samples folder into ``FOLDER/samples.npz``: ``arr_0`` the images as one (N, H,
    W, 3) uint8 array in sample order, ``arr_1`` their labels (int64), and return its path.

    This is the "sample batch" of ADM's reference evaluator (guided-diffusion's
    ``evaluations/evaluator.py``, which reads ``arr_0``), as DiT's ``sample_ddp.py`` and
    guided-diffusion's ``image_sample.py`` write it; the DiT, SiT and SoftVQ papers report gFID from
    that evaluator. The array is streamed image by image into an uncompressed zip (50,000 256 px
    samples make 9.8 GB, more than a stacked copy should take in memory) and the file is written
    atomically. A folder whose run is not finished is refused: its images are not all there.
    """
    import zipfile

    import numpy as np
    from PIL import Image

    from softvq.atomic import remove_stale_temporaries

    folder = Path(folder).expanduser()
    record = sample_record(folder)
    if record is None:
        raise FileNotFoundError(f"{folder} holds no {SAMPLE_RECORD} of softvq generate: not a samples folder")
    remove_stale_temporaries(folder)  # a pack killed mid-write left a temporary as large as the samples
    if not record["finished"]:
        raise ValueError(f"the samples in {folder} are not finished; run the same generate command again to "
                         f"finish them, then pack them")
    labels = list(record.get("labels", []))
    with Image.open(image_path(folder, 0)) as first:
        height, width = first.height, first.width
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(labels), height, width, 3)}

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for index in range(len(labels)):
                    with Image.open(image_path(folder, index)) as image:
                        pixels = np.asarray(image.convert("RGB"))
                    if pixels.shape != (height, width, 3):
                        raise ValueError(f"{image_path(folder, index)} is {pixels.shape[1]}x{pixels.shape[0]}, "
                                         f"the first sample {width}x{height}: not one sample batch")
                    member.write(pixels.tobytes())
            with archive.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64))

    out = folder / SAMPLE_NPZ
    atomic_write(out, write)
    return out


def _intact_png(path: Path) -> bool:
    """Whether ``path`` is a whole PNG. Ours are written atomically, but a copied or damaged folder
    may hold a truncated one: its batch is made again instead of failing every rerun."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.verify()  # reads every chunk and checks its CRC, without decoding the pixels
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _write_grid(folder: Path, labels: Tensor, captions: dict[int, str] | None = None) -> None:
    """One row per class (the first GRID_ROWS classes), its first GRID_COLUMNS samples, read back
    from the PNGs so a resumed run draws the same grid. ``captions`` ({label: text}, e.g.
    "207: golden retriever") are written in a margin left of each row."""
    from PIL import Image, ImageDraw

    from softvq.captions import draw_beside, text_width, tile_font

    rows: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        if label in rows or len(rows) < GRID_ROWS:
            cells = rows.setdefault(label, [])
            if len(cells) < GRID_COLUMNS:
                cells.append(index)
    columns = max(len(cells) for cells in rows.values())
    with Image.open(image_path(folder, 0)) as first:
        w, h = first.size
    gap = 2
    font = tile_font(h, largest=16)
    texts = [_shortened(captions[label]) if captions and label in captions else "" for label in rows]
    margin = text_width(texts, font)
    margin = int(margin) + 2 * gap + 4 if margin else 0
    canvas = Image.new("RGB", (margin + columns * (w + gap) + gap, len(rows) * (h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (cells, text) in enumerate(zip(rows.values(), texts)):
        top = gap + r * (h + gap)
        if text:
            draw_beside(draw, text, gap + 2, top, h, font)
        for c, index in enumerate(cells):
            with Image.open(image_path(folder, index)) as tile:
                canvas.paste(tile.convert("RGB"), (margin + gap + c * (w + gap), top))
    atomic_write(folder / SAMPLE_GRID, lambda p: canvas.save(p, format="PNG"))


def _shortened(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
