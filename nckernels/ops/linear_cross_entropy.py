"""``nckernels::linear_ce_forward`` / ``linear_ce_backward``: the linear cross-entropy custom ops.

The forward returns the per-token loss and log-sum-exp (fp32, zeros at ignored tokens); the
backward recomputes logits tiles from the saved LSE. Both take flat ``x (M, D)`` and
``target (M,)``; reductions, shapes and argument checks live in ``functional.py``. The math
and the per-token gradient coefficients are in ``reference/linear_cross_entropy.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ..reference import linear_cross_entropy as ref


def _valid_rows(target: Tensor, ignore_index: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Indices of non-ignored tokens and their targets; raises on a target out of range."""
    valid = target != ignore_index
    rows = valid.nonzero().squeeze(1)
    tgt = target[rows]
    if tgt.numel() and bool(((tgt < 0) | (tgt >= num_classes)).any()):
        bad = tgt[(tgt < 0) | (tgt >= num_classes)][0].item()
        raise ValueError(
            f"target contains class index {bad} outside [0, {num_classes}) (linear_weight has "
            f"{num_classes} rows; ignore_index={ignore_index})"
        )
    return rows, tgt


def _class_terms(class_weight: Optional[Tensor], tgt: Tensor, num_classes: int):
    """``omega_y`` per token (fp32) and ``sum_j omega_j``."""
    if class_weight is None:
        return torch.ones(tgt.shape, dtype=torch.float32, device=tgt.device), float(num_classes)
    return class_weight[tgt], class_weight.sum()


def _backend_forward(backend: str):
    if backend == "triton":
        from ..kernels import linear_reduce

        return linear_reduce.forward
    if backend == "cpp":
        return lambda *a: ref.forward(*a, epilogue=_ext.get().ce_rows_forward)
    return ref.forward


@torch.library.custom_op("nckernels::linear_ce_forward", mutates_args=())
def linear_ce_forward(
    x: Tensor, w: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, grad_filter: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    M, V = target.shape[0], w.shape[0]
    rows, tgt = _valid_rows(target, ignore_index, V)
    loss = torch.zeros(M, dtype=torch.float32, device=x.device)
    lse = torch.zeros(M, dtype=torch.float32, device=x.device)
    if rows.numel() == 0:
        return loss, lse
    lse_v, z_target, z_smooth = _backend_forward(backend)(
        x, w, bias, rows, tgt, class_weight, label_smoothing, softcap
    )
    omega_t, smooth_total = _class_terms(class_weight, tgt, V)
    loss[rows] = ref.token_loss(lse_v, z_target, z_smooth, omega_t, smooth_total, label_smoothing, z_loss, V)
    lse[rows] = lse_v
    return loss, lse


@linear_ce_forward.register_fake
def _(x, w, bias, target, class_weight, ignore_index, label_smoothing, z_loss, softcap, grad_filter, backend):
    M = target.shape[0]
    return x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("nckernels::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    x: Tensor, w: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    lse: Tensor, grad_loss: Tensor, grad_lse: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float, grad_filter: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    V = w.shape[0]
    rows, tgt = _valid_rows(target, ignore_index, V)
    db_empty = w.new_zeros(V if bias is not None else 0)
    if rows.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(w), db_empty
    omega_t, smooth_total = _class_terms(class_weight, tgt, V)
    lse_v = lse[rows]
    a, b, c = ref.grad_coefficients(grad_loss[rows].float(), grad_lse[rows].float(), lse_v, omega_t,
                                    smooth_total, label_smoothing, z_loss, V)
    if backend == "triton":
        from ..kernels import linear_reduce

        dx, dw, db = linear_reduce.backward(
            x, w, bias, rows, tgt, class_weight, lse_v, a, b, c, softcap,
            grad_filter=grad_filter, deterministic=torch.are_deterministic_algorithms_enabled(),
        )
    else:
        kwargs = {"epilogue": _ext.get().ce_rows_backward_} if backend == "cpp" else {}
        dx, dw, db = ref.backward(x, w, bias, rows, tgt, class_weight, lse_v, a, b, c, softcap, **kwargs)
    return dx, dw, (db if db is not None else db_empty)


@linear_ce_backward.register_fake
def _(x, w, bias, target, class_weight, lse, grad_loss, grad_lse, ignore_index, label_smoothing,
      z_loss, softcap, grad_filter, backend):
    return torch.empty_like(x), torch.empty_like(w), w.new_empty(w.shape[0] if bias is not None else 0)


def _setup_context(ctx, inputs, output):
    x, w, bias, target, class_weight, *options = inputs
    ctx.options = options
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w, bias, target, class_weight, output[1])


def _backward(ctx, grad_loss, grad_lse):
    x, w, bias, target, class_weight, lse = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, softcap, grad_filter, backend = ctx.options
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    dx, dw, db = linear_ce_backward(x, w, bias, target, class_weight, lse, grad_loss, grad_lse,
                                    ignore_index, label_smoothing, z_loss, softcap, grad_filter, backend)
    return dx, dw, (db if ctx.has_bias else None), None, None, None, None, None, None, None, None


torch.library.register_autograd("nckernels::linear_ce_forward", _backward, setup_context=_setup_context)
