"""A tokenizer training run's folder: what a run writes there, what shows a run trained there, and
the layout problems that would otherwise surface only when the first grid or checkpoint is due."""

from __future__ import annotations

from pathlib import Path

from softvq.checkpoint.pretrained import EXPORT_NAME
from softvq.training import checkpointing as ckpt

# what a run writes into its folder (and config-until-step-N.yaml; dot files are temporaries and the lock)
RUN_FILES = frozenset({"config.yaml", "log.jsonl", "metrics.json", ckpt.CHECKPOINT_DIR, EXPORT_NAME, "grids",
                       "tensorboard"})


def is_run_file(name: str) -> bool:
    """Whether a training run writes ``name`` into its folder (or it is a temporary or lock of one)."""
    return name.startswith(".") or name in RUN_FILES or (name.startswith("config-until-step-") and
                                                         name.endswith(".yaml"))


def run_traces(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that a run trained there: its log records, checkpoints or outputs.
    A new run there would mix its files with those (a crashed run's log would read as two
    histories). A config.yaml alone, of a run set up and never trained, is only replaced."""
    log = run_dir / "log.jsonl"
    traces = ["log.jsonl"] if log.is_file() and log.stat().st_size else []
    if ckpt.list_checkpoints(run_dir):
        traces.append(ckpt.CHECKPOINT_DIR)
    return traces + [name for name in ("metrics.json", EXPORT_NAME) if (run_dir / name).exists()]


def check_run_layout(run_dir: Path) -> None:
    """Refuse a run folder where a file stands in the way of a folder the run writes, or the
    reverse: found only when the first grid, checkpoint or export was due ("[Errno 17] File exists")."""
    for name in (ckpt.CHECKPOINT_DIR, "grids", EXPORT_NAME, "tensorboard"):
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise NotADirectoryError(f"{run_dir / name} is a file, but the run writes its {name}/ folder there: "
                                     f"move the file away, or choose another --output")
    for name in ("config.yaml", "log.jsonl", "metrics.json"):
        if (run_dir / name).is_dir():
            raise IsADirectoryError(f"{run_dir / name} is a folder, but the run writes its {name} file there: "
                                    f"move the folder away, or choose another --output")
