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
    changed = changed_settings(saved, identity)
    if changed:
        raise ValueError(f"{state_file} holds an interrupted evaluation of other weights, images or options "
                         f"({'; '.join(changed)}); rerun it as it was to continue, or delete the file to start over")
    return state


def save_state(state_file: Path, state: dict[str, Any]) -> None:
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
