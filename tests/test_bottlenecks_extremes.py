"""The blocked last-axis argmax/argmin must return exactly torch.argmax/argmin's indices."""

import pytest
import torch

from softvq.bottlenecks.extremes import last_axis_argmax, last_axis_argmin

OURS_AND_TORCH = [(last_axis_argmax, torch.argmax), (last_axis_argmin, torch.argmin)]


@pytest.mark.parametrize("ours, reference", OURS_AND_TORCH)
@pytest.mark.parametrize("shape", [(7, 8192), (3, 5, 1024), (4, 1500), (2, 4099), (8192,)])
def test_matches_torch_on_random_rows(ours, reference, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(x), reference(x, dim=-1))


@pytest.mark.parametrize("ours, reference", OURS_AND_TORCH)
def test_ties_resolve_to_the_first_index_like_torch(ours, reference):
    # Integer values in a narrow range: every row has its extreme many times, in several blocks.
    x = torch.randint(-3, 4, (64, 2000), generator=torch.Generator().manual_seed(1)).float()
    assert torch.equal(ours(x), reference(x, dim=-1))
    # The extreme only in the short ragged last block (2000 = 62 blocks of 32 + 16), and at the
    # very last column, where the clamped indices repeat it.
    y = torch.zeros(3, 2000)
    y[0, 1990], y[1, -1], y[2, 1920] = 5.0, 5.0, 5.0
    assert torch.equal(ours(y if ours is last_axis_argmax else -y), torch.tensor([1990, 1999, 1920]))


@pytest.mark.parametrize("ours, reference", OURS_AND_TORCH)
def test_nan_and_infinities_follow_torch(ours, reference):
    x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(2))
    x[0, 2999] = float("nan")  # NaN counts as the extreme for both argmax and argmin
    x[1, [17, 2500]] = float("nan")
    x[2, 40] = float("inf")
    x[3, 41] = float("-inf")
    x[4] = float("-inf")
    x[5] = float("inf")
    assert torch.equal(ours(x), reference(x, dim=-1))


def test_non_contiguous_input_and_autograd_are_handled():
    base = torch.randn(4096, 9, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x = base.t()  # (9, 4096) with a column stride: rows are not contiguous
    idx = last_axis_argmax(x)
    assert torch.equal(idx, x.argmax(-1))
    assert not idx.requires_grad


def test_short_rows_and_integers_fall_back_to_torch():
    short = torch.randn(5, 300)
    assert torch.equal(last_axis_argmax(short), short.argmax(-1))
    ints = torch.randint(0, 9, (5, 4096))
    assert torch.equal(last_axis_argmin(ints), ints.argmin(-1))
