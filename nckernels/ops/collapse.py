"""Backend dispatch of the neural-collapse statistics: class statistics, pair statistics, argmax.

These are measurements, not losses: no autograd. Each function takes inputs already validated by
``nckernels.functional`` / ``nckernels.collapse`` and the backend chosen by ``nckernels.backend``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
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
    if backend == "cuda":
        return _segment_stats_cuda(features, labels, num_classes, ignore_index)
    if backend == "cpp":
        return _ext.get().class_stats_cpu(features.contiguous(), labels.long().contiguous(), num_classes,
                                          ignore_index)
    return segment_ref.segment_stats(features, labels, num_classes, ignore_index)


CUDA_CHUNK = 32  # most rows one block of csrc/cuda/class_stats_cuda.cu reduces


class ChunkPlan(NamedTuple):
    """Rows sorted by class and cut into chunks of at most ``chunk`` rows (csrc/cuda/class_stats_cuda.cu).

    Class ``c`` owns the sorted rows ``perm[ends[c]:ends[c + 1]]`` (ignored rows sort last) and
    ``ceil(n_c / chunk)`` chunks; ``chunk_end`` / ``multi_end`` count chunks / multi-chunk classes
    cumulatively; chunk ``k`` belongs to class ``chunk_cls[k]``, multi-chunk class ``g`` is
    ``multi_cls[g]`` (entries past the totals are padding, never read). A chunk of a multi-chunk
    class has the partial slot ``ends[c] // chunk + j + g``, below ``num_slots``."""
    perm: Tensor
    ends: Tensor
    counts: Tensor
    chunk_end: Tensor
    chunk_cls: Tensor
    multi_end: Tensor
    multi_cls: Tensor
    num_slots: int


def chunk_plan(labels: Tensor, num_classes: int, ignore_index: int, chunk: int = CUDA_CHUNK) -> ChunkPlan:
    """The plan of :class:`ChunkPlan` from torch ops, with no host synchronisation (sizes are bounds:
    ``sum_c ceil(n_c / chunk) <= N / chunk + min(N, C)`` chunks; multi-chunk classes have more than
    ``chunk`` rows, so there are at most ``N / (chunk + 1)`` of them)."""
    N, C, dev = labels.numel(), num_classes, labels.device
    key = labels.to(torch.int32).masked_fill_(labels == ignore_index, C)
    sorted_key, perm = torch.sort(key, stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(-1, C, device=dev, dtype=torch.int32), right=True)
    counts = ends[1:] - ends[:-1]
    n_chunks = (counts + chunk - 1) // chunk
    chunk_end = n_chunks.cumsum(0)
    multi_end = (n_chunks > 1).long().cumsum(0)
    chunk_cls = torch.searchsorted(chunk_end, torch.arange(N // chunk + min(N, C), device=dev), right=True)
    multi_bound = N // (chunk + 1)
    multi_cls = torch.searchsorted(multi_end, torch.arange(multi_bound, device=dev), right=True)
    return ChunkPlan(perm, ends, counts, chunk_end, chunk_cls, multi_end, multi_cls,
                     N // chunk + multi_bound if multi_bound else 1)


def _segment_stats_cuda(features: Tensor, labels: Tensor, num_classes: int, ignore_index: int):
    N, D = features.shape
    dev = features.device
    sums = torch.zeros((num_classes, D), dtype=torch.float64, device=dev)
    m2 = torch.zeros((num_classes,), dtype=torch.float64, device=dev)
    if N == 0 or num_classes == 0:
        return torch.zeros((num_classes,), dtype=torch.int64, device=dev), sums, m2
    plan = chunk_plan(labels.long(), num_classes, ignore_index)
    part = torch.empty((plan.num_slots, D), dtype=torch.float64, device=dev)
    part_m2 = torch.empty((plan.num_slots,), dtype=torch.float64, device=dev)
    _ext.get_cuda().class_stats_cuda(features, plan.perm, plan.ends, plan.chunk_end, plan.chunk_cls, plan.multi_end,
                                     plan.multi_cls, CUDA_CHUNK, sums, m2, part, part_m2)
    return plan.counts, sums, m2


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
