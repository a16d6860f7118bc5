"""Custom ops on explicit logits: the softmax family, logsumexp, cross-entropy, StableMax CE.

All take a row-major ``(R, C)`` matrix (``functional.py`` moves the reduced dim last).
Cross-entropy shares its per-token loss and gradient coefficients with the linear op
(``reference/linear_cross_entropy.py``); the backward of logsumexp, cross-entropy and StableMax
CE is one ``dlogits`` pass: ``dL/dz_j = (a p_j - b [j = y] - c omega_j) t'(z_j)``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ..reference import linear_cross_entropy as lce_ref
from ..reference import rowwise as ref
from .linear_cross_entropy import _class_terms, _valid_rows


def _triton():
    from ..kernels import rowwise as k

    def softmax_stats(x, rows, tgt, cw, ls, softcap):
        m, l, zt, zs = k.row_stats(x, rows, tgt, cw, ls, softcap, stable=False)
        return lce_ref.split_lse(torch.where(m.isinf(), 0.0, m), torch.log(l)) + (zt, zs)

    def stablemax_stats(x, rows, tgt):
        s_t, s_other, _, _ = k.row_stats(x, rows, tgt, None, 0.0, 0.0, stable=True)
        return s_t, s_other

    return SimpleNamespace(normalize=k.normalize, normalize_backward=k.normalize_backward,
                           softmax_stats=softmax_stats, stablemax_stats=stablemax_stats, dlogits=k.dlogits_rows)


def _cpp():
    C = _ext.get()

    def softmax_stats(x, rows, tgt, cw, ls, softcap):
        return C.ce_rows_forward(x[rows].float().contiguous(), tgt, cw, ls, softcap)

    def stablemax_stats(x, rows, tgt):
        return C.stablemax_rows_forward(x[rows].float().contiguous(), tgt)

    def dlogits(x, target, cw, norm, norm_lo, cp, ct, cu, softcap, ignore_index, stable):
        active = target != ignore_index
        rows = active.nonzero().squeeze(1)
        z, tgt = x[rows].float().contiguous(), target[rows]
        if stable:
            dz = C.stablemax_rows_backward_(z, tgt, norm[rows], cp[rows], ct[rows])
        else:
            dz = C.ce_rows_backward_(z, tgt.clamp(min=0), cw, norm[rows], norm_lo[rows], cp[rows],
                                     ct[rows] * (tgt >= 0), cu[rows], softcap)
        dx = torch.zeros_like(x)
        dx[rows] = dz.to(x.dtype)
        return dx

    return SimpleNamespace(normalize=ref.normalize, normalize_backward=ref.normalize_backward,
                           softmax_stats=softmax_stats, stablemax_stats=stablemax_stats, dlogits=dlogits)


def _impl(backend: str):
    if backend == "triton":
        return _triton()
    if backend == "cpp":
        return _cpp()
    return ref


# ----------------------------------------------------------------------------- softmax family

@torch.library.custom_op("nckernels::normalize", mutates_args=())
def normalize(x: Tensor, log: bool, stable: bool, backend: str) -> Tensor:
    """Softmax (``log``: log-softmax; ``stable``: StableMax) over the last dim of ``x``."""
    return _impl(backend).normalize(x, log, stable)


@normalize.register_fake
def _(x, log, stable, backend):
    return torch.empty_like(x)


@torch.library.custom_op("nckernels::normalize_backward", mutates_args=())
def normalize_backward(x: Tensor, y: Tensor, dy: Tensor, log: bool, stable: bool, backend: str) -> Tensor:
    return _impl(backend).normalize_backward(x, y, dy.contiguous(), log, stable)


@normalize_backward.register_fake
def _(x, y, dy, log, stable, backend):
    return torch.empty_like(y)


def _normalize_setup(ctx, inputs, output):
    x, ctx.log, ctx.stable, ctx.backend = inputs
    ctx.save_for_backward(x if ctx.stable else None, output)


def _normalize_grad(ctx, dy):
    x, y = ctx.saved_tensors
    return normalize_backward(x if x is not None else y, y, dy, ctx.log, ctx.stable, ctx.backend), None, None, None


torch.library.register_autograd("nckernels::normalize", _normalize_grad, setup_context=_normalize_setup)


# ----------------------------------------------------------------------------- dL/dz (shared backward)

@torch.library.custom_op("nckernels::row_dlogits", mutates_args=())
def row_dlogits(x: Tensor, target: Tensor, class_weight: Optional[Tensor], norm: Tensor, norm_lo: Tensor,
                coef_p: Tensor, coef_t: Tensor, coef_u: Tensor, softcap: float, ignore_index: int, stable: bool,
                backend: str) -> Tensor:
    return _impl(backend).dlogits(x, target, class_weight, norm, norm_lo, coef_p, coef_t, coef_u, softcap,
                                  ignore_index, stable)


@row_dlogits.register_fake
def _(x, target, class_weight, norm, norm_lo, coef_p, coef_t, coef_u, softcap, ignore_index, stable, backend):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- raw statistics

def row_softmax_stats(x: Tensor, target: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per row ``(max, sum_j exp(x_j - max), x_target)`` in fp32, no autograd (diagnostics)."""
    rows = torch.arange(x.shape[0], device=x.device)
    if backend == "triton":
        from ..kernels import rowwise as k

        m, sumexp, z_t, _ = k.row_stats(x, rows, target, None, 0.0, 0.0, stable=False)
        return m, sumexp, z_t
    xf = x.float()
    m = xf.max(-1).values
    sumexp = torch.exp(xf - torch.where(m.isinf(), 0.0, m)[:, None]).sum(-1)
    return m, sumexp, xf.gather(1, target[:, None]).squeeze(1)


# ----------------------------------------------------------------------------- logsumexp

@torch.library.custom_op("nckernels::logsumexp", mutates_args=())
def logsumexp(x: Tensor, backend: str) -> Tensor:
    """fp32 ``log sum_j exp x_j`` of each row."""
    rows = torch.arange(x.shape[0], device=x.device)
    return _impl(backend).softmax_stats(x, rows, torch.zeros_like(rows), None, 0.0, 0.0)[0]


@logsumexp.register_fake
def _(x, backend):
    return x.new_empty(x.shape[0], dtype=torch.float32)


def _lse_setup(ctx, inputs, output):
    x, ctx.backend = inputs
    ctx.save_for_backward(x, output)


def _lse_grad(ctx, dy):
    x, lse = ctx.saved_tensors
    zeros = torch.zeros_like(lse)
    never = torch.full(lse.shape, -1, dtype=torch.long, device=x.device)  # no target column
    return row_dlogits(x, never, None, lse, zeros, dy.float().contiguous(), zeros, zeros, 0.0, -2, False,
                       ctx.backend), None


torch.library.register_autograd("nckernels::logsumexp", _lse_grad, setup_context=_lse_setup)


# ----------------------------------------------------------------------------- cross-entropy

@torch.library.custom_op("nckernels::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(x: Tensor, target: Tensor, class_weight: Optional[Tensor], ignore_index: int,
                          label_smoothing: float, z_loss: float, softcap: float, backend: str
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss and LSE as an fp32 pair ``(lse, lse_lo)`` (0 at ignored rows) of softmax
    cross-entropy on logits ``x``; the loss is ``(lse - z_y) + lse_lo``, exact far below ``ulp(lse)``."""
    R, C = x.shape
    rows, tgt = _valid_rows(target, ignore_index, C)
    loss = torch.zeros(R, dtype=torch.float32, device=x.device)
    lse = torch.zeros(R, dtype=torch.float32, device=x.device)
    lse_lo = torch.zeros(R, dtype=torch.float32, device=x.device)
    if rows.numel():
        hi, lo, z_t, z_s = _impl(backend).softmax_stats(x, rows, tgt, class_weight, label_smoothing, softcap)
        omega_t, total = _class_terms(class_weight, tgt, C)
        loss[rows] = lce_ref.token_loss(hi, z_t, z_s, omega_t, total, label_smoothing, z_loss, C, lse_lo=lo)
        lse[rows], lse_lo[rows] = hi, lo
    return loss, lse, lse_lo


@cross_entropy_forward.register_fake
def _(x, target, class_weight, ignore_index, label_smoothing, z_loss, softcap, backend):
    return tuple(x.new_empty(x.shape[0], dtype=torch.float32) for _ in range(3))


def _ce_setup(ctx, inputs, output):
    x, target, class_weight, *ctx.options = inputs
    ctx.save_for_backward(x, target, class_weight, output[1], output[2])


def _ce_grad(ctx, grad_loss, grad_lse, _):
    x, target, class_weight, lse, lse_lo = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, softcap, backend = ctx.options
    C = x.shape[1]
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.float()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float()
    valid = target != ignore_index
    safe_t = torch.where(valid, target, 0)
    omega_t, total = _class_terms(class_weight, safe_t, C)
    a, b, c = lce_ref.grad_coefficients(grad_loss, grad_lse, lse, omega_t, total, label_smoothing, z_loss, C)
    norm = torch.where(lse.isinf(), float("nan"), lse)  # a row with an infinite logit: all-NaN gradient, as in torch
    dx = row_dlogits(x, target, class_weight, norm, lse_lo, a.contiguous(), b.contiguous(), c.contiguous(),
                     softcap, ignore_index, False, backend)
    return dx, None, None, None, None, None, None, None


torch.library.register_autograd("nckernels::cross_entropy_forward", _ce_grad, setup_context=_ce_setup)


# ----------------------------------------------------------------------------- StableMax cross-entropy

@torch.library.custom_op("nckernels::stablemax_ce_forward", mutates_args=())
def stablemax_ce_forward(x: Tensor, target: Tensor, class_weight: Optional[Tensor], ignore_index: int,
                         backend: str) -> tuple[Tensor, Tensor]:
    """Per-row loss ``omega_y log1p(S_other / s_y)`` and ``S = sum_j s(x_j)`` (fp32; 0 at ignored rows)."""
    R, C = x.shape
    rows, tgt = _valid_rows(target, ignore_index, C)
    loss = torch.zeros(R, dtype=torch.float32, device=x.device)
    total = torch.zeros(R, dtype=torch.float32, device=x.device)
    if rows.numel():
        s_t, s_other = _impl(backend).stablemax_stats(x, rows, tgt)
        omega_t, _ = _class_terms(class_weight, tgt, C)
        loss[rows] = omega_t * torch.log1p(s_other / s_t)
        total[rows] = s_other + s_t
    return loss, total


@stablemax_ce_forward.register_fake
def _(x, target, class_weight, ignore_index, backend):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


def _smce_setup(ctx, inputs, output):
    x, target, class_weight, ctx.ignore_index, ctx.backend = inputs
    ctx.save_for_backward(x, target, class_weight, output[1])


def _smce_grad(ctx, grad_loss, grad_total):
    x, target, class_weight, total = ctx.saved_tensors
    valid = target != ctx.ignore_index
    omega_t, _ = _class_terms(class_weight, torch.where(valid, target, 0), x.shape[1])
    coef = (grad_loss.float() * omega_t * valid).contiguous()
    norm = torch.where(valid, total, 1.0).contiguous()
    zeros = torch.zeros_like(coef)
    dx = row_dlogits(x, target, None, norm, zeros, coef, coef, zeros, 0.0, ctx.ignore_index, True, ctx.backend)
    return dx, None, None, None, None


torch.library.register_autograd("nckernels::stablemax_ce_forward", _smce_grad, setup_context=_smce_setup)
