"""The sharded log-sum-exp: the one mechanism behind every sharded head.

The classes are split over the ranks of a group; rank ``r`` holds the logits ``z_ij`` of its
classes ``j in S_r``. Each rank reduces its slice with the single-device fused op (never a
``rows x classes`` matrix), returning per row its log-sum-exp ``lse^(r)`` and statistics that
are plain sums over classes (a target logit, non-zero only on the rank that owns the target;
a weighted logit sum). Two all-reduces of ``O(rows)`` combine them::

    m_i   = max_r lse^(r)_i                                               (all-reduce MAX)
    lse_i = m_i + log sum_r exp(lse^(r)_i - m_i),   s_i = sum_r s^(r)_i    (one all-reduce SUM)

(an all ``-inf`` row stays ``-inf``, a ``+inf`` gives ``+inf``, NaN propagates). The head then
maps the global statistics to its outputs (the per-row loss). The backward needs no reduction
over classes: ``dL/dz_ij`` for ``j in S_r`` depends on ``z_ij`` and the global statistics only
(e.g. ``p_ij = exp(z_ij - lse_i)``), so each rank recomputes its own slice. Gradients of an input
replicated over the ranks are summed by :func:`nckernels.distributed.comm.replicated` /
``gather_rows`` around it, not here.

Every rank must call with the same rows (the outputs, like the loss, are identical on every rank,
and so is the upstream gradient that reaches the backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .comm import all_reduce, rank_and_size


def all_reduce_logsumexp(lse: Tensor, summed: Sequence[Tensor] = (), group=None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``(logsumexp_r lse^(r), tuple(sum_r s^(r) for s in summed))`` over the ranks of ``group``.

    ``lse`` and each of ``summed`` are fp32 tensors of the same shape; two all-reduces (MAX,
    then one SUM carrying ``exp(lse^(r) - m)`` and ``summed`` together)."""
    if rank_and_size(group)[1] == 1:
        return lse, tuple(summed)
    peak = all_reduce(lse.clone(), group, op="max")
    shift = torch.where(peak.isfinite(), peak, 0.0)  # all -inf: exp(-inf) = 0, log 0 = -inf; +inf, NaN: kept
    packed = all_reduce(torch.stack([torch.exp(lse - shift), *summed]), group)
    return shift + torch.log(packed[0]), tuple(packed[1:])


def tiled_size(shards: Sequence[tuple[int, int]], what: str) -> int:
    """``n`` when the ``(start, end)`` class ranges of the shards tile ``[0, n)`` (in any order) without
    gaps or overlaps; a ``ValueError`` naming ``what`` otherwise."""
    covered = 0
    for start, end in sorted(shards):
        if start != covered or end < start:
            raise ValueError(f"{what} must tile [0, num_classes) without gaps or overlaps; the shards are "
                             f"{sorted(shards)}")
        covered = end
    return covered


class ShardedHead(Protocol):
    """What a sharded head computes on its own slice of the classes (see the module docstring)."""

    def shard_stats(self, *tensors: Optional[Tensor]) -> tuple[Tensor, Sequence[Tensor]]:
        """This shard's per-row ``lse^(r)`` and the statistics to be summed over the shards (fp32)."""

    def outputs(self, lse: Tensor, summed: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The head's outputs (identical on every rank) from the global statistics."""

    def shard_backward(self, tensors: Sequence[Optional[Tensor]], lse: Tensor, summed: Sequence[Tensor],
                       grads: Sequence[Tensor]) -> tuple[Optional[Tensor], ...]:
        """Gradients of ``tensors`` through this shard's logits, given the outputs' gradients."""


class _ShardedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head, group, *tensors):
        with torch.autocast(tensors[0].device.type, enabled=False):  # callers cast; statistics stay fp32
            lse, summed = all_reduce_logsumexp(*head.shard_stats(*tensors), group=group)
            ctx.head, ctx.num_tensors = head, len(tensors)
            ctx.save_for_backward(*tensors, lse, *summed)
            return head.outputs(lse, summed)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        saved, n = ctx.saved_tensors, ctx.num_tensors
        with torch.autocast(saved[0].device.type, enabled=False):
            return (None, None) + tuple(ctx.head.shard_backward(saved[:n], saved[n], saved[n + 1:], grads))


def sharded_rows(head: ShardedHead, *tensors: Optional[Tensor], group=None) -> tuple[Tensor, ...]:
    """``head.outputs`` of the statistics of ``head.shard_stats(*tensors)`` combined over ``group``;
    differentiable w.r.t. ``tensors`` through ``head.shard_backward`` (runs without autocast)."""
    return _ShardedRows.apply(head, group, *tensors)


@dataclass(frozen=True)
class _LogitsShard:
    """Explicit logits: this rank's classes along ``dim``."""
    dim: int
    impl: str

    def shard_stats(self, logits):
        from ..functional import logsumexp

        return logsumexp(logits, self.dim, impl=self.impl), ()

    def outputs(self, lse, summed):
        return (lse,)

    def shard_backward(self, tensors, lse, summed, grads):
        (logits,) = tensors  # d lse_i / d z_ij = p_ij = exp(z_ij - lse_i), the global softmax on this shard
        p = torch.exp(logits.float() - lse.unsqueeze(self.dim))
        return ((grads[0].unsqueeze(self.dim) * p).to(logits.dtype),)


def sharded_logsumexp(input: Tensor, dim: int = -1, *, group=None, impl: str = "auto") -> Tensor:
    """``log sum_j exp z_j`` over classes split across the ranks of ``group`` (fp32, identical on every rank).

    ``input`` holds this rank's slice of the classes along ``dim`` (any number of classes per rank,
    zero included); the other dimensions must match on every rank. Each rank reduces its slice with
    :func:`nckernels.logsumexp`, the row statistics are combined with two all-reduces of the output's
    size, and the backward recomputes ``d lse / d z_j = softmax(z)_j`` on the local slice (no
    communication: the upstream gradient is the same on every rank, as the output is)."""
    return sharded_rows(_LogitsShard(dim, impl), input, group=group)[0]
