"""``nckernels::linear_ce_forward`` / ``linear_ce_backward``: the linear cross-entropy custom ops.

The forward returns the per-token loss and log-sum-exp, the latter as an fp32 pair ``(lse, lse_lo)``
(``lse_lo``: the rounding residual of ``fl(lse)``; zeros at ignored tokens); the loss
``(lse - z_y) + lse_lo`` and the backward's ``p = exp((z - lse) - lse_lo)`` stay exact on confident
tokens whose loss is far below ``ulp(lse)``. The backward recomputes logits tiles from the saved
pair. Both take flat ``x (M, D)`` and ``target (M,)``; reductions, shapes and argument checks live
in ``functional.py``. The math and the per-token gradient coefficients are in
``reference/linear_cross_entropy.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ..reference import linear_cross_entropy as ref
from ..reference import rowwise as rowwise_ref


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


def _backend_forward(backend: str, stable: bool = False):
    """``f(x, w, bias, rows, tgt, class_weight, label_smoothing, softcap)`` -> row statistics."""
    if backend == "triton":
        from ..kernels import linear_reduce

        return lambda *a: linear_reduce.forward(*a, stable=stable)
    if stable:
        if backend == "cpp":
            C = _ext.get()
            return lambda *a: ref.forward(*a, epilogue=lambda z, t, *_: C.stablemax_rows_forward(z, t))
        return lambda *a: ref.forward(*a, epilogue=rowwise_ref.stablemax_rows_forward)
    if backend == "cpp":
        return lambda *a: ref.forward(*a, epilogue=_ext.get().ce_rows_forward)
    return ref.forward


def _backend_backward(backend: str, stable: bool):
    """``f(x, w, bias, rows, tgt, class_weight, norm, norm_lo, a, b, c, softcap, grad_filter)`` -> (dx, dw, db)."""
    if backend == "triton":
        from ..kernels import linear_reduce

        return lambda *a, grad_filter: linear_reduce.backward(
            *a, grad_filter=grad_filter, deterministic=torch.are_deterministic_algorithms_enabled(), stable=stable)
    if stable:
        if backend == "cpp":
            C = _ext.get()
            epilogue = lambda z, t, cw, norm, lo, a, b, c, sc: C.stablemax_rows_backward_(z, t, norm, a, b)  # noqa: E731
        else:
            epilogue = rowwise_ref.stablemax_rows_backward_
    else:
        epilogue = _ext.get().ce_rows_backward_ if backend == "cpp" else ref.rows_backward_
    return lambda *a, grad_filter: ref.backward(*a, epilogue=epilogue)


@torch.library.custom_op("nckernels::linear_ce_forward", mutates_args=())
def linear_ce_forward(
    x: Tensor, w: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, grad_filter: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(loss, lse, lse_lo)`` (fp32)."""
    M, V = target.shape[0], w.shape[0]
    rows, tgt = _valid_rows(target, ignore_index, V)
    loss, lse, lse_lo = (torch.zeros(M, dtype=torch.float32, device=x.device) for _ in range(3))
    if rows.numel() == 0:
        return loss, lse, lse_lo
    hi, lo, z_target, z_smooth = _backend_forward(backend)(
        x, w, bias, rows, tgt, class_weight, label_smoothing, softcap
    )
    omega_t, smooth_total = _class_terms(class_weight, tgt, V)
    loss[rows] = ref.token_loss(hi, z_target, z_smooth, omega_t, smooth_total, label_smoothing, z_loss, V, lse_lo=lo)
    lse[rows], lse_lo[rows] = hi, lo
    return loss, lse, lse_lo


@linear_ce_forward.register_fake
def _(x, w, bias, target, class_weight, ignore_index, label_smoothing, z_loss, softcap, grad_filter, backend):
    return tuple(x.new_empty(target.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("nckernels::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    x: Tensor, w: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    norm: Tensor, norm_lo: Tensor, grad_loss: Tensor, grad_lse: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float, grad_filter: float, stable: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the softmax (``norm + norm_lo``: LSE) or StableMax (``stable``, ``norm``: ``S``) loss."""
    V = w.shape[0]
    rows, tgt = _valid_rows(target, ignore_index, V)
    db_empty = w.new_zeros(V if bias is not None else 0)
    if rows.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(w), db_empty
    omega_t, smooth_total = _class_terms(class_weight, tgt, V)
    norm_v, g = norm[rows], grad_loss[rows].float()
    if stable:  # L = omega_y log(S / s_y): dL/dz = omega_y (p - onehot) / (1 + |z|)
        a = b = g * omega_t
        c = torch.zeros_like(a)
    else:
        a, b, c = ref.grad_coefficients(g, grad_lse[rows].float(), norm_v, omega_t, smooth_total,
                                        label_smoothing, z_loss, V)
    dx, dw, db = _backend_backward(backend, stable)(x, w, bias, rows, tgt, class_weight, norm_v, norm_lo[rows], a, b,
                                                    c, softcap, grad_filter=grad_filter)
    return dx, dw, (db if db is not None else db_empty)


@linear_ce_backward.register_fake
def _(x, w, bias, target, class_weight, norm, norm_lo, grad_loss, grad_lse, ignore_index, label_smoothing,
      z_loss, softcap, grad_filter, stable, backend):
    return torch.empty_like(x), torch.empty_like(w), w.new_empty(w.shape[0] if bias is not None else 0)


def _setup_context(ctx, inputs, output):
    x, w, bias, target, class_weight, *options = inputs
    ctx.options = options
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w, bias, target, class_weight, output[1], output[2])


def _backward(ctx, grad_loss, grad_lse, _):
    x, w, bias, target, class_weight, lse, lse_lo = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, softcap, grad_filter, backend = ctx.options
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    dx, dw, db = linear_ce_backward(x, w, bias, target, class_weight, lse, lse_lo, grad_loss, grad_lse,
                                    ignore_index, label_smoothing, z_loss, softcap, grad_filter, False, backend)
    return dx, dw, (db if ctx.has_bias else None), None, None, None, None, None, None, None, None


torch.library.register_autograd("nckernels::linear_ce_forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("nckernels::linear_stablemax_ce_forward", mutates_args=())
def linear_stablemax_ce_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], target: Tensor,
                                class_weight: Optional[Tensor], ignore_index: int, backend: str
                                ) -> tuple[Tensor, Tensor]:
    """Per-token StableMax CE ``omega_y log1p(S_other / s_y)`` of ``z = x W^T + b`` and ``S`` (fp32)."""
    M, V = target.shape[0], w.shape[0]
    rows, tgt = _valid_rows(target, ignore_index, V)
    loss = torch.zeros(M, dtype=torch.float32, device=x.device)
    total = torch.zeros(M, dtype=torch.float32, device=x.device)
    if rows.numel():
        s_t, s_other = _backend_forward(backend, stable=True)(x, w, bias, rows, tgt, class_weight, 0.0, 0.0)[:2]
        loss[rows] = _class_terms(class_weight, tgt, V)[0] * torch.log1p(s_other / s_t)
        total[rows] = s_other + s_t
    return loss, total


@linear_stablemax_ce_forward.register_fake
def _(x, w, bias, target, class_weight, ignore_index, backend):
    M = target.shape[0]
    return x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


def _stable_setup(ctx, inputs, output):
    x, w, bias, target, class_weight, ctx.ignore_index, ctx.backend = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w, bias, target, class_weight, output[1])


def _stable_backward(ctx, grad_loss, grad_total):
    x, w, bias, target, class_weight, total = ctx.saved_tensors
    grad_loss = torch.zeros_like(total) if grad_loss is None else grad_loss
    zeros = torch.zeros_like(total)
    dx, dw, db = linear_ce_backward(x, w, bias, target, class_weight, total, zeros, grad_loss, zeros,
                                    ctx.ignore_index, 0.0, 0.0, 0.0, 0.0, True, ctx.backend)
    return dx, dw, (db if ctx.has_bias else None), None, None, None, None


torch.library.register_autograd("nckernels::linear_stablemax_ce_forward", _stable_backward,
                                setup_context=_stable_setup)


@torch.library.custom_op("nckernels::linear_ce_loss_and_grad", mutates_args=())
def linear_ce_loss_and_grad(
    x: Tensor, w: Tensor, bias: Optional[Tensor], target: Tensor, class_weight: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, mean: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked CPU path for the ``mean`` / ``sum`` reductions: the reduced loss and its gradients
    ``(dx, dw, db)`` in one pass (the upstream gradient of each token is known at forward time:
    ``1 / sum_i omega_y_i`` or 1), so the backward only scales them by the incoming gradient."""
    V = w.shape[0]
    rows, tgt = _valid_rows(target, ignore_index, V)
    omega_t, smooth_total = _class_terms(class_weight, tgt, V)
    denom = omega_t.sum() if mean else torch.ones((), device=x.device)
    if rows.numel() == 0:
        loss = torch.zeros((), device=x.device) / denom
        return loss, torch.zeros_like(x), torch.zeros_like(w), w.new_zeros(V if bias is not None else 0)
    kwargs = {}
    if backend == "cpp":
        kwargs = dict(epilogue=_ext.get().ce_rows_forward, backward_epilogue=_ext.get().ce_rows_backward_)
    grad_loss = (1.0 / denom).expand(rows.numel()).float().contiguous()
    (lse, lse_lo, z_target, z_smooth), (dx, dw, db) = ref.forward_backward(
        x, w, bias, rows, tgt, class_weight, label_smoothing, z_loss, softcap, grad_loss, omega_t, smooth_total,
        **kwargs)
    loss = ref.token_loss(lse, z_target, z_smooth, omega_t, smooth_total, label_smoothing, z_loss, V,
                          lse_lo=lse_lo).sum() / denom
    return loss, dx, dw, (db if db is not None else w.new_zeros(0))


@linear_ce_loss_and_grad.register_fake
def _(x, w, bias, target, class_weight, ignore_index, label_smoothing, z_loss, softcap, mean, backend):
    return (x.new_empty((), dtype=torch.float32), torch.empty_like(x), torch.empty_like(w),
            w.new_empty(w.shape[0] if bias is not None else 0))


def _loss_and_grad_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[1:])


def _loss_and_grad_backward(ctx, grad, *_):
    dx, dw, db = ctx.saved_tensors
    return (grad * dx, grad * dw, (grad * db) if ctx.has_bias else None) + (None,) * 8


torch.library.register_autograd("nckernels::linear_ce_loss_and_grad", _loss_and_grad_backward,
                                setup_context=_loss_and_grad_setup)
