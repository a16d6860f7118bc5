"""Vocab-parallel linear cross-entropy: the LM head split over the ranks of a tensor-parallel group.

Rank ``r`` holds the rows ``[start_r, start_r + V_r)`` of the output embedding (and of the bias
and class weights); the hidden states and targets are replicated. Each rank runs the fused
row-statistics pass of :func:`nckernels.linear_cross_entropy` on its shard (target index
clamped to 0 where the rank does not own it), giving ``lse^(r)``, ``z'^(r)_target`` (kept only
by the owner), ``sum_{j in S_r} omega_j z'_j`` and ``omega_target`` (owner only); the sharded
log-sum-exp (``sharded_lse.py``) combines them into the global ``lse``, ``z'_y``, smoothing sum and
``omega_y``, from which every rank computes the same per-token loss
(``reference/linear_cross_entropy.token_loss``). Backward: the coefficients
``dL/dz'_ij = a_i p_ij - b_i [j = y_i] - c_i omega_j`` from the global statistics, with ``b = 0``
on the ranks that do not own ``y_i``; the shard's backward pass gives ``dW_r``, ``db_r`` and a
partial ``dx``, summed over the group. Communication per call: ``O(tokens)`` forward,
``O(tokens x D)`` backward, plus one all-gather of 3 numbers per rank (the shard layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..functional import _check_scalar, _check_tensor, _prepare_linear
from ..ops.linear_cross_entropy import _backend_backward, _backend_forward, _valid_rows
from ..reference.linear_cross_entropy import grad_coefficients, token_loss
from .comm import all_gather_rows, rank_and_size, replicated
from .sharded_lse import sharded_rows, tiled_size


def _vocabulary(vocab_start: int, shard_size: int, class_weight: Optional[Tensor], group, device):
    """``(V, sum_j omega_j)`` over the group, checking that the shards tile ``[0, V)``: one all-gather of
    ``(vocab_start, V_r, sum_{j in S_r} omega_j)`` per rank."""
    weight_sum = float(class_weight.double().sum()) if class_weight is not None else float(shard_size)
    mine = torch.tensor([[vocab_start, shard_size, weight_sum]], dtype=torch.float64, device=device)
    table = all_gather_rows(mine, [1] * rank_and_size(group)[1], group).cpu()
    shards = [(int(start), int(start) + int(size)) for start, size in table[:, :2].tolist()]
    return tiled_size(shards, "the ranks' vocab_start / weight_shard"), float(table[:, 2].sum())


@dataclass(frozen=True, eq=False)
class _VocabShard:
    """This rank's classes ``[start, start + V_r)`` for the ``rows`` that have a target."""
    rows: Tensor            # (n,) indices of the non-ignored tokens
    target: Tensor          # (n,) target index within the shard, 0 where not owned
    owned: Tensor           # (n,) bool: the target lies in this shard
    class_weight: Optional[Tensor]  # (V_r,) fp32 or None
    num_tokens: int
    num_classes: int        # V, over all ranks
    smooth_total: float     # sum_j omega_j over all ranks
    label_smoothing: float
    z_loss: float
    softcap: float
    grad_filter: float
    backend: str

    def shard_stats(self, x, w, bias):
        """``lse^(r)`` and the summed ``(z'_target, sum_j omega_j z'_j, omega_target)`` of this shard (the ranks
        combine fp32 LSEs: the residual ``lse_lo`` of the single-device op is not carried across them)."""
        if self.rows.numel() == 0:
            empty = x.new_empty(0, dtype=torch.float32)
            return empty, (empty, empty, empty)
        lse, _, z_target, z_smooth = _backend_forward(self.backend)(x, w, bias, self.rows, self.target,
                                                                 self.class_weight, self.label_smoothing, self.softcap)
        omega = self.class_weight[self.target] if self.class_weight is not None else torch.ones_like(lse)
        return lse, (torch.where(self.owned, z_target, 0.0), z_smooth, torch.where(self.owned, omega, 0.0))

    def outputs(self, lse, summed):
        """Per token (0 at ignored ones): the loss, ``lse`` and ``omega_target`` (the mean's weight)."""
        z_target, z_smooth, omega = summed
        loss = token_loss(lse, z_target, z_smooth, omega, self.smooth_total, self.label_smoothing, self.z_loss,
                          self.num_classes)
        return tuple(lse.new_zeros(self.num_tokens).index_put_((self.rows,), t) for t in (loss, lse, omega))

    def shard_backward(self, tensors, lse, summed, grads):
        x, w, bias = tensors
        if self.rows.numel() == 0:
            return torch.zeros_like(x), torch.zeros_like(w), (torch.zeros_like(bias) if bias is not None else None)
        a, b, c = grad_coefficients(grads[0][self.rows].float(), grads[1][self.rows].float(), lse, summed[2],
                                    self.smooth_total, self.label_smoothing, self.z_loss, self.num_classes)
        b = torch.where(self.owned, b, 0.0)  # the one-hot term lives on the rank that owns the target
        return _backend_backward(self.backend, False)(x, w, bias, self.rows, self.target, self.class_weight, lse,
                                                      torch.zeros_like(lse), a, b, c, self.softcap,
                                                      grad_filter=self.grad_filter)


def vocab_parallel_cross_entropy(
    input: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    return_lse: bool = False,
    grad_filter: Optional[float] = None,
    impl: str = "auto",
):
    """:func:`nckernels.linear_cross_entropy` with the classifier split over the ranks of ``group``.

    ``input (..., D)`` and ``target (...)`` are replicated on every rank of ``group`` (the default
    group when ``None``; a single process without ``torch.distributed`` is a group of one);
    ``weight_shard (V_r, D)`` holds the classes ``[vocab_start, vocab_start + V_r)``, and
    ``linear_bias`` / ``weight`` (class weights) are the ``(V_r,)`` shards of the same range. The
    shards of the ranks must tile ``[0, V)``, ``V = sum_r V_r`` (any sizes, in any rank order).
    Every other argument, the loss (PyTorch's ``cross_entropy`` with ``weight``,
    ``label_smoothing``, ``ignore_index`` and ``reduction``, plus ``z_loss * omega_y * lse**2``, on
    logits soft-capped by ``softcap``), ``shift``, ``return_lse``, ``grad_filter`` and ``impl``, are
    those of :func:`nckernels.linear_cross_entropy`, as are the returned values, identical on every
    rank. Gradients: ``input`` gets the full gradient (summed over the group), ``weight_shard`` and
    ``linear_bias`` that of their shard. No ``tokens x V_r`` logits are materialised.
    """
    _check_scalar("label_smoothing", label_smoothing, low=0.0, high=1.0)
    _check_scalar("z_loss", z_loss, low=0.0)
    if softcap is not None:
        _check_scalar("softcap", softcap, low=0.0, strict_low=True)
    if grad_filter is not None:
        _check_scalar("grad_filter", grad_filter, low=0.0, strict_low=True)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    x, w, bias, tgt, class_weight, shape, backend = _prepare_linear(input, weight_shard, target, linear_bias, weight,
                                                                    reduction, ignore_index, shift, impl,
                                                                    weight_name="weight_shard")
    if w.shape[0] == 0:
        raise ValueError("weight_shard must hold at least one class (row)")
    if grad_filter is not None and backend != "triton":
        raise ValueError(f"grad_filter is implemented by the Triton backend only (impl resolved to {backend!r})")
    num_classes, smooth_total = _vocabulary(vocab_start, w.shape[0], class_weight, group, x.device)
    rows, row_target = _valid_rows(tgt, ignore_index, num_classes)
    owned = (row_target >= vocab_start) & (row_target < vocab_start + w.shape[0])
    head = _VocabShard(rows, torch.where(owned, row_target - vocab_start, 0), owned, class_weight, tgt.shape[0],
                       num_classes, smooth_total, float(label_smoothing), float(z_loss), float(softcap or 0.0),
                       float(grad_filter or 0.0), backend)
    loss_tok, lse, target_weight = sharded_rows(head, replicated(x, group), w, bias, group=group)
    if reduction == "none":
        loss = loss_tok.view(shape)[..., :-1] if shift else loss_tok.view(shape)
    elif reduction == "sum":
        loss = loss_tok.sum()
    else:  # over the non-ignored tokens' class weights: 0 / 0 = NaN when all are ignored, like PyTorch
        loss = loss_tok.sum() / target_weight.detach().sum()
    if not return_lse:
        return loss
    lse = lse.view(shape)
    return loss, (lse[..., :-1] if shift else lse)
