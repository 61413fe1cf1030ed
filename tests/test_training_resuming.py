import random

import numpy as np
import torch

from softvq.training.checkpointing import capture_rng
from softvq.training.resuming import RESEED_STRIDE, restore_or_reseed_rng


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_the_same_process_count_takes_its_own_saved_streams_back():
    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        np.random.seed(100 + rank)
        states.append(capture_rng())
        expected = _draws() if rank == 1 else None
    assert restore_or_reseed_rng(states, rank=1, world=2, seed=0, step=5) is None
    py, nump, t = _draws()
    assert (py, nump) == expected[:2] and torch.equal(t, expected[2])
    torch.manual_seed(7)
    single = capture_rng()  # older generator checkpoints stored one process's states as a dict
    after = torch.rand(3)
    assert restore_or_reseed_rng(single, rank=0, world=1, seed=0, step=5) is None
    assert torch.equal(torch.rand(3), after)


def test_another_process_count_reseeds_from_seed_step_and_rank_and_says_so():
    torch.manual_seed(1)
    states = [capture_rng()]
    note = restore_or_reseed_rng(states, rank=1, world=2, seed=3, step=10)
    assert note is not None and "resumed with 2 processes instead of 1" in note
    drawn = torch.rand(3)
    torch.manual_seed(3 + RESEED_STRIDE * 10 + 1)
    assert torch.equal(drawn, torch.rand(3))
    fewer = restore_or_reseed_rng(states * 2, rank=0, world=1, seed=3, step=10)
    assert fewer is not None and "resumed with 1 process instead of 2" in fewer
