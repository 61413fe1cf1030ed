"""Files written whole or not at all: checkpoints, latents, reports, records of resumable work.

Every file a long job leaves is written to a temporary name beside it, flushed to the disk, and
renamed over the target, so a crash, Ctrl-C, full disk or power loss never leaves half a file
that a rerun would trust. (Without the flush, a file system may persist the rename before the
data: after a power loss the name would hold a truncated or empty file. It costs ~0.2 ms a file.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0o644 under umask 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class OutOfSpaceError(OSError):
    """The disk (or the user's quota) filled while a file was written; nothing half-written was
    kept, so the same command continues once there is room."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(errno.ENOSPC, f"no space left on the device while writing {path} (nothing half-written is "
                                       f"kept): free some space, then continue with the same command (train: "
                                       f"with --resume)")

    def __str__(self) -> str:
        return str(self.strerror)  # without OSError's "[Errno 28]" prefix: the message says it

    def __reduce__(self):  # OSError's would call __init__ with (errno, message)
        return (OutOfSpaceError, (self.path,))


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no room left: the disk's, or the user's quota
_ROOM_LEFT_BYTES = 16 << 20  # what a disk that refused a write and "has" no more than is full


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of room: ENOSPC / EDQUOT, or a serializer's own error for a
    short write (torch.save's "unexpected pos", safetensors' "os error 28") on a disk that is
    indeed (nearly) full: the same messages come from a file too large for its file system."""
    if isinstance(exc, OSError):
        return exc.errno in FULL_DISK_ERRNOS
    text = str(exc)
    if not any(sign in text for sign in ("unexpected pos", "failed writing", "os error 28", "os error 122",
                                         "No space left")):
        return False
    try:
        return shutil.disk_usage(folder).free < _ROOM_LEFT_BYTES
    except OSError:
        return False


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)``, flush it to the disk, then rename over ``path``: a crash or power
    loss never leaves half a file. The file gets the permissions a plainly written one would
    (``mkstemp`` alone makes it owner-only, so colleagues could not read shared checkpoints and
    latents). A full disk is an :class:`OutOfSpaceError` naming the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if _out_of_space(exc, path.parent):
            raise OutOfSpaceError(path) from None
        raise
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _new_file_mode())
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except Exception as exc:  # safetensors' SafetensorError is a plain Exception
        if _out_of_space(exc, path.parent):
            raise OutOfSpaceError(path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX; Windows cannot open a folder, and commits renames itself)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and FUSE mounts) refuse fsync on a folder: the data is safe anyway
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path, *, recursive: bool = False) -> int:
    """Delete the half-written files of :func:`atomic_write` that a process killed mid-write
    (SIGKILL, power loss) left in ``folder`` (and below it with ``recursive``); returns the count.
    Call it only where no other process is writing there."""
    if not folder.is_dir():
        return 0
    stale = list(folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_json(path: Path, value: Any, **dumps_options: Any) -> None:
    """``value`` as indented JSON at ``path``, atomically (``dumps_options``: e.g. ``default=``)."""
    text = json.dumps(value, indent=2, **dumps_options)  # before the file exists: a bad value leaves none
    atomic_write(path, lambda p: p.write_text(text))
