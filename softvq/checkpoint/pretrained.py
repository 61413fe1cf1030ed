"""Our checkpoint format: ``config.json`` (every constructor argument) + ``model.safetensors``.

Loading is strict: a missing or unexpected key is an error that names the keys. Hub ids go
through ``huggingface_hub``; offline, the error says so in one line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from softvq.atomic import atomic_write, remove_stale_temporaries, write_json
from softvq.checkpoint.specs import looks_like_hub_id
from softvq.messages import first_few

if TYPE_CHECKING:
    from softvq.tokenizer import Tokenizer

FORMAT = "softvq-tokenizer"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EXPORT_NAME = "export"  # the folder of a training run that holds its tokenizer (the EMA weights)
RUN_CONFIG_NAME = "config.yaml"  # a tokenizer training run's settings: the mark of its folder


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model."""


def write_folder(directory: str | Path, state: dict[str, torch.Tensor], payload: dict[str, Any]) -> Path:
    """Write ``payload`` as config.json and ``state`` as model.safetensors, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    check_folder_takes(directory, payload.get("format"))
    weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    remove_stale_temporaries(directory)  # a weights file a killed export was writing: as large as the model
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    write_json(directory / CONFIG_NAME, payload)
    return directory


def check_folder_takes(directory: Path, fmt: Any) -> None:
    """Refuse, before any work, a checkpoint folder that is a file or holds something of another kind
    than ``fmt`` (a tokenizer saved over a generator, or into a latent set)."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot write a checkpoint to {directory}: it is a file, and a checkpoint is a "
                                 f"folder (config.json + {WEIGHTS_NAME}); move the file away or name another path")
    held = _held_format(directory)
    if held is not None and held != fmt:
        what = f"a {held} checkpoint" if held.startswith("softvq-") else held
        raise FileExistsError(f"{directory} holds {what}; writing a {fmt} checkpoint there would replace or mix "
                              f"with it: choose another folder")


def _held_format(directory: Path) -> str | None:
    """What a folder already holds, for a checkpoint about to be written into it: the ``format`` of
    its config.json ("another program's config.json" without one), "a latent set" for pretokenize's
    output (finished, or interrupted: its progress files), or None (nothing, or files that are no model)."""
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
    except FileNotFoundError:
        from softvq.generation.latents import META_NAME, PROGRESS_GLOB

        if (directory / META_NAME).is_file() and any(directory.glob("*.safetensors")):
            return "a latent set"
        if any(directory.glob(PROGRESS_GLOB)):
            return "an interrupted pretokenize's latent set"
        return None
    except (OSError, ValueError):
        return f"a {CONFIG_NAME} softvq cannot read"
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(fmt, str):
        return fmt
    if isinstance(meta, dict) and "train" in meta and "model" in meta:  # train-generator's run record
        return "a train-generator run"
    return f"another program's {CONFIG_NAME}"


def is_tokenizer_run(folder: str | Path) -> bool:
    """Whether ``folder`` is a tokenizer training run: the trainer writes its settings there first."""
    return (Path(folder).expanduser() / RUN_CONFIG_NAME).is_file()


def checkpoint_run(file: str | Path) -> Path | None:
    """The tokenizer training run whose ``checkpoints/`` holds ``file``, by the path as written (a
    bare name inside RUN/checkpoints, a symlinked checkpoints/ folder), or None."""
    from softvq.training.checkpointing import CHECKPOINT_DIR

    where = Path(os.path.abspath(Path(file).expanduser()))
    run = where.parent.parent
    return run if where.parent.name == CHECKPOINT_DIR and is_tokenizer_run(run) else None


def newest_run_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoints/step-N.pt`` of a tokenizer training run (a folder with its
    config.yaml), which stands in for its export while it has none; None for any other folder."""
    from softvq.training.checkpointing import latest_checkpoint

    folder = Path(folder).expanduser()
    return latest_checkpoint(folder) if is_tokenizer_run(folder) else None


def training_run_export(folder: str | Path) -> Path | None:
    """``folder/export`` where ``folder`` is a training run (no checkpoint of its own, its
    tokenizer in ``export/``), else None."""
    path = Path(folder).expanduser()
    if path.is_dir() and not (path / CONFIG_NAME).exists() and (path / EXPORT_NAME / CONFIG_NAME).exists():
        return path / EXPORT_NAME
    return None


def read_folder_config(path_or_id: str | Path, fmt: str, what: str, hint: str,
                       hints: dict[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Resolve a checkpoint folder and read its config.json, checking its ``format`` is ``fmt``.

    Every failure is a one-line :class:`CheckpointError`; ``what`` names the expected kind of
    checkpoint and ``hint`` says where a checkpoint of another kind belongs (``hints``: the hint
    for a known other format, by its name).
    """
    folder = resolve(path_or_id, [CONFIG_NAME, WEIGHTS_NAME])
    config_file = folder / CONFIG_NAME
    if not config_file.exists():
        if (export := training_run_export(folder)) is not None:
            raise CheckpointError(f"{folder} is a training run; its {what} is {export}")
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; is it a {what} folder?")
    try:
        payload = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise CheckpointError(f"{config_file} is not a {what} (format {found!r}); {(hints or {}).get(str(found), hint)}")
    return folder, payload


def save_pretrained(model: "Tokenizer", directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of ``model`` into ``directory`` atomically;
    returns the folder."""
    meta: dict[str, Any] = {"format": FORMAT, "config": model.config.to_dict()}
    if model.latent_mean is not None or model.latent_std is not None:
        meta["latent_mean"], meta["latent_std"] = latent_statistics(model.latent_mean, model.latent_std,
                                                                    "the tokenizer's latent_mean / latent_std")
    return write_folder(directory, model.state_dict(), meta)


def latent_statistics(mean: Any, std: Any, where: str,
                      fix: str = "set both from real latents, or both to None") -> tuple[float, float]:
    """(mean, std) that generators normalise latents with, (z - mean) / std: finite numbers and a
    positive std, or a ValueError naming ``where`` they came from and the ``fix`` (NaN was written
    as invalid JSON, a std of 0 divided by zero)."""
    try:
        mean, std = float(mean), float(std)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be numbers, got {mean!r} and {std!r}") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"{where} must be a finite mean and a positive std, got {mean} and {std}; {fix}")
    return mean, std


def resolve(path_or_id: str | Path, filenames: list[str]) -> Path:
    """A local folder as is; otherwise download ``filenames`` of a hub repo id into the cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.is_file():  # was "no checkpoint folder at" a file that is there
        if path.parent.name == "checkpoints":
            raise CheckpointError(f"{text} is a training checkpoint file, not a model folder: pass its run folder "
                                  f"{path.parent.parent} (which stands for its export/), or continue training from "
                                  f"it with softvq train --resume {text}")
        raise CheckpointError(f"{text} is a file, not a checkpoint folder: pass the folder that holds it, "
                              f"{path.parent}")
    if not looks_like_hub_id(text):
        if not path.exists() and str(path.parent) != "." and path.parent.is_dir():  # a mistyped folder
            near = sorted(p.name for p in path.parent.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise CheckpointError(f"no checkpoint folder at {text!r}; {os.path.join(path.parent, '')} holds the folders "
                                  f"{first_few(near) or 'none'}")
        raise CheckpointError(f"no checkpoint folder at {text!r} (and it is not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=filenames))
    except Exception as exc:  # network, auth, missing repo: one line, not a traceback
        raise CheckpointError(
            f"no local folder {text!r}, and fetching it from the Hugging Face hub failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); if you are offline, download "
            f"the folder elsewhere and pass its local path"
        ) from None


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors (or torch pickle) state dict, with a one-line error when it is corrupt."""
    if not file.exists():
        raise CheckpointError(f"checkpoint file {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
        return state.get("state_dict", state.get("model", state))
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {file} is corrupt or unreadable ({type(exc).__name__})") from None


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                spelling: Callable[[str], str] = str) -> None:
    """load_state_dict(strict=True) with an error that names missing/unexpected/mis-shaped keys,
    each as ``spelling`` writes it (the release's own names for a converted release)."""
    own = model.state_dict()
    missing = sorted(spelling(k) for k in set(own) - set(state))
    unexpected = sorted(spelling(k) for k in set(state) - set(own))
    shapes = [f"{spelling(k)}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {first_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {first_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {first_few(shapes)}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_pretrained(path_or_id: str | Path, *, map_location: str | torch.device = "cpu") -> "Tokenizer":
    """:meth:`Tokenizer.from_pretrained`: a folder written by :func:`save_pretrained`, in eval mode
    and in the dtype its weights were saved in (float32 unless it was another); or a training
    checkpoint ``RUN/checkpoints/step-N.pt``, whose EMA weights it loads (what an export at step N
    would hold)."""
    from softvq.config import TokenizerConfig
    from softvq.tokenizer import Tokenizer

    if (file := Path(path_or_id).expanduser()).suffix == ".pt" and not file.is_dir():
        if not file.exists():
            raise CheckpointError(_no_training_checkpoint(file))
        return _from_training_checkpoint(file).to(usable_device(map_location)).eval()
    folder, meta = read_folder_config(
        path_or_id, FORMAT, "softvq checkpoint",
        "a released SoftVQ-VAE checkpoint loads with Tokenizer.from_official (on the command line: "
        "official:FOLDER, or softvq info official:FOLDER --save DIR converts it)",
        {"softvq-generator": "it is a generator: load it with softvq.generation.checkpoint.load_generator"})
    try:
        config = TokenizerConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited or damaged config.json
        raise CheckpointError(f"{folder / CONFIG_NAME}: {exc}") from None
    with torch.random.fork_rng(devices=[]):  # a random initialisation the weights replace: leave the caller's stream
        model = Tokenizer(config)
    state = read_state_dict(folder / WEIGHTS_NAME)
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(stored) == 1 and (dtype := stored.pop()) != torch.float32:  # a float64 (or bf16) model comes back as saved
        model = model.to(dtype)
    load_strict(model, state, str(folder / WEIGHTS_NAME))
    if meta.get("latent_mean") is not None or meta.get("latent_std") is not None:
        try:
            model.latent_mean, model.latent_std = latent_statistics(meta.get("latent_mean"), meta.get("latent_std"),
                                                                    "latent_mean / latent_std")
        except ValueError as exc:
            raise CheckpointError(f"{folder / CONFIG_NAME}: {exc}") from None
    model.source = f"softvq checkpoint {path_or_id}"
    return model.to(usable_device(map_location)).eval()


def _no_training_checkpoint(file: Path) -> str:
    """The error for a ``step-N.pt`` that is not there, naming what its run holds instead."""
    from softvq.training.checkpointing import CHECKPOINT_DIR, list_checkpoints

    run = checkpoint_run(file)
    if run is None:
        return f"no such checkpoint file {file}"
    kept = ", ".join(f"{CHECKPOINT_DIR}/{p.name}" for p in list_checkpoints(run)) or "no checkpoints"
    export = f" and {EXPORT_NAME}/" if training_run_export(run) is not None else ""
    return (f"no such checkpoint file {file}: training keeps only the last run.keep_checkpoints of them; its run "
            f"{run} holds {kept}{export}")


def _from_training_checkpoint(file: Path) -> "Tokenizer":
    """The tokenizer of a ``softvq train`` checkpoint with its EMA weights (the weights ``export/``
    holds at the end); a generator's checkpoint or another file is refused by name."""
    from softvq.config import TokenizerConfig
    from softvq.tokenizer import Tokenizer
    from softvq.training.checkpointing import FORMAT as TRAIN_FORMAT, load_checkpoint

    state = load_checkpoint(file)  # a damaged file: its error names the checkpoint before it
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        from softvq.generation.checkpoint import holds_generator_checkpoint

        generator = holds_generator_checkpoint(state)
        raise CheckpointError(f"{file} is a checkpoint of a generator (train-generator), not of a tokenizer; generate "
                              f"and eval take it as the generator" if generator else
                              f"{file} is not a softvq train checkpoint; pass a checkpoint folder, a run, or one of "
                              f"its RUN/checkpoints/step-N.pt")
    try:
        model_fields = {k: v for k, v in state["config"]["model"].items() if k != "preset"}
        config = TokenizerConfig.from_dict(model_fields)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{file}: its model config does not load ({exc})") from None
    with torch.random.fork_rng(devices=[]):  # a random initialisation the weights replace: leave the caller's stream
        model = Tokenizer(config)
    load_strict(model, state["ema"], f"{file} (EMA weights)")
    model.source = f"EMA weights of training checkpoint {os.path.abspath(file)} (step {state.get('step')})"
    return model


def usable_device(name: str | torch.device, *, named_by: str | None = "map_location",
                  fix: str = "load with map_location='cpu'", choices: str = "cpu, cuda, cuda:N or mps") -> torch.device:
    """``name`` as a device this process can use, or a ValueError saying which argument named it
    (``named_by``) and the ``fix`` (torch's own failure for a missing CUDA is a bare AssertionError)."""
    by = f" ({named_by})" if named_by else ""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}{by}; use {choices}") from None
    for kind, available in (("cuda", torch.cuda.is_available), ("mps", torch.backends.mps.is_available)):
        if device.type == kind and not available():
            raise ValueError(f"device {name!r}{by} asked for but {kind.upper()} is not available; {fix}")
    return device
