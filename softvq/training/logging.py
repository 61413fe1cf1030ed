"""What a person sees during training: console lines, a JSONL record per log step, TensorBoard.

Only the main process writes. The JSONL file (``run_dir/log.jsonl``) is the machine-readable
history: one JSON object per log step with ``step`` and every logged scalar.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from softvq.atomic import atomic_write

# Keys of the EMA weights' metrics on the held-out images, measured at each grid (not batch means).
HELDOUT_PREFIX = "heldout/"


class RunLogger:
    """Console + JSONL + TensorBoard for one run. Disabled loggers (non-main processes) do nothing."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "log.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        """A line on the console that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def scalars(self, step: int, values: dict[str, float], *, echo: bool = True) -> None:
        """Append one ``log.jsonl`` record of ``values`` at ``step`` (non-finite values as strings), also to
        TensorBoard when on, and print them unless ``echo`` is False."""
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in values.items()}
        assert self._jsonl is not None, "RunLogger.scalars after close()"  # enabled loggers open it in __init__
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if math.isfinite(float(value)):
                    self.writer.add_scalar(key, float(value), step)
        if echo:
            self.info(f"step {step}: " + "  ".join(f"{k} {format_value(v)}" for k, v in values.items()))

    def image(self, tag: str, path: Path, step: int) -> None:
        """Add the PNG at ``path`` to TensorBoard, when it is on."""
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        """Close the log file and TensorBoard writer; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class LogWindow:
    """The logged values of the steps since the last log line, summed where they were computed (on
    the device: adding them waits for nothing; in float64, so that a constant stays one). Each is
    averaged over the steps that logged it (a skipped step logs no loss), except ``nonfinite``,
    which only skipped steps log: the share of the window's steps they were. Both trainers log these
    means, as DiT's release logs the mean loss since its last line rather than one step's.

    ``latest`` values (the lr) are the last step's, not a mean; ``seconds`` sums the time spent in
    the steps themselves, so that a rate leaves out held-out grids and checkpoints."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Start a new window: nothing summed, no steps."""
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.latest: dict[str, float] = {}
        self.steps, self.seconds = 0, 0.0

    def add(self, logs: dict[str, float | torch.Tensor], *, seconds: float = 0.0,
            latest: dict[str, float] | None = None) -> None:
        """Add one step's values (device tensors stay on the device), its seconds and its latest values."""
        for k, v in logs.items():
            self.sums[k] = self.sums[k] + (v.detach().double() if isinstance(v, torch.Tensor) else float(v))
            self.counts[k] += 1
        self.latest.update(latest or {})
        self.steps += 1
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        """The window's means and latest values (reading device values back: one sync)."""
        means = {k: float(v) / (self.steps if k == "nonfinite" else self.counts[k]) for k, v in self.sums.items()}
        return {**means, **self.latest}


def format_value(value: Any) -> str:
    """A value as a log line shows it: floats to four significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL records of a run (for tests, plots and reports)."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def drop_records_after(path: str | Path, step: int) -> list[str]:
    """Rewrite the JSONL log at ``path`` without its records past ``step``, atomically; returns the
    lines dropped. For a resume from the checkpoint of ``step``: a run killed after that checkpoint
    logged steps the resumed run logs again, and the log must read like one uninterrupted run's
    (its steps increasing). A half-written last line goes too. Records without a step are kept."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    kept: list[str] = []
    dropped: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            late = isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step
        except json.JSONDecodeError:
            late = True
        (dropped if late else kept).append(line)
    if dropped or (text and not text.endswith("\n")):  # a whole last line without its end: the next would join it
        fixed = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda p: p.write_text(fixed))
    return dropped
