"""One process per run folder: a lock held for a training run's whole life, and for that of every
command that fills a folder (pretokenize, generate, decode, reconstruct, eval).

Two runs writing one folder interleave their checkpoints, logs and exports (or shards, or
images), and nothing afterwards tells them apart; the "folder is not empty" check cannot stop two
starts made at the same moment, nor a ``--resume`` of a run that is still going. A run therefore
holds an exclusive, non-blocking OS lock on ``RUN/.lock`` (``fcntl.flock``; ``msvcrt.locking``
where fcntl is missing). The OS drops the lock when its process dies, however it dies, so a killed
run never leaves a folder locked; the file itself holds the holder's pid and host, only for the
message.

Under torchrun / accelerate only the main process takes the lock (:func:`lock_run_folder`).
"""

from __future__ import annotations

import os
import socket
import weakref
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]  # mypy's idiom for an optional module; checked before each use
    import msvcrt

LOCK_NAME = ".lock"
_WINDOWS_BYTE = 1 << 20  # msvcrt locks a byte range, which others can then not read: lock one past the pid


class RunFolderInUse(FileExistsError):
    """Another live process holds the folder's lock (a user error: the CLI prints it in one line)."""


def _try_lock(file: IO[str]) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            file.seek(_WINDOWS_BYTE)
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(file: IO[str]) -> None:
    if fcntl is not None:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
    else:
        file.seek(_WINDOWS_BYTE)
        msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)


def _holder(path: Path) -> str:
    """' (pid N)' or ' (pid N on HOST)' from the lock file, '' when it cannot be read."""
    try:
        pid, _, host = path.read_text().strip().partition(" ")
    except OSError:
        return ""
    if not pid.isdigit():
        return ""
    return f" (pid {pid})" if host in ("", socket.gethostname()) else f" (pid {pid} on {host})"


class RunLock:
    """The lock on ``folder/.lock``; :meth:`acquire` raises :class:`RunFolderInUse` when another
    process holds it. Usable as a context manager; :meth:`release` is safe to call twice."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._file: IO[str] | None = None
        self._held_by_main = False  # a launched run's other processes: the main process holds it
        self._made_folder = False  # acquire() made the folder: release() takes it away again if still empty

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._file is not None

    def acquire(self) -> "RunLock":
        """Take the lock (making the folder if needed) or raise :class:`RunFolderInUse` naming the holder;
        returns ``self``. A lock file left by a dead process is taken over: the operating system freed its lock."""
        if self.held or self._held_by_main:
            return self
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            file = open(self.path, "a+")
            if not _try_lock(file):
                file.close()
                holder = _holder(self.path)
                if holder == f" (pid {os.getpid()})":  # this very process, through an earlier object
                    raise RunFolderInUse(f"this process already holds {self.folder}: an earlier Trainer or "
                                         f"train_generator on it has not ended (let its fit() end or call its "
                                         f"close()), or a pretokenize or write_samples call into it is still "
                                         f"running; or choose another folder")
                raise RunFolderInUse(f"another softvq process is using {self.folder}{holder}; "
                                     f"wait for it to finish or choose another folder")
            # The previous holder deletes the file when it lets go: a lock on a file that was
            # deleted meanwhile guards nothing, so take the one now at that path instead.
            try:
                same = os.path.samestat(os.fstat(file.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            _unlock(file)
            file.close()
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()} {socket.gethostname()}\n")
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        """Let go of the lock and delete the lock file (and the folder, if acquire made it and it is empty)."""
        if self._file is None:
            return
        if fcntl is not None:  # deleted while still locked, so that no other process locks this file after us
            self.path.unlink(missing_ok=True)
        _unlock(self._file)
        self._file.close()
        self._file = None
        if fcntl is None:  # Windows deletes no open file; a stale one is harmless (its lock is gone)
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
        if self._made_folder:  # a run that failed while setting up leaves no empty folder behind
            try:
                self.folder.rmdir()  # only succeeds while empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def in_use(folder: str | Path) -> bool:
    """Whether a live process holds ``folder``'s lock, asked without taking it or writing anything
    (for commands that only read a run: its folder may be read-only to them, and a stale lock file
    stays as it is). False where it cannot tell (no lock file, an unreadable one)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None:  # Windows: msvcrt can only ask by locking
        try:
            ensure_not_in_use(folder)
        except RunFolderInUse:
            return True
        except OSError:
            return False
        return False
    try:
        file = open(path)
    except OSError:
        return False
    with file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while a run holds LOCK_EX
        except OSError:
            return True
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
    return False


def ensure_not_in_use(folder: str | Path) -> None:
    """Raise :class:`RunFolderInUse` if a live process holds ``folder``'s lock (for a clearer
    refusal than "not empty"); creates nothing when the folder has no lock file."""
    if (Path(folder) / LOCK_NAME).exists():
        RunLock(folder).acquire().release()


# folders this process's commands have locked (every process of a launched run keeps the same
# entries, its main process's lock or an unheld one), for library calls inside a command that holds
# the folder already. Weak: a lock its owner dropped (a Trainer made and never closed) is freed
# with it.
_LOCKED_HERE: "weakref.WeakValueDictionary[Path, RunLock]" = weakref.WeakValueDictionary()


def lock_run_folder(folder: str | Path, accelerator=None, *, inside_command: bool = False) -> RunLock:
    """The run folder's lock, taken by the main process only (the others get an unheld one); a
    refusal is raised on every process, so that none waits for the others at a collective.
    ``inside_command``: a library call (pretokenize, write_samples) that a command holding the
    folder's lock already makes gets an unheld lock instead of a refusal."""
    from softvq.training.accelerator import decided_by_main_process

    key = Path(folder).resolve()
    if inside_command and key in _LOCKED_HERE:
        outer = RunLock(folder)
        outer._held_by_main = True  # takes and releases nothing: the command's lock stays
        return outer
    lock = _RegisteredLock(folder, key)
    decided_by_main_process(accelerator, lambda: lock.acquire() and None)
    lock._held_by_main = not lock.held  # so that `with lock_run_folder(...)` takes nothing twice
    _LOCKED_HERE[key] = lock
    return lock


class _RegisteredLock(RunLock):
    """A :func:`lock_run_folder` lock, known to the library calls made while it is held."""

    def __init__(self, folder: str | Path, key: Path) -> None:
        super().__init__(folder)
        self._key = key

    def release(self) -> None:
        if _LOCKED_HERE.get(self._key) is self:
            del _LOCKED_HERE[self._key]
        super().release()
