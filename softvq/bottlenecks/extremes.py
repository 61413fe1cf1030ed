"""Index of each row's largest (or smallest) entry, over a codebook-sized last axis, fast on CPU.

The codebook bottlenecks report hard code indices: SoftVQ the argmax of its posterior, VQ the argmin
of its distances, over K = 8192 codewords per token. PyTorch's CPU ``argmax``/``argmin`` along the
last axis run a scalar loop, about 15x slower than the vectorised ``amax``/``amin`` over the same
tensor (0.5-1.2 ms against 0.08 ms for 128 x 8192 floats on 2 threads).
:func:`last_axis_argmax` gets the same indices in two vectorised passes: the maxima of blocks of
about sqrt(K) columns, then the exact argmax inside each row's winning block (0.2-0.3 ms there;
1.3 ms less per softvq-s-64 bottleneck of ~21 ms, ``benchmarks/bench_breakdown.py``'s class).

It returns exactly what ``torch.argmax(x, -1)`` returns, ties and NaNs included: the winning block
is the first block holding the row's maximum (``amax`` propagates NaN, and ``argmax`` counts NaN as
the largest), and inside it the first such column. ``tests/test_bottlenecks_extremes.py`` checks
this against ``torch.argmax``/``argmin`` on ties, NaN, ±inf and ragged widths.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Shorter rows are left to torch: at K = 512 the blocked version measured no faster.
_MIN_WIDTH = 1024


def last_axis_argmax(x: Tensor) -> Tensor:
    """``torch.argmax(x, dim=-1)`` (first index of the maximum; NaN counts as largest), faster on CPU."""
    return _last_axis_extreme(x, largest=True)


def last_axis_argmin(x: Tensor) -> Tensor:
    """``torch.argmin(x, dim=-1)`` (first index of the minimum; NaN counts as smallest), faster on CPU."""
    return _last_axis_extreme(x, largest=False)


def _last_axis_extreme(x: Tensor, largest: bool) -> Tensor:
    k = x.shape[-1] if x.dim() else 0
    if x.device.type != "cpu" or k < _MIN_WIDTH or not x.is_floating_point():
        # One fused kernel on accelerators; too little to gain on short rows; integer rows keep
        # torch's own definition.
        return x.argmax(-1) if largest else x.argmin(-1)
    arg, extreme = (torch.argmax, torch.amax) if largest else (torch.argmin, torch.amin)
    # A power of two near sqrt(K): the second pass scans K / block maxima and one block per row,
    # both small (K = 8192 -> 64 maxima, then 128 columns).
    block = 1 << (k.bit_length() // 2)
    with torch.no_grad():
        rows = x.reshape(-1, k)
        whole = k // block * block
        best = extreme(rows[:, :whole].unflatten(-1, (-1, block)), dim=-1)  # (n, whole / block)
        if whole < k:  # the ragged last block
            best = torch.cat([best, extreme(rows[:, whole:], dim=-1, keepdim=True)], dim=-1)
        start = arg(best, dim=-1, keepdim=True) * block  # the first block holding the extreme
        # The last block may be short: its column indices are clamped to k - 1, which repeats the
        # last column after itself and so cannot move the first occurrence.
        columns = (start + torch.arange(block, device=x.device)).clamp_max_(k - 1)
        inside = arg(rows.gather(-1, columns), dim=-1, keepdim=True)
        return (start + inside).reshape(x.shape[:-1])
