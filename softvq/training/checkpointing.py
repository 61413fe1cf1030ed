"""Training checkpoints that survive crashes: written atomically, the last K kept, resumable exactly.

A checkpoint ``run_dir/checkpoints/step-00001234.pt`` is one ``torch.save`` dict. The tokenizer
trainer's holds the tokenizer and EMA weights, the objective's trainable parts (alignment
projector, discriminator heads and their buffers), both optimizers and schedulers, the step,
counters, and the RNG states (python / numpy / torch / CUDA) of every process. A map-style data
set's order needs no state: it is a function of the seed and the step (``softvq.data.sampler``);
tar shards are streamed, so the checkpoint also records where each process's logical data workers
stopped (``data_stream``) and a resumed run continues there. The generator trainer saves its
model, optimizer, EMA, step and RNG states through the same functions. Everything in a checkpoint
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softvq.atomic import atomic_write
from softvq.checkpoint.pretrained import CheckpointError

CHECKPOINT_DIR = "checkpoints"
FORMAT = "softvq-train"  # the tokenizer trainer's checkpoints
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``RUN/checkpoints/step-NNNNNNNN.pt`` for a step."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a checkpoint file's name (``step-00001234.pt`` -> 1234), or None for another name."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first (half-written temporary files are never listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale_checkpoint_temporaries(run_dir: str | Path) -> int:
    """Delete the half-written files a process killed mid-write (SIGKILL, power loss) left in the
    run's checkpoint folder (:func:`softvq.atomic.remove_stale_temporaries` on it); ``atomic_write``
    removes its own on any error it survives. Returns the count. Call it only where no other
    process is writing a checkpoint of this run."""
    from softvq.atomic import remove_stale_temporaries

    return remove_stale_temporaries(Path(run_dir) / CHECKPOINT_DIR)


def set_aside_newer(run_dir: str | Path, step: int, keep: Path) -> Path | None:
    """Continuing from checkpoint ``keep`` at ``step``: move the line of training it leaves out of
    the way, into a new ``checkpoints/abandoned-after-<step>[-n]/``, and return that folder (None
    when there is nothing to move).

    That line is every other checkpoint at or after ``step`` and, when they were made later than
    ``step``, the run's ``export/`` and ``metrics.json``. Left in place, a later plain ``--resume``
    would pick its checkpoints up, pruning (which keeps the highest steps) would delete the new
    line's first ones, and a finished-looking export would stand for the wrong line. It is kept,
    not deleted."""
    run_dir = Path(run_dir)
    keep = keep.resolve()
    moving = [p for p in list_checkpoints(run_dir)
              if (m := _NAME.match(p.name)) and int(m.group(1)) >= step and p.resolve() != keep]
    try:
        made_at = json.loads((run_dir / "metrics.json").read_text()).get("step", -1)
    except (OSError, ValueError):
        made_at = -1
    if made_at > step:
        moving += [p for p in (run_dir / "metrics.json", run_dir / "export") if p.exists()]
    if not moving:
        return None
    aside, n = run_dir / CHECKPOINT_DIR / f"abandoned-after-{step:08d}", 1
    while aside.exists():  # an earlier line set aside at the same step stays as it is
        n += 1
        aside = run_dir / CHECKPOINT_DIR / f"abandoned-after-{step:08d}-{n}"
    aside.mkdir(parents=True)
    for path in moving:
        path.replace(aside / path.name)
    return aside


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int = 3) -> Path:
    """Write atomically (temporary file, then rename), then delete all but the newest ``keep``."""
    path = checkpoint_path(run_dir, step)
    atomic_write(path, lambda p: torch.save(state, p))
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state dict, with a one-line error when the file is damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own advice (weights_only=False, "likely corrupted") is for code, not for a run
        earlier = [p for p in list_checkpoints(path.parent.parent) if p.resolve() != path.resolve()
                   and (checkpoint_step(p) or 0) < (checkpoint_step(path) or 0)] if checkpoint_step(path) else []
        then = (f"to continue from the previous checkpoint, {earlier[-1]}" if earlier
                else "to start its run again from step 0")
        raise CheckpointError(f"training checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
                              f"delete it {then}") from None


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, in a form ``weights_only`` loading accepts."""
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple)  # the global RandomState is an MT19937: its state is the legacy tuple
    kind, keys, pos, has_gauss, gauss = legacy
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    elif torch.cuda.is_available():  # CUDA not started yet: its generators will be seeded with this seed
        state["cuda_seed"] = torch.initial_seed()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the Python, NumPy and torch random states :func:`capture_rng` saved."""
    python = state["python"]
    random.setstate((python[-2], tuple(python[:-2]), python[-1]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    elif "cuda_seed" in state and torch.cuda.is_available():  # as CUDA would have started without the run
        torch.cuda.manual_seed_all(state["cuda_seed"])


def cpu_copy(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A state dict's tensors copied to the CPU. On the CPU ``state_dict()`` hands out the parameters
    themselves (``.cpu()`` returns them as they are), so without the copy a state taken inside
    ``EMA.swapped_into`` turns back into the training weights when the block ends."""
    return {k: v.detach().to("cpu", copy=True) for k, v in (state or {}).items()}
