"""The bottlenecks between encoder and decoder, usable on their own on (..., input_dim) tensors.

Quantizers: :class:`SoftVQ` (paper Eq. 4), :class:`GMMVQ` (supp. B.2), :class:`VQ` (Eq. 2),
:class:`GaussianPosterior` (KL), :class:`Identity` (AE) and :class:`GroupedLookupFree` (WeTok's
group-wise LFQ). Compositions: :class:`ProductQuantizer` (groups), :class:`ResidualQuantizer`
(levels), :class:`SegmentCodebooks` (the release's token segments). :func:`build_bottleneck` makes
any of them from a :class:`~softvq.config.BottleneckConfig`, composition included.
"""

from softvq.bottlenecks.base import Bottleneck, BottleneckOutput
from softvq.bottlenecks.factory import build_bottleneck
from softvq.bottlenecks.gaussian import GaussianPosterior
from softvq.bottlenecks.gmmvq import GMMVQ
from softvq.bottlenecks.identity import Identity
from softvq.bottlenecks.lfq import GroupedLookupFree
from softvq.bottlenecks.product import ProductQuantizer
from softvq.bottlenecks.residual import ResidualQuantizer
from softvq.bottlenecks.segments import SegmentCodebooks
from softvq.bottlenecks.softvq import SoftVQ
from softvq.bottlenecks.vq import VQ

__all__ = [
    "Bottleneck", "BottleneckOutput", "GMMVQ", "GaussianPosterior", "GroupedLookupFree", "Identity",
    "ProductQuantizer", "ResidualQuantizer", "SegmentCodebooks", "SoftVQ", "VQ", "build_bottleneck",
]
