"""Process-group plumbing of the sharded heads.

Collectives that are no-ops on a group of one (a run without ``torch.distributed``, or a
single rank, needs no special case upstream), and the two autograd boundaries where a head's
input enters the group, as in Megatron-LM:

* :func:`replicated`: the input is already identical on every rank (tensor parallelism).
  Forward: identity; backward: all-reduce SUM, since each rank holds the gradient through
  its own slice of the classes only.
* :func:`gather_rows`: each rank holds its own rows (data parallelism, Partial FC). Forward:
  all-gather of the rows; backward: this rank's rows of the rank-summed gradient of the gathered
  rows (times ``grad_scale``): a reduce-scatter where the backend has a native one, else an
  all-reduce and a slice (:func:`reduce_scatter_rows`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

# Backends with a native reduce-scatter (``reduce_scatter_single``, ``reduce_scatter_tensor`` before torch 2.13).
# Gloo has one too, but it all-reduces the whole input and keeps this rank's chunk (ProcessGroupGloo.cpp):
# with the padding it sends at least as much as all-reduce + slice, which gloo and any other backend get.
REDUCE_SCATTER_BACKENDS = frozenset({"nccl"})
_REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


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


def has_reduce_scatter(group, device) -> bool:
    """Whether the backend of ``group`` for tensors on ``device`` is one of :data:`REDUCE_SCATTER_BACKENDS`."""
    backends = dict(part.split(":") for part in str(dist.get_backend_config(group)).split(","))
    return backends.get(torch.device(device).type) in REDUCE_SCATTER_BACKENDS


def reduce_scatter_rows(t: Tensor, sizes: list[int], group=None) -> Tensor:
    """This rank's rows of ``sum_r t^(r)``, where ``t`` has ``B = sum(sizes)`` rows, those of rank ``r`` the
    ``sizes[r]`` from ``sum(sizes[:r])``.

    One reduce-scatter of the blocks padded to ``M = max(sizes)`` rows (a ring sends ``(K - 1) M`` rows per
    rank) where the backend has a native one and ``K M <= 2 B``; otherwise one all-reduce of ``t`` (a ring
    sends ``2 (K - 1) B / K`` rows) and a slice. The choice depends on ``sizes`` and the backend only: the
    same on every rank."""
    rank, size = rank_and_size(group)
    if size == 1:
        return t
    if size * max(sizes) > 2 * sum(sizes) or not has_reduce_scatter(group, t.device):
        start = sum(sizes[:rank])
        return all_reduce(t.clone(memory_format=torch.contiguous_format), group)[start:start + sizes[rank]]
    padded = pad_sequence(t.split(sizes), batch_first=True)  # (K, max(sizes), ...), a copy: t is not written
    out = t.new_empty(padded.shape[1:])
    getattr(dist, _REDUCE_SCATTER)(out, padded.flatten(0, 1), group=group)
    return out[:sizes[rank]]


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
        ctx.sizes, ctx.group, ctx.grad_scale = sizes, group, grad_scale
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad, ctx.sizes, ctx.group) * ctx.grad_scale, None, None, None


def gather_rows(x: Tensor, sizes: list[int], group=None, grad_scale: float = 1.0) -> Tensor:
    """All-gather of every rank's rows ``x`` (``sizes[r]`` rows on rank ``r``), differentiable: the
    gradient of ``x`` is ``grad_scale`` times the rank-summed gradient of the gathered rows of this rank."""
    return _GatherRows.apply(x, sizes, group, grad_scale)
