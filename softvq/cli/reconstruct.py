"""``softvq reconstruct [IMG ...] --model SPEC --out DIR``: encode and decode images.

For each image writes ``<name>_recon.png`` and ``<name>_side_by_side.png`` (original |
reconstruction, named, with the PSNR under it) and prints its PSNR, then the mean; ``psnr.csv``
keeps every PSNR and the mean (after a Ctrl-C, those of the images done). Each PNG is written
whole (atomically). ``--out``'s ``.reconstruct-outputs`` names every file reconstruct wrote there:
a rerun replaces those, refuses to replace any other file, and does not read them back as inputs.

An interrupted run (Ctrl-C, a kill, a crash) continues when rerun with the same weights and size
settings: ``--out``'s ``.reconstruct-progress`` lists the images done, and those whose input is
unchanged and whose PNGs are there are not made again (a generative decoder draws its noise per
batch, so the images made after the stop are other samples than an unbroken run's). A finished run
removes it, and a rerun then makes them all again.

IMG may be a folder (its images, recursively;
unreadable ones are skipped and listed, where an unreadable named file is an error). Without IMG
the photos bundled with scikit-image / scikit-learn are used. Images must have the model's size
unless ``--resize`` (centre-crop + bicubic resize) or ``--native-size`` (any size that is a
multiple of the patch, up to 4x the trained side; position embeddings are resized) is given.
Sizes are checked from the files' headers before any compute; images are then read batch by batch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from softvq.atomic import atomic_write, remove_stale_temporaries
from softvq.cli.common import (add_model_arguments, indented_lines, load_tokenizer, make_distinct, positive_int,
                               refuse_unwritable, seed_int)
from softvq.data.folder import scan_folder
from softvq.data.images import ImageReadError, ImageSizeError, bundled_photos, header_sizes, read_image, to_pil
from softvq.evaluation import metrics
from softvq.messages import first_few
from softvq.resume import weights_sha1


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of two uint8 (H, W, 3) images (peak 255); ``inf`` when they are identical."""
    # torch.tensor copies: PIL's arrays are read-only, which torch.from_numpy warns about.
    pair = [torch.tensor(image).permute(2, 0, 1)[None] for image in (original, reconstruction)]
    return float(metrics.psnr(*pair, data_range=255))


def side_by_side(left: Image.Image, right: Image.Image, psnr_db: float | None = None) -> Image.Image:
    """``left`` (the original) and ``right`` (its reconstruction) next to each other with a white
    gutter between them, named under each, with the PSNR under the reconstruction."""
    from PIL import ImageDraw

    from softvq.captions import draw_under, ink_box, text_width, tile_font

    gutter = SIDE_BY_SIDE_GUTTER
    height = max(left.height, right.height)
    font = tile_font(height, largest=14)
    score = f"{psnr_db:.1f} dB" if psnr_db is not None else ""
    captions = ["original"]
    for text in (f"reconstruction, {score}" if score else "reconstruction", score, ""):
        if text_width([text], font) <= right.width:
            captions.append(text)
            break
    if text_width(captions[:1], font) > left.width:
        captions[0] = ""
    _, upper, _, lower = ink_box("original reconstruction 0123456789 dB", font)
    strip = int(lower - upper) + 4
    canvas = Image.new("RGB", (left.width + gutter + right.width, height + strip), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gutter, 0))
    draw = ImageDraw.Draw(canvas)
    for text, x, width in ((captions[0], 0, left.width), (captions[1], left.width + gutter, right.width)):
        if text:
            draw_under(draw, text, x, width, height + 2 - upper, font)
    return canvas


SIDE_BY_SIDE_GUTTER = 4  # px of white between the original and its reconstruction


def unique_stems(paths: list[Path]) -> list[str]:
    """File stems, made unique with a counter where two inputs share a name (``a.png``, ``a.jpg``
    -> ``a``, ``a-1``), also against an input whose own stem is ``a-1``."""
    return make_distinct([path.stem for path in paths])


def _save_png(image: Image.Image, path: Path) -> None:
    """Whole files only: a run stopped mid-write leaves no half PNG under the output's name."""
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reconstruct", help="images -> reconstructions and side-by-side PNGs with PSNR",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMG", help="image files or folders (default: the bundled photos)")
    add_model_arguments(p)
    p.add_argument("--out", default="reconstructions", metavar="DIR", help="output folder (default: reconstructions)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--resize", action="store_true", help="centre-crop and resize to the model's image size")
    size.add_argument("--native-size", action="store_true",
                      help="keep each image's size (sides must be multiples of the patch size)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed for a preset's random weights and a generative decoder's noise")
    p.set_defaults(func=run)


def named_and_found(arguments: list[str]) -> list[tuple[Path, bool]]:
    """(path, named on the command line) for each IMG argument, a folder standing for its images."""
    entries: list[tuple[Path, bool]] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            entries += [(f, False) for f in scan_folder(path, "pass image files or folders that hold images")[0]]
        else:
            entries.append((path, True))
    return entries


OUTPUT_SUFFIXES = ("_recon.png", "_side_by_side.png")  # what each image becomes under --out
PSNR_FILE = "psnr.csv"  # every image's PSNR and the mean, beside the images
# every file reconstruct has written into --out, a name a line, each before its image: what a rerun
# may replace, and which of a folder's images are outputs rather than inputs
OUTPUTS_RECORD = ".reconstruct-outputs"


def written_before(out: Path) -> set[str]:
    """The names of the files earlier runs of reconstruct wrote into ``out`` (its record; for a
    folder made before the record existed, the outputs its finished ``psnr.csv`` names)."""
    record = out / OUTPUTS_RECORD
    if record.is_file():
        return {line for line in record.read_text(errors="surrogateescape").splitlines() if line}
    names: set[str] = set()
    if (out / PSNR_FILE).is_file():
        with open(out / PSNR_FILE, newline="", errors="surrogateescape") as table:
            for row in csv.reader(table):
                if len(row) == 3 and row[1].endswith(OUTPUT_SUFFIXES[0]):
                    stem = row[1][:-len(OUTPUT_SUFFIXES[0])]
                    names.update(stem + suffix for suffix in OUTPUT_SUFFIXES)
    return names


# an unfinished run's settings (a JSON line) and then, a CSV line each, the images it has made:
# input, reconstruction file, PSNR (all its digits), and the input's size and modification time
PROGRESS_FILE = ".reconstruct-progress"


def _forget_records_of_nothing(out: Path, written: set[str]) -> None:
    """A run that failed before any image was made (in this run or an earlier one) leaves no
    records behind: an otherwise empty --out it made goes away with its lock."""
    if not written:
        for name in (PROGRESS_FILE, OUTPUTS_RECORD):
            (out / name).unlink(missing_ok=True)


def _input_key(path: Path) -> list[str]:
    """An input's size and modification time: an image replaced after it was made is made again."""
    st = path.stat()
    return [str(st.st_size), str(st.st_mtime_ns)]


def done_before(out: Path, settings: dict) -> dict[tuple[str, str], list[str]]:
    """The images an interrupted run with these ``settings`` made: (input, reconstruction file) ->
    (PSNR, size, modification time); {} when there is none, or it ran with other settings (a last
    line cut by a kill is left out, and ended, so that the next row starts a line of its own)."""
    path = out / PROGRESS_FILE
    try:
        with open(path, newline="", errors="surrogateescape") as progress:
            if json.loads(progress.readline() or "null") != settings:
                return {}
            done = {(row[0], row[1]): row[2:] for row in csv.reader(progress) if len(row) == 5}
        with open(path, "rb+") as raw:
            if raw.seek(0, os.SEEK_END):
                raw.seek(-1, os.SEEK_END)
                if raw.read(1) != b"\n":
                    raw.write(b"\n")
        return done
    except (OSError, ValueError):  # none, unreadable, or a header cut short
        return {}


# --native-size up to 4x the trained side: the position embeddings are interpolated from the trained
# grid, and attention's cost grows with the square of the tokens (a 12000 px photo: 560,000 tokens).
NATIVE_SIDE_FACTOR = 4


def check_before_reading(entries: list[tuple[Path, bool]], size: int | None, resize: bool, patch: int,
                         trained: int) -> None:
    """Fail before any compute: a named file that does not open, and every image whose size needs
    --resize (all named at once), read from the files' headers. Folder files that do not open are
    left to the reading, which skips and lists them."""
    wrong, named_bad = [], None
    for (path, named), found in zip(entries, header_sizes([path for path, _ in entries])):
        if found is None:
            if named and named_bad is None:
                named_bad = path
            continue
        w, h = found
        if resize:
            continue
        if size is not None and (w, h) != (size, size):
            wrong.append(f"{path}: {w}x{h}, not {size}x{size}")
        elif size is None and (w % patch or h % patch):
            wrong.append(f"{path}: {w}x{h}, not a multiple of the patch size {patch}")
        elif size is None and max(w, h) > NATIVE_SIDE_FACTOR * trained:
            wrong.append(f"{path}: {w}x{h}, over {NATIVE_SIDE_FACTOR}x the {trained} px the model was trained at")
    if named_bad is not None:
        read_image(named_bad)  # raises the reader's own message, which says why
    if len(wrong) == 1:
        raise ImageSizeError(f"{wrong[0]}; pass --resize to centre-crop and resize it")
    if wrong:
        raise ImageSizeError(f"{len(wrong)} of the {len(entries)} images do not fit the model as they are; "
                             f"pass --resize to centre-crop and resize them:{indented_lines(wrong)}")


def run(args: argparse.Namespace) -> int:
    from softvq.run_lock import RunLock

    out = Path(args.out)
    refuse_unwritable(out, "--out", "reconstruct writes a folder of images")
    with RunLock(out):  # one reconstruct per folder: two would overwrite each other's images and records
        return _reconstruct(args, out)


def _reconstruct(args: argparse.Namespace, out: Path) -> int:
    entries = named_and_found(args.images)
    resize = args.resize
    if not entries:
        entries = [(p, True) for p in bundled_photos()]
        # The bundled photos come in many sizes: resizing them is the only sensible default.
        resize = not args.native_size
        print(f"no images given: using the {len(entries)} photos bundled with scikit-image/scikit-learn")
    # an --out inside a folder given: a second run would reconstruct the first run's outputs
    written = written_before(out)
    records = {out.resolve(): written}  # each folder's record, read once

    def an_output(path: Path) -> bool:
        folder = path.parent.resolve()
        if folder not in records:
            records[folder] = written_before(folder)
        return path.name in records[folder]

    ours = {p for p, named in entries if not named and an_output(p)}
    if ours:
        entries = [(p, named) for p, named in entries if p not in ours]
        print(f"left out {len(ours)} earlier output(s) of reconstruct (named in their folder's {OUTPUTS_RECORD})",
              file=sys.stderr)
        if not entries:
            raise ImageReadError("the folders given hold only earlier outputs of reconstruct; pass the folder of "
                                 "the originals")
    all_stems = unique_stems([path for path, _ in entries])
    planned = [stem + suffix for stem in all_stems for suffix in OUTPUT_SUFFIXES]
    theirs = [name for name in planned if name not in written and os.path.lexists(out / name)]
    if theirs:  # e.g. a photo of the user's called a_recon.png, in the folder given as --out too
        raise FileExistsError(f"--out {out} holds {first_few(theirs, 3)}, which reconstruct did not write and "
                              f"would replace: choose another --out")
    torch.manual_seed(args.seed)
    model = load_tokenizer(args.model, args.device, precision=args.precision)
    c = model.config
    size = None if args.native_size else c.image_size
    check_before_reading(entries, size, resize, c.patch_size, c.image_size)  # --out exists: its lock made it
    print(f"model: {model.source}")
    settings = {"weights_sha1": weights_sha1(model), "precision": args.precision, "size": size, "resize": resize,
                **({"seed": args.seed, "batch_size": args.batch_size} if c.decoder_noise_dim else {})}
    done = done_before(out, settings)
    if not done:
        atomic_write(out / PROGRESS_FILE, lambda p: p.write_text(json.dumps(settings) + "\n"))
    # Streamed batch by batch: a folder of 50,000 images is never held in memory at once.
    scores: list[float] = []
    rows: list[list[str]] = []  # psnr.csv: image, its reconstruction's file, PSNR
    skipped: list[str] = []
    stems = iter(all_stems)
    batch = max(1, args.batch_size if size is not None else 1)
    device = next(model.parameters()).device
    remove_stale_temporaries(out)  # PNGs a killed run was writing
    record_path = out / OUTPUTS_RECORD
    carried = sorted(written) if not record_path.is_file() else []  # a folder made before the record existed

    def write_table(mean_label: str) -> float:
        mean = float(np.mean(scores))
        table = io.StringIO()
        csv.writer(table, lineterminator="\n").writerows([["image", "reconstruction", "psnr_db"], *rows,
                                                          [mean_label, "", f"{mean:.4f}"]])
        atomic_write(out / PSNR_FILE, lambda p: p.write_text(table.getvalue()))
        return mean

    carried_over: list[Path] = []

    def made_before(path: Path, stem: str) -> bool:
        """Carries an image an interrupted run made (unchanged input, both PNGs there) into the table."""
        row = done.get((str(path), stem + OUTPUT_SUFFIXES[0]))  # the same file given twice has two stems
        if row is None or not all((out / (stem + suffix)).is_file() for suffix in OUTPUT_SUFFIXES):
            return False
        try:
            if row[1:] != _input_key(path):
                return False
        except OSError:
            return False
        scores.append(float(row[0]))
        rows.append([str(path), stem + OUTPUT_SUFFIXES[0], f"{scores[-1]:.4f}"])
        carried_over.append(path)
        return True

    try:
        with open(record_path, "a", errors="surrogateescape") as record, \
                open(out / PROGRESS_FILE, "a", newline="", errors="surrogateescape") as progress_file, \
                torch.inference_mode(), tqdm(total=len(entries), desc="reconstruct", unit="img", disable=None) as bar:
            record.write("".join(name + "\n" for name in carried))  # the outputs its psnr.csv names
            progress = csv.writer(progress_file)
            for start in range(0, len(entries), batch):
                images, paths, names = [], [], []
                for (path, named), stem in zip(entries[start:start + batch], stems):
                    if made_before(path, stem):
                        continue
                    try:
                        images.append(read_image(path, size, resize=resize, multiple_of=c.patch_size))
                        paths.append(path)
                        names.append(stem)
                    except ImageReadError as exc:
                        if named or isinstance(exc, ImageSizeError):
                            raise
                        skipped.append(str(exc))
                bar.update(len(entries[start:start + batch]))
                if not images:
                    continue
                recon = model(torch.stack(images).to(device)).reconstruction.float().cpu()
                for image, result_tensor, path, stem in zip(images, recon, paths, names):
                    original, result = to_pil(image), to_pil(result_tensor)
                    score = psnr(np.asarray(original), np.asarray(result))
                    scores.append(score)
                    names_out = [stem + suffix for suffix in OUTPUT_SUFFIXES if stem + suffix not in written]
                    record.write("".join(name + "\n" for name in names_out))
                    record.flush()  # before the images: a run stopped between the two still owns them
                    written.update(names_out)
                    recon_file = out / f"{stem}{OUTPUT_SUFFIXES[0]}"
                    _save_png(result, recon_file)
                    _save_png(side_by_side(original, result, score), out / f"{stem}{OUTPUT_SUFFIXES[1]}")
                    rows.append([str(path), recon_file.name, f"{score:.4f}"])
                    progress.writerow([str(path), recon_file.name, repr(score), *_input_key(path)])  # the mean's own
                    progress_file.flush()  # after the images: what it lists is there
                    tqdm.write(f"{path}: PSNR {score:.2f} dB -> {recon_file}")
    except KeyboardInterrupt:  # the images done keep their PSNRs, and a rerun continues after them
        if scores:
            write_table(f"mean of the {len(scores)} done (interrupted)")
            print(f"the PSNRs of the {len(scores)} image(s) reconstructed so far are in {out / PSNR_FILE}; rerun "
                  f"the same command to continue", file=sys.stderr)
        raise
    except BaseException:
        _forget_records_of_nothing(out, written)
        raise
    if skipped:
        print(f"skipped {len(skipped)} unreadable image file(s):{indented_lines(skipped)}", file=sys.stderr)
    if not scores:
        _forget_records_of_nothing(out, written)
        raise ImageReadError("none of the images given could be read")
    mean = write_table("mean")
    (out / PROGRESS_FILE).unlink(missing_ok=True)  # finished: a rerun makes them all again
    if carried_over:
        print(f"continued an interrupted run: {len(carried_over)} image(s) were made before it stopped")
    print(f"mean PSNR over {len(scores)} image(s): {mean:.2f} dB (each in {out / PSNR_FILE})")
    return 0
