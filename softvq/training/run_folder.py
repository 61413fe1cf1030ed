"""A tokenizer training run's folder: what a run writes there, what shows a run trained there, and
the layout problems that would otherwise surface only when the first grid or checkpoint is due."""

from __future__ import annotations

from pathlib import Path

from softvq.checkpoint.pretrained import EXPORT_NAME, RUN_CONFIG_NAME
from softvq.messages import first_few
from softvq.training import checkpointing as ckpt

# what a run writes into its folder (and config-until-step-N.yaml; dot files are temporaries and the lock)
RUN_FILES = frozenset({RUN_CONFIG_NAME, "log.jsonl", "metrics.json", ckpt.CHECKPOINT_DIR, EXPORT_NAME, "grids",
                       "tensorboard"})


def is_run_file(name: str) -> bool:
    """Whether a training run writes ``name`` into its folder (or it is a temporary or lock of one)."""
    earlier_settings = name.startswith("config-until-step-") and name.endswith(".yaml")
    return name.startswith(".") or name in RUN_FILES or earlier_settings


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
    for name in (RUN_CONFIG_NAME, "log.jsonl", "metrics.json"):
        if (run_dir / name).is_dir():
            raise IsADirectoryError(f"{run_dir / name} is a folder, but the run writes its {name} file there: "
                                    f"move the folder away, or choose another --output")


def check_run_folder(run_dir: Path, *, new_run: bool) -> None:
    """Refuse ``run_dir`` for a run: a layout it cannot write (:func:`check_run_layout`), and, for a
    new run, a folder of other files (a photo folder, a tokenizer's export: the CLI refuses any
    non-empty ``--output``) or one where another run trained (:func:`run_traces`)."""
    check_run_layout(run_dir)
    if not new_run or not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not is_run_file(p.name))
    if foreign:
        raise FileExistsError(f"{run_dir} holds files that are not a training run's ({first_few(foreign)}): a run "
                              f"would write its config.yaml, log and checkpoints among them; choose a new or empty "
                              f"folder")
    traces = run_traces(run_dir)
    if traces:
        what = "a run's checkpoints" if ckpt.CHECKPOINT_DIR in traces else f"another run's files ({first_few(traces)})"
        raise FileExistsError(f"{run_dir} already holds {what}: pass resume=True to continue it, or choose another "
                              f"folder (a new run never overwrites one, nor adds its log to another's)")
