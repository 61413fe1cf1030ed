"""Helpers shared by the sub-commands: which model to load, on which device.

A model SPEC is one of
  * a preset name (``softvq-tiny``, ``softvq-s-64``, ...): random weights, with a warning;
  * a folder or hub id in softvq's own format (``config.json`` + ``model.safetensors``);
  * ``official:FOLDER_OR_HUB_ID``: a released SoftVQ-VAE checkpoint, converted on load.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from softvq.checkpoint.specs import OFFICIAL_PREFIX, is_preset, official_target
from softvq.config import PRESETS
from softvq.messages import first_few
from softvq.precision import PRECISIONS
from softvq.randomness import check_seed
from softvq.tokenizer import Tokenizer

DEFAULT_MODEL = "softvq-tiny"
SPEC_HELP = (f"preset name (random weights), a softvq checkpoint folder or hub id, a training run folder "
             f"(its export/) or one of its checkpoints/step-N.pt (that step's EMA weights), or "
             f"{OFFICIAL_PREFIX}FOLDER_OR_HUB_ID for a released SoftVQ-VAE checkpoint")


def refuse_unwritable(folder: str | Path, flag: str, writes: str, *, given: str | Path | None = None) -> None:
    """Refuse, before any work, an output folder a command could not write into at its end:
    ``folder`` is a file or a broken symbolic link, lies under a file, or it (or, not made yet, the
    nearest folder above it) is not writable (read-only, immutable, another user's). ``writes``:
    what the command writes there, for the message; ``given``: the path ``flag`` named, where that
    is a file to write in ``folder`` (default: ``folder``)."""
    folder = Path(folder).expanduser()
    shown = Path(given).expanduser() if given is not None else folder
    existing = folder
    while not os.path.lexists(existing):  # a relative path ends at "."
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise NotADirectoryError(f"{flag} {shown}: {existing} is a broken symbolic link; {writes}: choose another "
                                 f"{flag}, or remove the link")
    if not existing.is_dir():
        where = "is a file" if existing == shown else f"lies under {existing}, a file"
        raise NotADirectoryError(f"{flag} {shown} {where}; {writes}: choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == shown else f"{existing}, where it would be made,"
        raise PermissionError(f"{flag} {shown}: {where} is not writable (read-only, or another user's); "
                              f"{writes}: choose another {flag}")


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    """``--model SPEC`` (default ``default``) and ``--device``, alike for every command that runs a tokenizer."""
    parser.add_argument("--model", default=default, metavar="SPEC",
                        help=SPEC_HELP + (f" (default: {default})" if default else ""))
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    add_precision_argument(parser)


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: the tokenizer's compute precision (:meth:`Tokenizer.enable_autocast`)."""
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="tokenizer compute precision: fp32 (default) or bf16 / fp16 autocast, "
                             "faster on GPUs and on CPUs with AMX")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision ``device`` cannot run."""
    if precision == "fp32":
        return
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use --precision fp16")
    # on a CPU without bf16/fp16 matrix instructions the tokenizer warns at its first pass


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    from softvq.checkpoint.pretrained import usable_device

    return usable_device(name, named_by=None, fix="use --device cpu", choices="auto, cpu, cuda, cuda:N or mps")


def device_argument(name: str) -> str:
    """argparse ``type`` for ``--device``: the resolved device's name, or a usage error at parse time
    (``--device cuda`` on a machine without CUDA) instead of a traceback from inside torch later."""
    try:
        return str(resolve_device(name))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def timing_device_argument(name: str) -> str:
    """:func:`device_argument` for what times or measures memory: only CPUs and CUDA, where the
    timings are synchronised and the memory counted (``mps`` would time queued, not finished, work,
    and read macOS's ``ru_maxrss`` in other units)."""
    device = device_argument(name)
    if not device.startswith(("cpu", "cuda")):
        raise argparse.ArgumentTypeError(f"timings and memory are measured on cpu or cuda devices, not {device}")
    return device


def indented_lines(lines: list[str], limit: int = 10) -> str:
    """The first ``limit`` of ``lines``, each on its own indented line after a newline, then
    "... and N more": a list of files that a message names without flooding the terminal."""
    shown = "".join(f"\n  {line}" for line in lines[:limit])
    return shown + (f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else "")


def refuse_to_overwrite(paths: list[Path], fix: str) -> None:
    """Never lose work: a FileExistsError naming the first of ``paths`` that already exists."""
    taken = [path for path in paths if path.exists()]
    if taken:
        raise FileExistsError(f"{first_few(taken, 1)} already exist{'s' if len(taken) == 1 else ''}; {fix}")


def make_distinct(names: list[str]) -> list[str]:
    """``names`` with each later repeat renamed ``base-k.ext`` (k = 1, 2, ...) to a name no other
    entry has or takes: one output file per input, never two inputs writing the same file."""
    import os

    wanted, taken, out = set(names), set(), []
    for name in names:
        base, ext = os.path.splitext(name)
        candidate, k = name, 0
        while candidate in taken or (k and candidate in wanted):
            k += 1
            candidate = f"{base}-{k}{ext}"
        taken.add(candidate)
        out.append(candidate)
    return out


def positive_int(text: str) -> int:
    """argparse ``type`` for counts and sizes (batch sizes, steps, image counts): 1 or more."""
    value = int(text)  # argparse turns a ValueError into "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number (1 or more)")
    return value


def non_negative_float(text: str) -> float:
    """argparse ``type`` for limits that 0 turns off: a finite number, 0 or more."""
    value = float(text)  # argparse turns a ValueError into "invalid non_negative_float value"
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a number of 0 or more")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type`` for worker counts: 0 (work in this process) or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; 0 or more")
    return value


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` (also ``--no-progress``): no progress bar, the same flag on every long job."""
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")


def seed_int(text: str) -> int:
    """argparse ``type`` for seeds, :func:`softvq.randomness.check_seed`'s range: 0 or more and
    below 2**63, as torch and NumPy take them (past 64 bits torch fails with "Overflow when
    unpacking long long", naming no flag)."""
    try:
        return check_seed(int(text))
    except ValueError:  # int("1.5") too
        raise argparse.ArgumentTypeError(f"{text} is not a seed: use a whole number from 0 to 2**63 - 1") from None


def _generator_meta(folder: str) -> dict | None:
    """The ``meta`` of a generator checkpoint folder, or None when ``folder`` is not one."""
    import json

    from softvq.checkpoint.pretrained import CONFIG_NAME
    from softvq.generation.checkpoint import FORMAT

    try:
        payload = json.loads((Path(folder).expanduser() / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return payload.get("meta", {}) if isinstance(payload, dict) and payload.get("format") == FORMAT else None


def _generator_run_tokenizer(folder: str) -> str | None:
    """For a train-generator run folder, where its tokenizer is named; None for any other folder."""
    import json

    from softvq.generation.checkpoint import RUN_KINDS, folder_kind

    if folder_kind(folder) not in RUN_KINDS:
        return None
    config = Path(folder).expanduser() / "config.json"
    try:
        train = json.loads(config.read_text()).get("train", {})
    except (OSError, ValueError, AttributeError):
        train = {}
    train = train if isinstance(train, dict) else {}
    tokenizer, latents = train.get("tokenizer"), train.get("latents")
    if not tokenizer and latents:  # recorded by pretokenize in the latent set the run trained on
        try:
            tokenizer = json.loads((Path(str(latents)).expanduser() / "meta.json").read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError):
            tokenizer = None
    if tokenizer:
        return f"its latents come from the tokenizer {tokenizer} (see {config}): pass that"
    return f"pass the tokenizer its latents come from ({config} names its latent set)"


def load_tokenizer(spec: str, device: str | torch.device = "cpu", *, quiet: bool = False,
                   precision: str = "fp32", name_ignored_keys: bool = True) -> Tokenizer:
    """The tokenizer a SPEC names, in eval mode on ``device``, computing in ``precision``.

    The returned model carries ``source`` (a one-line description for printing). A preset gets
    random weights and a warning on stderr unless ``quiet``. A training run folder stands for its
    ``export/``, and its ``checkpoints/step-N.pt`` for the EMA weights of step N. A release's keys
    left out (not needed to encode or decode) are named on stderr, as the checkpoint format asks,
    unless ``name_ignored_keys`` is False (``info`` lists them).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    check_precision(precision, device)
    if is_preset(spec):
        model = Tokenizer.from_preset(spec)
        if not quiet:
            print(f"softvq: warning: {spec} is a preset with RANDOM weights; outputs are meaningless "
                  f"until it is trained (its fresh decoder hardly reads the latents: every image decodes "
                  f"alike): name a trained checkpoint instead of a preset", file=sys.stderr)
    elif spec.startswith(OFFICIAL_PREFIX):
        target = official_target(spec)
        model = Tokenizer.from_official(target)
        if name_ignored_keys and model.ignored_keys:
            from softvq.checkpoint.official import ignored_summary

            print(f"softvq: note: {target}: left out {'; '.join(ignored_summary(model.ignored_keys))}",
                  file=sys.stderr)
    else:
        from softvq.checkpoint.pretrained import CheckpointError, training_run_export

        if not Path(spec).expanduser().exists() and "/" not in spec and not spec.endswith(".pt"):
            raise CheckpointError(
                f"unknown model {spec!r}: not a preset ({', '.join(sorted(PRESETS))}), not a folder, "
                f"and not a hub id like 'org/name'"
            )
        spec = str(training_run_export(spec) or spec)
        try:
            model = Tokenizer.from_pretrained(spec)
        except CheckpointError as exc:
            generator = _generator_meta(spec)
            if generator is not None:
                raise CheckpointError(f"{spec} is a DiT/SiT/MAR generator (train-generator's export), not a tokenizer; "
                                      f"its latents come from the tokenizer {generator.get('tokenizer')}") from None
            made_by = _generator_run_tokenizer(spec)
            if made_by is not None:
                raise CheckpointError(f"{spec} is a generator run (train-generator), not a tokenizer, which this "
                                      f"command takes; {made_by}") from None
            if "from_official" in str(exc):  # a released folder passed without the prefix
                raise CheckpointError(
                    f"{spec} is not in softvq's format; if it is a released SoftVQ-VAE checkpoint, "
                    f"name it {OFFICIAL_PREFIX}{spec}"
                ) from None
            from softvq.checkpoint.pretrained import is_tokenizer_run, newest_run_checkpoint

            if is_tokenizer_run(spec):
                newest = newest_run_checkpoint(spec)
                meanwhile = f", or its newest checkpoint {newest} (the EMA weights of that step)" if newest else ""
                raise CheckpointError(
                    f"{spec} is a training run without an export/ yet (training writes it when it ends); "
                    f"pass a checkpoint folder{meanwhile}, or finish the run with softvq train --resume -o {spec}"
                ) from None
            raise
    return model.to(device).eval().enable_autocast(precision)


def generator_tokenizer(generator: str, recorded: str | None, given: str | None, flag: str,
                        device: str | torch.device, precision: str = "fp32") -> tuple[str, Tokenizer]:
    """(SPEC, tokenizer) for a generator's latents: ``given`` with the command's ``flag``, else the
    one the generator records. A recorded one that no longer loads (a moved or deleted folder) is
    named as the generator's, with the flag that replaces it: the bare loader's "no checkpoint
    folder at ..." does not say where the path came from."""
    from softvq.checkpoint.pretrained import CheckpointError

    spec = given or recorded
    if not spec:
        raise ValueError(f"{generator} does not say which tokenizer made its latents; pass {flag} SPEC")
    try:
        return spec, load_tokenizer(spec, device, precision=precision)
    except (CheckpointError, FileNotFoundError) as exc:
        if given:
            raise
        raise CheckpointError(f"{generator} records its latents' tokenizer as {spec}, which does not load: {exc}; "
                              f"pass {flag} SPEC with that tokenizer where it is now") from None
