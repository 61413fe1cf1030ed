"""Two CPU processes (gloo, launched with torchrun like a user would) train exactly like one
process with the same global batch: same data, same averaged gradients, same loss curve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from launching import cpu_process_env, torchrun

from softvq.tokenizer import Tokenizer
from softvq.training.accelerator import check_processes_fit_gpus, new_accelerator
from softvq.training.config import config_from_dict
from softvq.training.logging import read_log

TREE_SEED = 0  # schedule.seed's default: the trainer initialises the model right after seeding
TREE = {
    "model": {"image_size": 32, "patch_size": 8, "num_tokens": 8,
              "encoder": {"width": 32, "depth": 1, "heads": 2}, "decoder": {"width": 32, "depth": 1, "heads": 2},
              "bottleneck": {"kind": "softvq", "latent_dim": 4, "codebook_size": 32, "distance": "l2"}},
    # λ4 = 0: SoftVQ's entropy regulariser uses the batch-mean posterior, which each process
    # computes over its own half of the batch (as DDP implementations do), so it is not
    # batch-split invariant; every other term is a per-image mean.
    "objective": {"perceptual_weight": 0.0, "adversarial_weight": 0.0, "alignment_weight": 0.0,
                  "bottleneck_weight": 0.0},
    "data": {"source": "bundled", "workers": 0, "num_eval_images": 2, "bundled_crops_per_photo": 4},
    "schedule": {"steps": 5, "batch_size": 8, "warmup_steps": 2, "ema_decay": 0.9},
    "optim": {"lr": 3e-3, "scale_lr": False},
    "run": {"log_every": 1, "checkpoint_every": 0, "grid_every": 0, "eval_lpips": False,
            "tensorboard": False, "progress": False},
}


def cli_train(tree: dict, out, processes: int = 1) -> subprocess.CompletedProcess:
    """``softvq train`` in CPU processes (GPUs hidden, so on a GPU machine too it is gloo and fp32),
    under torchrun when ``processes`` > 1."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    launcher = torchrun(processes) if processes > 1 else [sys.executable]
    cmd = launcher + ["-m", "softvq.cli.main", "train", str(config), "-o", str(out)]
    proc = subprocess.run(cmd, env=cpu_process_env(PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"{processes} process(es) on cpu" in proc.stdout
    return proc


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    cli_train(TREE, tmp_path / "two", processes=2)
    cli_train(TREE, tmp_path / "one")
    # With gradient accumulation instead of processes the curve is the same as well.
    cli_train({**TREE, "schedule": {**TREE["schedule"], "grad_accum": 2}}, tmp_path / "accum")

    one = {r["step"]: r["loss"] for r in read_log(tmp_path / "one")}
    assert sorted(one) == [1, 2, 3, 4, 5]
    for other in ("two", "accum"):
        curve = {r["step"]: r["loss"] for r in read_log(tmp_path / other)}
        assert sorted(curve) == sorted(one)
        for step in one:
            assert curve[step] == pytest.approx(one[step], rel=1e-4, abs=1e-6), (other, step)
    # The weights agree too (the loss is not the only thing that must match).
    a = Tokenizer.from_pretrained(tmp_path / "one" / "export").state_dict()
    b = Tokenizer.from_pretrained(tmp_path / "two" / "export").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    # ... and they moved far from the initialisation, so matching is not trivial.
    torch.manual_seed(TREE_SEED)
    init = Tokenizer(config_from_dict(TREE).model).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 50 * 1e-4  # the EMA (decay 0.9) of 5 steps


def test_a_finished_command_destroys_the_process_group(tmp_path):
    # A gloo group left alive at interpreter exit can abort the process after the work is done
    # (SIGABRT, "terminate called without an active exception"): the CLI must tear it down.
    script = (
        "import torch.distributed as dist\n"
        "from softvq.cli.main import main\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "status = main(['info', 'softvq-s-32'])\n"
        "print('STATUS', status, 'ALIVE', dist.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STATUS 0 ALIVE False" in proc.stdout


def test_runs_with_other_precision_settings_follow_each_other_in_one_process():
    """accelerate refuses a second Accelerator with other settings in the same process; a
    generator run (fp32) followed by a tokenizer run (bf16 on a GPU) hit that on the GPU machine."""
    from accelerate import Accelerator

    assert new_accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"
    with pytest.raises(ValueError, match="already been initialized"):  # what accelerate alone does
        Accelerator(mixed_precision="bf16", cpu=True)
    assert new_accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    assert new_accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"


def test_more_processes_than_gpus_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"2 processes on this machine but 1 visible GPU.*--nproc_per_node 1"):
        check_processes_fit_gpus(cpu=False)
    check_processes_fit_gpus(cpu=True)  # CPU processes share nothing
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_processes_fit_gpus(cpu=False)


@pytest.mark.parametrize("world_size, finalised", [("2", False), ("1", True)])
def test_a_launched_worker_exits_without_interpreter_finalisation(world_size, finalised):
    """Where gloo's threads could abort the process after its work is done, a launched worker
    skips finalisation (no atexit hook runs) yet keeps its flushed output and its exit status."""
    script = (
        "import atexit\n"
        "atexit.register(lambda: print('FINALISED'))\n"
        "from softvq.cli.main import run\n"
        "run(['train', '--list'])\n"  # a command that takes a launcher, and needs no process group to list
    )
    env = {**os.environ, "WORLD_SIZE": world_size}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wetok-gq-s-64" in proc.stdout  # the command's output survived the hard exit
    assert ("FINALISED" in proc.stdout) == finalised
    bad = subprocess.run([sys.executable, "-c", script.replace("'--list'", "'no-such-config'")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "config 'no-such-config' is neither a file nor a bundled config" in bad.stderr


def _ranks_write(tmp_path, body: str) -> list[str]:
    """Run ``body`` (script lines that set ``result``) on 2 launched CPU processes; each rank's
    ``repr(result)``, in rank order."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "from softvq.cli.main import release_process_group\n"
        "from softvq.training.accelerator import new_accelerator\n"
        "acc = new_accelerator(cpu=True)\n"
        "rank = acc.process_index\n"
        + body +
        f"open(f'{tmp_path}/rank{{rank}}.txt', 'w').write(repr(result))\n"
        "release_process_group()\n"
    )
    proc = subprocess.run(torchrun(2) + [str(script)], env=cpu_process_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]


def test_launched_processes_agree_on_a_stop_any_one_of_them_heard(tmp_path):
    """Both trainers stop when any process got Ctrl-C / SIGTERM: the flag is all-reduced."""
    answers = _ranks_write(tmp_path, "from softvq.training.stopping import on_any_process\n"
                                     "result = (on_any_process([rank == 1], acc.device)[0], "
                                     "on_any_process([False], acc.device)[0])\n")
    # rank 0 did not hear it, yet learns that rank 1 did; nobody heard anything in the second call
    assert answers == ["(True, False)", "(True, False)"]


def test_launched_processes_log_the_mean_of_their_windows(tmp_path):
    """Both trainers' log lines are the mean over processes (mean_over_processes): each rank's
    window means, averaged key by key, and the same record on every rank."""
    means = _ranks_write(tmp_path, "from softvq.training.accelerator import mean_over_processes\n"
                                   "from softvq.training.logging import LogWindow\n"
                                   "window = LogWindow()\n"
                                   "for step in range(3):\n"
                                   "    window.add({'loss': 10.0 * rank + step}, latest={'lr': 0.5})\n"
                                   "result = sorted(mean_over_processes(window.means(), 2, acc.device).items())\n")
    # rank 0's steps log 0, 1, 2 (mean 1); rank 1's 10, 11, 12 (mean 11): the line says 6 on both
    assert means == ["[('loss', 6.0), ('lr', 0.5)]"] * 2


@pytest.mark.slow
def test_a_launched_run_stopped_by_sigterm_keeps_a_checkpoint_and_resumes_exactly(tmp_path):
    """A scheduler's SIGTERM, sent as Slurm sends it, to every process (the workers, then torchrun,
    which relays its own to them: two per worker), stops the run after the step in progress with a
    checkpoint; --resume then continues with the losses a straight run has."""
    import json
    import signal
    import time

    schedule = {**TREE["schedule"], "lr_schedule": "constant"}  # so the lr does not depend on the run's length
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({**TREE, "schedule": {**schedule, "steps": 100_000}}))
    env = cpu_process_env(PYTHONUNBUFFERED="1")

    def launch(*args):
        return torchrun(2) + ["-m", "softvq.cli.main", "train", *args]

    run = tmp_path / "cut"
    proc = subprocess.Popen(launch(str(config), "-o", str(run)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    for pid in workers:  # Slurm's signal and torchrun's relay of its own, here without the relay's delay
        os.kill(int(pid), signal.SIGTERM)
        os.kill(int(pid), signal.SIGTERM)  # this second request used to stop the worker at once, unsaved
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stopped = len(read_log(run))
    assert 3 <= stopped < 100_000, err[-3000:]
    # the hint names the launcher: a resume on one process would train on with other losses
    assert (f"stopped at step {stopped}; continue with: torchrun --nproc_per_node 2 -m softvq.cli.main train "
            f"--resume --output {run}") in out, out[-2000:] + err[-2000:]
    assert (run / "checkpoints" / f"step-{stopped:08d}.pt").is_file()

    target = stopped + 2
    resumed = subprocess.run(launch("--resume", "-o", str(run), f"schedule.steps={target}"), env=env,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {stopped}" in resumed.stdout
    cli_train({**TREE, "schedule": {**schedule, "steps": target}}, tmp_path / "straight", processes=2)
    cut = {r["step"]: r["loss"] for r in read_log(run)}
    straight = {r["step"]: r["loss"] for r in read_log(tmp_path / "straight")}
    assert sorted(cut) == sorted(straight) == list(range(1, target + 1))  # no step lost or repeated
    for step in (stopped + 1, target):
        assert cut[step] == pytest.approx(straight[step], rel=1e-6), step
    assert json.loads((run / "metrics.json").read_text())["step"] == target


def test_launched_processes_log_the_unreadable_files_of_all_of_them(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(4):  # spread over the sorted names, so that both processes meet some
        (folder / f"{i}b.png").write_bytes(b"\x89PNG not really")
    tree = {**TREE, "data": {"source": "folder", "path": str(folder), "workers": 0, "num_eval_images": 1},
            "schedule": {**TREE["schedule"], "steps": 1}}  # one step: each process reads its half of a batch
    cli_train(tree, tmp_path / "two", processes=2)
    logged = [r["skipped_files"] for r in read_log(tmp_path / "two") if "skipped_files" in r]
    final = json.loads((tmp_path / "two" / "metrics.json").read_text())["skipped_files"]
    # each file once, from every process (the log counted process 0's only); those of the held-out
    # file and of both halves of the one batch
    assert logged[-1] == final >= 2, (logged, final)


def test_a_refusal_the_main_process_decides_is_printed_once(tmp_path):
    """Every process raises it (none may wait at a later collective), but it is one error."""
    out = tmp_path / "lat"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    proc = subprocess.run(torchrun(2) + ["-m", "softvq.cli.main", "pretokenize", str(out), "--bundled", "--model",
                                         "softvq-tiny", "--device", "cpu"],
                          env=cpu_process_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count(f"softvq pretokenize: error: {out} is not empty (it holds notes.txt") == 1, \
        proc.stderr[-3000:]


@pytest.mark.parametrize("key, value, said", [("steps", 3, "schedule.steps 5 -> 3"),
                                              ("batch_size", 7, "schedule.batch_size 8 -> 7")])
def test_processes_given_other_settings_are_refused_instead_of_waiting_forever(tmp_path, key, value, said):
    """A hand-made launch whose process 1 had another step count waited at a collective until a
    timeout killed it; one with another seed (generate, pretokenize) mixed two runs unsaid. The
    check comes before each process's own refusals (7 does not split over 2 processes)."""
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(TREE))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TREE, "schedule": {**TREE["schedule"], key: value}}))
    per_rank = tmp_path / "per_rank.py"  # what a launch script that builds each process's command line may do
    per_rank.write_text("import os, sys\nfrom softvq.cli.main import run\n"
                        f"config = {str(one)!r} if os.environ['RANK'] == '0' else {str(other)!r}\n"
                        f"run(['train', config, '-o', {str(tmp_path / 'run')!r}])\n")
    proc = subprocess.run(torchrun(2) + [str(per_rank)], env=cpu_process_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count(f"the 2 processes of this launch were given different settings (process 0 -> process 1: "
                             f"{said}); start every process with the same command line") == 1, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_settings_check_compares_as_json_and_leaves_each_process_its_own_keys(monkeypatch):
    """A config built in Python with betas=(0.9, 0.95) was refused by every process: its tuple and
    the same values as a list "differed". A process's own loading workers may differ."""
    from softvq.training import accelerator

    settings = {"optim": {"betas": (0.9, 0.95)}, "data": {"workers": 4, "path": "/data"}}

    def process_one_sends(mine, world):  # the same settings, but one loading worker, as JSON unpickles them
        theirs = {"optim": {"betas": [0.9, 0.95]}, "data": {"path": "/data"}}
        if "workers" in mine["data"]:
            theirs["data"]["workers"] = 1
        return [mine, theirs]
    monkeypatch.setattr(accelerator, "gather_objects", process_one_sends)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    accelerator.same_on_every_process(settings, 2, ignore=("data.workers",))
    with pytest.raises(ValueError, match=r"process 0 -> process 1: data.workers 4 -> 1\)"):
        accelerator.same_on_every_process(settings, 2)
