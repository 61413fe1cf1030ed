"""Images -> latent shards a generator trains on (the release pre-extracts latents the same way).

A shard folder holds

* ``latents-00000.safetensors``, ... : tensors ``latents`` (N, L, D) float32 and ``labels`` (N,)
  int64, with the sample names as JSON in the file's metadata (key ``names``);
* ``meta.json``: the tokenizer that made them (its spec, a local folder as an absolute path, and
  ``tokenizer_sha1``, the sha1 of its weights), L, D, the class names, and the latent statistics
  ``latent_mean`` / ``latent_std`` (scalars over every element of the set) that the generator
  normalises with, (z − mean) / std (the release stores such scalars with each tokenizer). Their
  sums are exact (:func:`exact_sum`), so they come out bit for bit the same however the set was
  split into shards, parts and interruptions.

Sources (:mod:`softvq.generation.latent_sources`): an image folder, or random crops of the photos
bundled in scikit-image / scikit-learn. :func:`softvq.generation.latents.load_latents` reads a
finished folder back.

Encoding ImageNet takes hours, so the work is kept as it is done: each shard holds exactly
``shard_size`` latents and is written atomically, and ``progress.json`` records after each shard
where in the source the next one starts and the running sums of the statistics. Run on the same
folder with the same source, tokenizer and shard size, an interrupted pretokenize continues from
its last shard; ``meta.json`` is written, and ``progress.json`` removed, only when all is done.

Under ``torchrun`` / ``accelerate launch`` (one process per GPU), process r of n encodes the r-th
of n contiguous parts of the source into ``latents-r<r>-00000.safetensors``, ... with its own
``progress-r<r>.json``; when all are done the main process writes ``meta.json`` listing the
shards part by part, so the latents come in the source's order, as from one process (only the
shard boundaries differ: each part's last shard may be short). An interrupted run continues with
the same number of processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from softvq.atomic import atomic_write, remove_stale_temporaries, write_json
from softvq.checkpoint.specs import portable_spec
from softvq.eval_mode import evaluating
from softvq.generation.latent_sources import LatentSource
from softvq.generation.latents import FORMAT, META_NAME, PROGRESS_GLOB, PROGRESS_NAME
from softvq.messages import first_few
from softvq.resume import changed_settings, weights_sha1
from softvq.run_lock import lock_run_folder
from softvq.tokenizer import images_from_softvq_loaders

if TYPE_CHECKING:
    from accelerate import Accelerator

    from softvq.tokenizer import Tokenizer

_LOG = logging.getLogger(__name__)


@dataclass
class PretokenizeResult:
    """What :func:`pretokenize` wrote: the folder, how many latents it holds, the scalar mean and std over
    every latent element (what a generator normalises with), the shard files, and the unreadable images
    left out."""
    folder: Path
    count: int
    latent_mean: float
    latent_std: float
    shards: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _checked_image(image: Any, name: str) -> Tensor:
    """A custom source's image, or a TypeError naming the sample (torch.stack's said neither)."""
    if not isinstance(image, Tensor):
        raise TypeError(f"the source's sample {name!r} is a {type(image).__name__}: a LatentSource yields "
                        f"(3, H, W) float tensors in [-1, 1] (torch.from_numpy(...) for an array)")
    return image


def _class_index(label: Any, name: str, classes: int) -> int:
    """A custom source's label as a class index, or an error naming the sample: one outside the
    classes was written into the set and failed only when a generator trained on it."""
    if isinstance(label, Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= int(label) < classes:
        raise ValueError(f"the source's sample {name!r} has label {label!r}; labels are class indices 0 to "
                         f"{classes - 1} of its {classes} classes")
    return int(label)


def _batches(samples: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _Progress:
    """What is kept of one part of a run after each of its shards (its progress file): enough to
    continue it exactly and, once ``finished``, to merge it into ``meta.json``."""

    settings: dict[str, Any]
    shards: list[str] = field(default_factory=list)
    count: int = 0
    position: int = 0  # source position of the first sample not in a shard
    total: float = 0.0  # float64 sums of the latents' elements and their squares (runs before exact sums)
    sq_total: float = 0.0
    exact_total: int | None = None  # the same sums, exact, in units of 2^-1074 (see exact_sum)
    exact_sq_total: int | None = None
    elements: int = 0
    skipped: list[str] = field(default_factory=list)
    finished: bool = False
    class_counts: dict[str, int] | None = None  # latents per label; None: a run started before they were counted
    # the fields of REWOUND (and len(skipped)) after 0, 1, 2, ... shards, so that a damaged shard is
    # encoded again from there; None: a run started before they were kept
    after_shards: list[dict[str, Any]] | None = None

    # (class_counts are counted again from the kept shards' labels: a copy per shard would grow the
    # file by classes x shards, megabytes for ImageNet, rewritten after every shard)
    REWOUND = ("count", "position", "total", "sq_total", "exact_total", "exact_sq_total", "elements")

    def mark(self) -> None:
        """Remember the state after the shards written so far (call after each shard)."""
        if self.after_shards is not None:
            self.after_shards.append({**{k: getattr(self, k) for k in self.REWOUND}, "skipped": len(self.skipped)})

    def rewind(self, shards: int, folder: Path) -> None:
        """Back to the state after the first ``shards`` shards in ``folder`` (``after_shards`` must
        reach it)."""
        from safetensors import safe_open

        assert self.after_shards is not None and shards < len(self.after_shards)
        kept = self.after_shards[shards]
        for key in self.REWOUND:
            setattr(self, key, kept[key])
        self.skipped = self.skipped[:kept["skipped"]]
        self.shards, self.after_shards = self.shards[:shards], self.after_shards[:shards + 1]
        self.finished = False
        if self.class_counts is not None:
            self.class_counts = {}
            for name in self.shards:
                with safe_open(str(folder / name), "pt") as shard:
                    self.count_labels(shard.get_tensor("labels"))

    def count_labels(self, labels: Tensor) -> None:
        """Add a shard's labels to ``class_counts`` (kept as JSON: string keys)."""
        if self.class_counts is not None:
            for label in labels.tolist():
                self.class_counts[str(label)] = self.class_counts.get(str(label), 0) + 1

    def save(self, path: Path) -> None:
        write_json(path, self.__dict__)

    @classmethod
    def load(cls, path: Path) -> "_Progress":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path} is unreadable ({type(exc).__name__}); delete the folder to start over") from None


EXACT_UNIT_BITS = 1074  # every finite float64 is an integer multiple of 2^-1074


def exact_sum(values: np.ndarray) -> int:
    """The exact sum of float64 ``values``, as an integer number of 2^-1074.

    Float sums depend on their order and grouping; integer ones do not. So the statistics of a
    latent set are the same whether one process wrote it in one go or several wrote it in parts,
    with interruptions between shards."""
    total = 0
    for value in values.tolist():
        if not math.isfinite(value):
            raise ValueError(f"the tokenizer produced a non-finite latent ({value}); check its weights and inputs")
        numerator, denominator = value.as_integer_ratio()  # the denominator is a power of two
        total += numerator * ((1 << EXACT_UNIT_BITS) // denominator)
    return total


def _exact_quotient(total: int, count: int) -> float:
    """total · 2^-1074 / count, correctly rounded."""
    return float(Fraction(total, count << EXACT_UNIT_BITS))


@dataclass(frozen=True)
class _Part:
    """Process ``rank``'s share of a run over ``processes``: source positions [start, stop)."""

    rank: int
    processes: int
    start: int
    stop: int

    @classmethod
    def of(cls, rank: int, processes: int, count: int) -> "_Part":
        return cls(rank, processes, rank * count // processes, (rank + 1) * count // processes)

    @property
    def progress_name(self) -> str:
        return PROGRESS_NAME if self.processes == 1 else f"progress-r{self.rank}.json"

    def shard_name(self, index: int) -> str:
        return f"latents-{'' if self.processes == 1 else f'r{self.rank}-'}{index:05d}.safetensors"


def interrupted_run(out: str | Path) -> bool:
    """Whether ``out`` holds an interrupted pretokenize to continue (False: nothing yet); a finished
    latent set, or shards with no progress record, is a FileExistsError: never written over."""
    out = Path(out)
    if (out / META_NAME).is_file():
        raise FileExistsError(f"{out} already holds a finished latent set ({META_NAME}): train on it with "
                              f"train-generator --latents {out}, or choose an empty folder to make another")
    if any(out.glob(PROGRESS_GLOB)):
        return True
    if any(out.glob("latents-*.safetensors")):
        raise FileExistsError(f"{out} already holds latent shards but no {PROGRESS_NAME} to continue from; "
                              f"choose an empty folder")
    # "tokenizer" holds a preset's weights, kept by the CLI before the folder is claimed; dot files
    # are temporaries of atomic writes (or a desktop's own)
    others = sorted(p.name for p in out.iterdir() if p.name != "tokenizer" and not p.name.startswith(".")) \
        if out.is_dir() else []
    if others:
        raise FileExistsError(f"{out} is not empty (it holds {first_few(others, 1)}) and holds no latent set or "
                              f"interrupted pretokenize; choose an empty folder")
    return False


def _whole_shard(path: Path) -> bool:
    """Whether a shard's header parses and its data covers the file (reads no tensor)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            return True
    except Exception:  # safetensors raises its own error type for any damage
        return False


def interrupted_tokenizer(out: str | Path) -> str | None:
    """The tokenizer spec an interrupted pretokenize in ``out`` was started with (None: none saved)."""
    for saved in sorted(Path(out).glob(PROGRESS_GLOB)):
        return _Progress.load(saved).settings.get("tokenizer")
    return None


def _claim(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds an interrupted run with these settings to continue (False: it is empty);
    a run with other settings, or one whose shards are missing, is refused."""
    out.mkdir(parents=True, exist_ok=True)
    if not interrupted_run(out):
        return False
    records = {saved: _Progress.load(saved) for saved in sorted(out.glob(PROGRESS_GLOB))}
    started = any(progress.shards for progress in records.values())
    for saved, progress in records.items():
        current = dict(settings)
        if "tokenizer_sha1" not in progress.settings:  # runs before the weights were recorded
            del current["tokenizer_sha1"]
        saved_spec = progress.settings.get("tokenizer")
        if saved_spec and portable_spec(saved_spec) == current["tokenizer"]:  # recorded before specs were absolute
            current["tokenizer"] = saved_spec
        changed = changed_settings({"processes": 1, **progress.settings}, current)  # runs before "processes": one
        if changed and not started:
            # stopped (or failed) before its first shard: nothing to mix, so it is made afresh
            for other in records:
                other.unlink()
            remove_stale_temporaries(out)
            return False
        if changed:
            raise FileExistsError(f"{out} holds an interrupted pretokenize with other settings ({'; '.join(changed)}); "
                                  f"rerun it with the same ones to continue, or choose an empty folder")
        bad = next(((i, "missing" if not (out / name).is_file() else "damaged (truncated or overwritten)")
                    for i, name in enumerate(progress.shards)
                    if not (out / name).is_file() or not _whole_shard(out / name)), None)
        if bad is not None:
            index, what = bad
            if progress.after_shards is None or index >= len(progress.after_shards):  # a run from before they were kept
                raise ValueError(f"{out / progress.shards[index]}, listed in {saved}, is {what}; delete the folder to "
                                 f"start over")
            for name in progress.shards[index:]:
                (out / name).unlink(missing_ok=True)
            _LOG.warning(f"{out / progress.shards[index]} is {what}: encoding again from it, after the "
                         f"{index} whole shard(s) before it")
            progress.rewind(index, out)
            progress.save(saved)
    remove_stale_temporaries(out)  # shards a killed run was writing: the continuation writes them again
    return True


@torch.inference_mode()
def pretokenize(tokenizer: "Tokenizer", source: LatentSource, out_dir: str | Path, *, tokenizer_spec: str | None = None,
                batch_size: int = 32, shard_size: int = 4096, progress: bool = True,
                accelerator: "Accelerator | None" = None) -> PretokenizeResult:
    """Encode every sample of ``source`` with ``tokenizer`` (eval mode) and write shards of exactly
    ``shard_size`` latents (the last one fewer) + meta.json; continue an interrupted run in ``out_dir``
    (see the module docstring). ``batch_size`` is a speed knob and may change between the two.
    ``tokenizer_spec``, how ``generate`` will load the decoder, is recorded with a local folder
    made absolute.

    With an ``accelerate.Accelerator`` of several processes (``torchrun`` / ``accelerate launch``),
    each encodes its contiguous part of the source; every process must call this, and each gets
    the result of the whole run.
    """
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # 2.5 made one batch of everything
            raise TypeError(f"{name} must be a whole number, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be 1 or more, got {value}")
    rank, processes = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    if processes > 1 and source.resume_from is None:
        raise ValueError("this source cannot be split between processes (it has no resume_from); run one process")
    if source.used:  # its samples were read and its skipped files counted by an earlier call
        raise ValueError("this LatentSource served an earlier pretokenize; make a new one (folder_source(...) or "
                         "bundled_source(...)) for each call")
    out = Path(out_dir)
    if tokenizer_spec is not None:  # checked now, and a relative folder made absolute (it names another from elsewhere)
        from softvq.generation.run_inputs import tokenizer_spec as checked_spec

        tokenizer_spec = checked_spec(tokenizer_spec, (tokenizer.num_tokens, tokenizer.latent_dim),
                                      named="tokenizer_spec", holds="the tokenizer given makes",
                                      fix="pass the spec that loads the tokenizer you encode with")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pretokenize writes a folder of latent shards")
    # one pretokenize per folder: two would write shards of other weights under one meta.json
    with evaluating(tokenizer), lock_run_folder(out, accelerator, inside_command=True), \
            images_from_softvq_loaders() if source.from_softvq_loader else contextlib.nullcontext():
        return _pretokenize(tokenizer, source, out, tokenizer_spec, batch_size, shard_size, progress,
                            accelerator, rank, processes)


def _pretokenize(tokenizer: "Tokenizer", source: LatentSource, out: Path, tokenizer_spec: str | None,
                 batch_size: int, shard_size: int, progress: bool, accelerator: "Accelerator | None",
                 rank: int, processes: int) -> PretokenizeResult:
    from softvq.training.accelerator import decided_by_main_process, same_on_every_process

    settings = {"source": source.identity, "count": source.count, "tokenizer": tokenizer_spec,
                "latent_shape": [tokenizer.num_tokens, tokenizer.latent_dim], "precision": tokenizer.precision,
                "shard_size": shard_size, "processes": processes,
                # the weights too: other weights at the same path must not continue these shards
                "tokenizer_sha1": weights_sha1(tokenizer)}
    same_on_every_process({**settings, "out": str(out)}, processes)  # batch size: each its own (same latents)
    part = _Part.of(rank, processes, source.count)
    resuming = decided_by_main_process(accelerator, lambda: _claim(out, settings))
    saved = out / part.progress_name
    state = (_Progress.load(saved) if resuming and saved.is_file()
             else _Progress(settings, position=part.start, exact_total=0, exact_sq_total=0, class_counts={},
                            after_shards=[]))
    if not state.shards:
        state.after_shards = [] if state.after_shards is not None else None
        state.mark()  # the part's start: a damaged first shard is redone from here
    if not state.finished:
        source.used = True
        _encode_part(tokenizer, source, out, part, state, batch_size, shard_size, progress and rank == 0)
    if processes > 1:
        assert accelerator is not None  # processes come from it
        accelerator.wait_for_everyone()
    meta = decided_by_main_process(
        accelerator, lambda: _merge_parts(out, [_Part.of(r, processes, source.count) for r in range(processes)],
                                          tokenizer, tokenizer_spec, source.classes))
    return PretokenizeResult(out, meta["count"], meta["latent_mean"], meta["latent_std"], meta["shards"],
                             meta["skipped"])


def _encode_part(tokenizer, source: LatentSource, out: Path, part: _Part, state: _Progress, batch_size: int,
                 shard_size: int, progress: bool) -> None:
    """Encode ``part`` of ``source`` from where ``state`` left it, saving ``state`` after each shard
    and, marked finished, at the end."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if (state.position, part.stop) == (0, source.count):
        samples = source.samples
    elif source.resume_from is None:
        raise ValueError(f"{out} holds an interrupted pretokenize, but this source cannot start part-way "
                         f"(it has no resume_from); choose an empty folder")
    else:
        samples = source.resume_from(state.position, part.stop)
    source.skipped[:0] = state.skipped  # this process re-reads none of them
    if not state.shards:  # before the first shard: a run killed right after it has a record to continue from
        state.save(out / part.progress_name)
    device = next(tokenizer.parameters()).device
    # per batch: latents, labels, names, and for each sample (source position after it, files skipped before it)
    pending: list[tuple[Tensor, Tensor, list[str], list[tuple[int, int]]]] = []

    def write_shard(latents: Tensor, labels: Tensor, names: list[str], marks: list[tuple[int, int]]) -> None:
        name = part.shard_name(len(state.shards))
        tensors = {"latents": latents.contiguous(), "labels": labels.contiguous()}
        atomic_write(out / name, lambda p: save_file(tensors, str(p), metadata={"names": json.dumps(names)}))
        z = latents.double().reshape(len(latents), -1).numpy()
        # each sample's sums (numpy's pairwise sum of one row: the same in any batch), then exact totals
        sums, squares = z.sum(axis=1), (z * z).sum(axis=1)
        state.shards.append(name)
        state.total += float(sums.sum())
        state.sq_total += float(squares.sum())
        if state.exact_total is not None:
            assert state.exact_sq_total is not None  # the exact sums are kept together
            state.exact_total += exact_sum(sums)
            state.exact_sq_total += exact_sum(squares)
        state.elements += z.size
        state.count += len(names)
        state.count_labels(labels)
        # samples already read past this shard are read again on resume, with the files skipped among them
        state.position, skipped_before = marks[-1]
        state.skipped = source.skipped[:skipped_before]
        state.mark()
        state.save(out / part.progress_name)

    def flush(final: bool) -> None:
        if not pending:
            return
        latents = torch.cat([p[0] for p in pending])
        labels = torch.cat([p[1] for p in pending])
        names = [n for p in pending for n in p[2]]
        marks = [m for p in pending for m in p[3]]
        pending.clear()
        while len(names) >= shard_size or (final and names):
            write_shard(latents[:shard_size], labels[:shard_size], names[:shard_size], marks[:shard_size])
            latents, labels, names, marks = (latents[shard_size:], labels[shard_size:], names[shard_size:],
                                             marks[shard_size:])
        if names:
            pending.append((latents, labels, names, marks))

    done = state.count + len(state.skipped)
    desc = "pretokenize" + (f", part 1 of {part.processes}" if part.processes > 1 else "") + (", resumed" if done else "")
    bar = tqdm(total=part.stop - part.start, initial=done, desc=desc, unit="img", disable=not progress)

    def marked(received: int = state.count) -> Iterator[tuple[Tensor, int, str, tuple[int, int]]]:
        for image, label, name in samples:  # source.skipped holds exactly the files skipped before this one
            position = part.start + received + len(source.skipped) + 1
            if position > part.stop:  # a wrong count splits the work between processes wrongly, and ends bars early
                raise ValueError(f"the source gave more samples than its count, {source.count}: set "
                                 f"LatentSource.count to how many it gives")
            yield (_checked_image(image, name), _class_index(label, name, len(source.classes)), name,
                   (position, len(source.skipped)))
            received += 1

    buffered = 0
    for batch in _batches(marked(), batch_size):
        images = torch.stack([b[0] for b in batch]).to(device)
        side = tokenizer.config.image_size
        if tuple(images.shape[-2:]) != (side, side):  # meta.json records the tokenizer's size for generate
            raise ValueError(f"the source gives {images.shape[-2]}x{images.shape[-1]} images but the tokenizer takes "
                             f"{side}x{side}; make the source at its size, e.g. folder_source(folder, "
                             f"tokenizer.config.image_size)")
        z = tokenizer.encode_latents(images).float().cpu()
        pending.append((z, torch.tensor([b[1] for b in batch], dtype=torch.long), [b[2] for b in batch],
                        [b[3] for b in batch]))
        buffered += len(batch)
        if buffered >= shard_size:
            flush(final=False)
            buffered = sum(len(p[2]) for p in pending)
        bar.update(len(batch))
    bar.close()
    given = part.start + state.count + sum(len(p[2]) for p in pending) + len(source.skipped)
    if given != part.stop:
        raise ValueError(f"the source gave {given - part.start} of the {part.stop - part.start} samples its count, "
                         f"{source.count}, promises: set LatentSource.count to how many it gives")
    flush(final=True)
    state.position, state.skipped, state.finished = part.stop, list(source.skipped), True
    state.save(out / part.progress_name)


def _merge_parts(out: Path, parts: list[_Part], tokenizer, tokenizer_spec: str | None,
                 classes: list[str]) -> dict[str, Any]:
    """Write ``meta.json`` from the finished parts' progress files, in source order, and remove them."""
    states = [_Progress.load(out / part.progress_name) for part in parts]
    unfinished = [part.rank for part, state in zip(parts, states) if not state.finished]
    if unfinished:
        raise ValueError(f"part(s) {unfinished} of {out} did not finish; rerun the same command to continue")
    count = sum(s.count for s in states)
    skipped = [line for s in states for line in s.skipped]
    if count == 0:
        raise ValueError(f"no samples to pretokenize ({len(skipped)} unreadable file(s) skipped)")
    elements = sum(s.elements for s in states)
    # the exact sums (kept together) of every part that has them
    exact = [(s.exact_total, s.exact_sq_total) for s in states
             if s.exact_total is not None and s.exact_sq_total is not None]
    if len(exact) == len(states):
        mean = _exact_quotient(sum(t for t, _ in exact), elements)
        mean_square = _exact_quotient(sum(q for _, q in exact), elements)
    else:  # a run interrupted before the sums were exact
        mean = sum(s.total for s in states) / elements
        mean_square = sum(s.sq_total for s in states) / elements
    std = math.sqrt(max(mean_square - mean * mean, 0.0))
    class_counts = [s.class_counts for s in states if s.class_counts is not None]
    counted = len(class_counts) == len(states)
    per_class = [sum(n.get(str(c), 0) for n in class_counts) for c in range(len(classes))] if counted else None
    if per_class is not None:
        empty = [name for name, n in zip(classes, per_class) if n == 0]
        if empty:
            shown = first_few(empty)
            _LOG.warning(f"{len(empty)} of {len(classes)} class(es) have no latents, all their files unreadable or "
                         f"none there: {shown}. A generator trained on {out} never sees them; their samples show "
                         f"nothing learned. Fix or remove those folders and pretokenize into a new folder")
    sha1s = {s.settings.get("tokenizer_sha1") for s in states}  # None: a part started before they were recorded
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
        # the weights, as the path may hold others later (training continued): generate checks them
        **({"tokenizer_sha1": next(iter(sha1s))} if len(sha1s) == 1 and None not in sha1s else {}),
        "tokenizer_precision": tokenizer.precision,
        "classes": classes,
        **({"class_counts": per_class} if per_class is not None else {}),
        "shards": [name for s in states for name in s.shards],
        "skipped": skipped,
    }
    write_json(out / META_NAME, meta)
    for part in parts:
        (out / part.progress_name).unlink(missing_ok=True)
    return meta
