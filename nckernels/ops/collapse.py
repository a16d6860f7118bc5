"""Backend dispatch of the neural-collapse statistics: class statistics, pair statistics, argmax.

These are measurements, not losses: no autograd. Each function takes inputs already validated by
``nckernels.functional`` / ``nckernels.collapse`` and the backend chosen by ``nckernels.backend``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _ext
from ..reference import argmax as argmax_ref
from ..reference import pairwise as pairwise_ref
from ..reference import segment as segment_ref


def segment_stats(features: Tensor, labels: Tensor, num_classes: int, ignore_index: int, backend: str):
    """``(counts, sums, m2)`` of ``nckernels.reference.segment.segment_stats`` on ``backend``."""
    if backend == "triton":
        from ..kernels import segment

        return segment.segment_stats(features, labels, num_classes, ignore_index)
    if backend == "cpp":
        return _ext.get().class_stats_cpu(features.contiguous(), labels.long().contiguous(), num_classes,
                                          ignore_index)
    return segment_ref.segment_stats(features, labels, num_classes, ignore_index)


def pair_stats(means: Tensor, variances: Tensor, cdnv_power: int, backend: str) -> Tensor:
    """``(4, 3)`` pair moments of ``nckernels.reference.pairwise.pair_stats`` on ``backend``."""
    if backend == "triton":
        from ..kernels import pairwise

        return pairwise.pair_stats(means, variances, cdnv_power)
    return pairwise_ref.pair_stats(means, variances, cdnv_power)


def linear_argmax(x: Tensor, w: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    """``argmax_j (x_i . w_j + b_j)`` per row, ``-1`` where every logit is ``-inf``."""
    if backend == "triton":
        from ..kernels import linear_reduce

        return linear_reduce.linear_argmax(x, w, bias)
    return argmax_ref.linear_argmax(x, w, bias)
