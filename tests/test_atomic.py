"""Files written whole or not at all: the data reaches the disk before the rename makes it the file."""

from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest

from softvq import atomic


def test_the_data_is_flushed_before_the_rename_and_the_rename_after_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?"
        events.append(("fsync", os.path.basename(target)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.write_json(tmp_path / "state.json", {"step": 3})
    assert (tmp_path / "state.json").read_text() == '{\n  "step": 3\n}'
    names = [name for _, name in events]
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    if os.path.exists("/proc/self/fd"):  # the temporary file's data, then the folder holding the new name
        assert names[0].startswith(".state.json.") and names[0].endswith(".tmp") and names[2] == tmp_path.name
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == atomic._new_file_mode()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "kept.txt").write_text("old")

    def half_then_fail(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(tmp_path / "kept.txt", half_then_fail)
    assert (tmp_path / "kept.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


class SafetensorError(Exception):
    """What safetensors raises for a failed write: a plain Exception, not an OSError."""


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3592512 vs 3592400"),  # torch.save's
    SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left "
                    "on device\" }) (os error 28)"),
])
def test_a_full_disk_is_named_and_leaves_the_old_file_whole(tmp_path, monkeypatch, failure):
    """A full disk ended train, generate and pretokenize in a traceback that named no file."""
    import pickle
    import shutil

    target = tmp_path / "ckpt.pt"
    target.write_text("the last good one")

    def write(path):
        path.write_text("half")
        raise failure

    # a serializer's own error is a full disk only where the disk is (nearly) full: the same words
    # come from a file too large for its file system
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: free._replace(free=1 << 20))
    with pytest.raises(atomic.OutOfSpaceError, match=f"no space left on the device while writing {target}") as caught:
        atomic.atomic_write(target, write)
    assert target.read_text() == "the last good one" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)  # crosses process boundaries
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: free._replace(free=1 << 40))
    if not isinstance(failure, OSError):  # room left: the serializer's error stays its own
        with pytest.raises(type(failure)):
            atomic.atomic_write(target, write)
    with pytest.raises(RuntimeError, match="another failure"):  # not every write error is a full disk
        atomic.atomic_write(target, lambda path: (_ for _ in ()).throw(RuntimeError("another failure")))


def test_the_command_line_says_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from softvq.cli.main import main

    Image.new("RGB", (64, 64), (200, 40, 9)).save(tmp_path / "a.png")

    def no_room(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_room)
    assert main(["encode", str(tmp_path), "--out", str(tmp_path / "z.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and (f"softvq encode: error: no space left on the device while writing "
                                       f"{tmp_path / 'z.safetensors'}") in err


def test_an_atomic_file_gets_the_mode_the_umask_gives():
    """A file written atomically gets the mode a plain open would (0o666 less the umask), not 0o666."""
    import tempfile
    from pathlib import Path

    old = os.umask(0o027)
    try:
        with tempfile.TemporaryDirectory() as folder:
            atomic.write_json(Path(folder) / "a.json", {"x": 1})
            assert stat.S_IMODE((Path(folder) / "a.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def _failing_write(error):
    def write(path):
        path.write_text("half")
        raise error
    return write


def test_a_full_quota_is_an_out_of_space_error(tmp_path):
    """A full quota (EDQUOT) is a full disk too: the old file stays and the temporary is removed."""
    (tmp_path / "f").write_text("old")
    with pytest.raises(atomic.OutOfSpaceError, match="no space left on the device while writing"):
        atomic.atomic_write(tmp_path / "f", _failing_write(OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert (tmp_path / "f").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_serializer_error_on_a_disk_with_a_gigabyte_free_is_not_a_full_disk(tmp_path, monkeypatch):
    """A serializer's error is taken for a full disk only when little room is left (16 MiB)."""
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: free._replace(free=1 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # e.g. a file too large for its file system
        atomic.atomic_write(tmp_path / "f", _failing_write(RuntimeError("unexpected pos 10 vs 5")))
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: free._replace(free=1 << 20))
    with pytest.raises(atomic.OutOfSpaceError):
        atomic.atomic_write(tmp_path / "f", _failing_write(RuntimeError("unexpected pos 10 vs 5")))


def test_a_serializer_error_stays_its_own_when_the_free_space_is_unknown(tmp_path, monkeypatch):
    """Where the free space cannot be read, a serializer's own error is raised as it is."""
    def no_answer(folder):
        raise OSError(errno.EIO, "cannot stat")

    monkeypatch.setattr(atomic.shutil, "disk_usage", no_answer)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic.atomic_write(tmp_path / "f", _failing_write(RuntimeError("unexpected pos 10 vs 5")))
    assert list(tmp_path.iterdir()) == []
