"""Process-group plumbing of the sharded heads.

Collectives that are no-ops on a group of one (a run without ``torch.distributed``, or a
single rank, needs no special case upstream), and the two autograd boundaries where a head's
input enters the group, as in Megatron-LM:

* :func:`replicated`: the input is already identical on every rank (tensor parallelism).
  Forward: identity; backward: all-reduce SUM, since each rank holds the gradient through
  its own slice of the classes only.
* :func:`gather_rows`: each rank holds its own rows (data parallelism, Partial FC). Forward:
  all-gather of the rows; backward: all-reduce SUM of the gradient of the gathered rows, then
  this rank's rows (times ``grad_scale``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_size(group=None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return rank, dist.get_world_size(group)


def all_reduce(t: Tensor, group=None, op: str = "sum") -> Tensor:
    """In-place all-reduce (``op``: ``"sum"`` or ``"max"``) of ``t`` over ``group``; returns ``t``."""
    if rank_and_size(group)[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


def all_gather_rows(t: Tensor, sizes: list[int], group=None) -> Tensor:
    """Concatenation over the ranks of their tensors ``t`` of ``sizes[rank]`` rows (padded to
    ``max(sizes)`` rows for the collective, which needs equal shapes)."""
    if len(sizes) == 1:
        return t
    longest = max(sizes)
    if t.shape[0] < longest:
        t = torch.cat([t, t.new_zeros((longest - t.shape[0],) + t.shape[1:])])
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def all_gather_sizes(n: int, group=None, device=None) -> list[int]:
    """Every rank's ``n`` (one all-gather of one int64 per rank)."""
    size = rank_and_size(group)[1]
    mine = torch.tensor([[n]], dtype=torch.int64, device=device)
    return all_gather_rows(mine, [1] * size, group).flatten().tolist()


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


def replicated(x: Tensor, group=None) -> Tensor:
    """``x``, replicated on every rank of ``group``; its gradient is summed over the ranks."""
    return _Replicated.apply(x, group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, grad_scale):
        rank = rank_and_size(group)[0]
        ctx.group, ctx.grad_scale = group, grad_scale
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        total = all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group)
        return total[ctx.rows] * ctx.grad_scale, None, None, None


def gather_rows(x: Tensor, sizes: list[int], group=None, grad_scale: float = 1.0) -> Tensor:
    """All-gather of every rank's rows ``x`` (``sizes[r]`` rows on rank ``r``), differentiable: the
    gradient of ``x`` is ``grad_scale`` times the rank-summed gradient of the gathered rows of this rank."""
    return _GatherRows.apply(x, sizes, group, grad_scale)
