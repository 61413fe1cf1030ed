"""Two CPU processes (gloo, launched with torchrun like a user would) train exactly like one
process with the same global batch: same data, same averaged gradients, same loss curve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from softvq.tokenizer import Tokenizer
from softvq.training.config import config_from_dict
from softvq.training.logging import read_log
from softvq.training.trainer import Trainer

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


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TREE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "softvq.cli.main", "train", str(config), "-o", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stdout

    torch.set_num_threads(1)
    Trainer(config_from_dict(TREE), tmp_path / "one").fit()
    # With gradient accumulation instead of processes the curve is the same as well.
    accum = {**TREE, "schedule": {**TREE["schedule"], "grad_accum": 2}}
    Trainer(config_from_dict(accum), tmp_path / "accum").fit()

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
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 100 * 1e-4


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
