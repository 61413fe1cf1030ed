"""One process per run folder: two trainings (or a --resume of a run still going) cannot share one."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from softvq.cli.main import main
from softvq.run_lock import LOCK_NAME, RunFolderInUse, RunLock, ensure_not_in_use, in_use, lock_run_folder
from softvq.training.config import config_from_dict, load_config, save_config
from softvq.training.trainer import Trainer
from tests.test_training_run import tiny_tree

torch.set_num_threads(1)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if ": error: " in line)


def test_a_second_lock_on_a_folder_is_refused_with_the_holder_and_freed_on_release(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    # held by this very process (another Trainer, a notebook cell run twice): said so, with the way out
    with pytest.raises(RunFolderInUse, match=rf"this process already holds {tmp_path / 'run'}: an earlier Trainer "
                                             rf"or train_generator on it has not ended \(let its fit\(\) end or call "
                                             rf"its close\(\)\), or a pretokenize or write_samples call"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # a finished run leaves no trace
    with RunLock(tmp_path / "run") as second:
        assert second.held
    first.release()  # twice is harmless


def test_a_lock_held_by_another_process_refuses_until_that_process_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from softvq.run_lock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
                               "print('held', flush=True); sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderInUse, match=rf"\(pid {holder.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: no release, the lock file stays
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()
    assert not in_use(tmp_path) and (tmp_path / LOCK_NAME).exists()  # asked, not taken: the stale file stays
    RunLock(tmp_path).acquire().release()  # the OS dropped the lock with its process


def test_asking_whether_a_folder_is_in_use_takes_nothing_and_needs_no_write_access(tmp_path):
    assert not in_use(tmp_path / "nowhere") and not in_use(tmp_path)
    with RunLock(tmp_path / "run"):
        before = (tmp_path / "run" / LOCK_NAME).read_text()
        assert in_use(tmp_path / "run")
        os.chmod(tmp_path / "run", 0o555)  # a reader of the run who may not write there
        try:
            assert in_use(tmp_path / "run")
        finally:
            os.chmod(tmp_path / "run", 0o755)
        assert (tmp_path / "run" / LOCK_NAME).read_text() == before
    assert not in_use(tmp_path / "run")


def test_a_trainer_refuses_a_folder_in_use_before_writing_and_frees_its_own(tmp_path):
    cfg = config_from_dict(tiny_tree(schedule={"steps": 1}, run={"checkpoint_every": 0}))
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderInUse):
            Trainer(cfg, tmp_path / "run")
        assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_NAME]
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(RunFolderInUse):  # held from set-up ...
        RunLock(tmp_path / "run").acquire()
    assert trainer.fit().status == "finished"
    RunLock(tmp_path / "run").acquire().release()  # ... to the end of fit()
    with pytest.raises(FileExistsError, match="already holds a run's checkpoints"):
        Trainer(cfg, tmp_path / "run")
    RunLock(tmp_path / "run").acquire().release()  # a refused set-up lets go too


def test_train_refuses_a_run_folder_another_process_is_using(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):  # two starts into one empty folder: the second is refused
        assert main(["train", "demo", "-o", str(run), "model.preset=softvq-tiny", "schedule.steps=1"]) == 2
        assert f"softvq train: error: this process already holds {run}" in _error(capsys)
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
        save_config(load_config("demo", ["model.preset=softvq-tiny"]), run / "config.yaml")
        # a --resume of a run that is still going, and a fresh start into it
        for extra in (["--resume"], ["demo"]):
            assert main(["train", *extra, "-o", str(run)]) == 2
            assert f"this process already holds {run}" in _error(capsys)


def test_a_trainer_made_and_not_used_frees_its_folder_with_close(tmp_path):
    cfg = config_from_dict(tiny_tree(schedule={"steps": 1}, run={"checkpoint_every": 0}))
    unused = Trainer(cfg, tmp_path / "run")
    with pytest.raises(RunFolderInUse, match="this process already holds"):
        Trainer(cfg, tmp_path / "run")
    unused.close()
    assert Trainer(cfg, tmp_path / "run").fit().status == "finished"


def test_a_folder_the_lock_made_goes_away_again_if_nothing_was_written(tmp_path, capsys):
    lock = RunLock(tmp_path / "new").acquire()
    lock.release()
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays, empty or not
    RunLock(tmp_path / "kept").acquire().release()
    assert (tmp_path / "kept").is_dir()
    lock = RunLock(tmp_path / "used").acquire()
    (tmp_path / "used" / "config.yaml").write_text("x")
    lock.release()
    assert (tmp_path / "used" / "config.yaml").exists()
    # a train that fails while setting up (here: its data folder is missing) left an empty run folder
    code = main(["train", "demo", "-o", str(tmp_path / "run"), "data.source=folder", f"data.path={tmp_path / 'no'}"])
    assert code == 2 and "does not exist" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_decode_reconstruct_and_eval_take_their_output_folders_lock(tmp_path, capsys):
    """Two decodes (or reconstructs) into one --out both exited 0 with each other's images; two
    evals into one --out raced on its saved state and its report."""
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 90)).save(tmp_path / "imgs" / "a.png")
    assert main(["encode", str(tmp_path / "imgs"), "--out", str(tmp_path / "z.safetensors")]) == 0
    for argv in (["decode", str(tmp_path / "z.safetensors")], ["reconstruct", str(tmp_path / "imgs")],
                 ["eval", "--model", "softvq-tiny", "--images", str(tmp_path / "imgs"), "--no-fid", "--no-lpips",
                  "--no-flops", "--no-progress"]):
        out = tmp_path / f"out-{argv[0]}"
        with RunLock(out):
            assert main([*argv, "--out", str(out)]) == 2
            assert f"this process already holds {out}" in _error(capsys)
            assert [p.name for p in out.iterdir()] == [LOCK_NAME]
        assert main([*argv, "--out", str(out)]) == 0 and not (out / LOCK_NAME).exists()
        assert any(out.rglob("eval.json" if argv[0] == "eval" else "*.png"))


def test_a_holder_that_has_not_written_its_pid_yet_is_not_named():
    """A holder that has locked but not yet written its pid is not named by a half-read pid."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        with open(folder / LOCK_NAME, "a+") as other:  # another holder, between its lock and its pid
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(RunFolderInUse) as caught:
                RunLock(folder).acquire()
        assert str(caught.value) == (f"another softvq process is using {folder}; wait for it to finish or "
                                     f"choose another folder")


def test_a_lock_file_deleted_by_its_last_holder_while_we_locked_it_is_made_again(tmp_path, monkeypatch):
    """A lock file its last holder deleted while we locked it is made again, and the new one is locked."""
    import softvq.run_lock as run_lock

    real, calls = run_lock._try_lock, []

    def racing(file):
        ok = real(file)
        if not calls:  # the previous holder's release deletes the file we opened and just locked
            calls.append(1)
            os.unlink(file.name)
        return ok

    monkeypatch.setattr(run_lock, "_try_lock", racing)
    lock = RunLock(tmp_path).acquire()
    monkeypatch.setattr(run_lock, "_try_lock", real)
    try:
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        assert in_use(tmp_path)
        with pytest.raises(RunFolderInUse):  # the lock guards the file at the path, not a deleted one
            RunLock(tmp_path).acquire()
    finally:
        lock.release()


def test_a_stale_lock_file_is_overwritten_not_appended_to(tmp_path):
    """A stale lock file left by a killed run is overwritten, not appended to."""
    (tmp_path / LOCK_NAME).write_text("424242 elsewhere\n")  # left by a killed run on another machine
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with pytest.raises(RunFolderInUse, match="this process already holds"):
            RunLock(tmp_path).acquire()


def test_asking_about_a_folder_without_a_lock_creates_no_folders(tmp_path):
    """Asking whether a folder is in use creates neither it nor a lock file."""
    ensure_not_in_use(tmp_path / "a" / "run")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "b").mkdir()
    ensure_not_in_use(tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []


def test_a_released_command_lock_no_longer_covers_library_calls(tmp_path):
    """Once a command's lock is released, a library call inside the command locks the folder itself."""
    outer = lock_run_folder(tmp_path / "run")
    assert outer.held
    outer.release()
    inner = lock_run_folder(tmp_path / "run", inside_command=True)  # nothing holds the folder now
    try:
        assert inner.held and in_use(tmp_path / "run")
    finally:
        inner.release()
    del outer
