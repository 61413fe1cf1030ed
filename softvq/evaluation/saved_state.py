"""The saved state of an interrupted evaluation: the running sums of ``softvq eval`` and the
features of ``softvq eval --samples``, kept in one file so that the same command continues instead
of starting over (written atomically; a state of other weights, images or options is refused by
name)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softvq.resume import changed_settings


def load_saved_state(state_file: Path | None, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state of an interrupted evaluation with this identity (None: start afresh)."""
    if state_file is None or not state_file.is_file():
        return None
    try:
        # Our own file, written by save_state: it holds the accumulator objects themselves.
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        saved = state["identity"]
    except Exception as exc:  # noqa: BLE001 - any unreadable state means the same thing to the user
        raise ValueError(f"{state_file} (the state of an interrupted evaluation) is unreadable "
                         f"({type(exc).__name__}); delete it to start over") from None
    # a key an older softvq did not record is not held against its state
    changed = changed_settings(saved, identity, ignore=[key for key in identity if key not in saved])
    if changed:
        raise ValueError(f"{state_file} holds an interrupted evaluation of other weights, images or options "
                         f"({'; '.join(changed)}); rerun it as it was to continue, or delete the file to start over")
    return state


def save_state(state_file: Path, state: dict[str, Any]) -> None:
    """Write an evaluation's running state to ``state_file`` atomically."""
    from softvq.atomic import atomic_write

    atomic_write(state_file, lambda p: torch.save(state, p))


class KeptWork:
    """Keeps a long loop's work in ``state_file`` (None: keeps nothing): ``save()`` every
    ``save_every_s`` seconds, through :meth:`tick`, and when Ctrl-C / SIGTERM stops the loop, unless
    it stopped while ``updating`` (the running state then holds part of a batch)."""

    def __init__(self, state_file: Path | None, save: Callable[[], None], save_every_s: float, batches) -> None:
        self.state_file, self.save, self.save_every_s, self.batches = state_file, save, save_every_s, batches
        self.updating = False
        self.last_save = time.monotonic()

    def tick(self) -> None:
        """Save, when ``save_every_s`` seconds have passed since the last save."""
        if self.state_file is not None and time.monotonic() - self.last_save >= self.save_every_s:
            self.save()
            self.last_save = time.monotonic()

    @contextlib.contextmanager
    def kept_when_stopped(self, describe: Callable[[], str | None]) -> Iterator[None]:
        """Around the loop; ``describe()`` names the work done so far, or None when there is none."""
        try:
            yield
        except KeyboardInterrupt:
            what = describe()
            if self.state_file is not None and not self.updating and what:
                self.batches.close()  # shut the loader's workers down before writing
                self.save()
                print(f"eval: saved {what} in {self.state_file}; the same command continues", file=sys.stderr)
            raise


def rows_resumably(compute: Callable[[int, int], tuple[Tensor | None, list[str]]], total: int, batch_size: int, *,
                   state_file: Path | None, identity: dict[str, Any], desc: str, progress: bool = True,
                   save_every_s: float = 300.0) -> tuple[list[Tensor], list[str]]:
    """The rows ``compute(start, stop)`` returns for items [0, total) in batches, in order, and the
    names of the items it skipped (``compute`` gives both for its batch; rows may be None when it
    skipped them all).

    With ``state_file``, the rows so far are saved there every ``save_every_s`` seconds and when
    Ctrl-C / SIGTERM stops the loop, and a rerun with the same ``identity`` continues after them;
    the caller removes the file once its result is safe (linear probes: once the probe is trained).
    """
    from tqdm.auto import tqdm

    rows: list[Tensor] = []
    skipped: list[str] = []
    done = 0
    saved = load_saved_state(state_file, identity)
    if saved is not None:
        rows, skipped, done = list(saved["rows"]), saved["skipped"], saved["done"]

    def save() -> None:  # the batches as they are: concatenating would copy every row at each save
        assert state_file is not None  # KeptWork saves only with a state file
        save_state(state_file, {"identity": identity, "rows": rows, "skipped": skipped, "done": done})

    starts = (start for start in range(done, total, batch_size))  # a generator: KeptWork closes it
    bar = tqdm(total=total, initial=done, unit="img", desc=desc, disable=not progress)
    kept = KeptWork(state_file, save, save_every_s, starts)
    with kept.kept_when_stopped(lambda: f"the {desc} features of {done} images" if done else None):
        for start in starts:
            stop = min(start + batch_size, total)
            batch_rows, batch_skipped = compute(start, stop)
            kept.updating = True  # rows, skipped and done agree again once this is False
            if batch_rows is not None and len(batch_rows):
                rows.append(batch_rows)
            skipped += batch_skipped
            done = stop
            kept.updating = False
            bar.update(stop - start)
            kept.tick()
    bar.close()
    if state_file is not None and (saved is None or done > saved["done"]):
        save()  # whole, until the caller's result is safe
    return rows, skipped
