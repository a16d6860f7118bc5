"""Naive float64 oracles of the row-wise ops on explicit logits: plain torch, no nckernels code.

The companions of ``oracle.py`` (linear cross-entropy) for ``softmax``, ``log_softmax``,
``logsumexp``, ``cross_entropy``, the StableMax family and ``softmax_collapse``. Every oracle
upcasts its inputs to float64 and is written for clarity; gradients come from autograd
through it (the tests pass float64 leaf copies of the inputs). Class dim conventions follow
PyTorch: ``dim`` for the softmax family, dim 1 (dim 0 for 1-D input) for the losses.

StableMax (Prieto et al. 2025): ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` below,
``StableMax(x)_i = s(x_i) / sum_j s(x_j)``; its cross-entropy is ``-log StableMax(x)_y``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


# ----------------------------------------------------------------------------- softmax family


def softmax_oracle(x: Tensor, dim: int = -1) -> Tensor:
    x = x.double()
    if x.numel() == 0:  # amax refuses an empty reduction; the softmax of nothing is nothing
        return x.clone()
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def log_softmax_oracle(x: Tensor, dim: int = -1) -> Tensor:
    x = x.double()
    return x - torch.logsumexp(x, dim, keepdim=True)


def logsumexp_oracle(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    return torch.logsumexp(x.double(), dim, keepdim=keepdim)


# ----------------------------------------------------------------------------- StableMax


def stablemax_s_oracle(x: Tensor) -> Tensor:
    """``s(x)`` in float64; the ``1 / (1 - x)`` branch only sees ``x <= 0`` (so autograd has no
    ``inf * 0`` at ``x = 1``)."""
    x = x.double()
    return torch.where(x >= 0, x + 1, 1 / (1 - torch.clamp(x, max=0)))


def stablemax_oracle(x: Tensor, dim: int = -1) -> Tensor:
    s = stablemax_s_oracle(x)
    return s / s.sum(dim, keepdim=True)


def log_stablemax_oracle(x: Tensor, dim: int = -1) -> Tensor:
    s = stablemax_s_oracle(x)
    return torch.log(s) - torch.log(s.sum(dim, keepdim=True))


# ----------------------------------------------------------------------------- losses


def _class_last(input: Tensor, target: Tensor):
    """``(N, C, d...)`` (or ``(C,)``) logits -> float64 ``(R, C)`` rows; targets -> ``(R,)`` int64."""
    x = input.double()
    if x.dim() == 1:
        return x.unsqueeze(0), target.long().reshape(1), target.shape
    C = x.shape[1]
    return x.movedim(1, -1).reshape(-1, C), target.long().reshape(-1), target.shape


def _reduce(loss: Tensor, w_y: Tensor, valid: Tensor, reduction: str, shape):
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)
    loss = torch.where(valid, loss, zero)
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / torch.where(valid, w_y, zero).sum()  # 0 / 0 = NaN when all are ignored
    raise ValueError(reduction)


def cross_entropy_oracle(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """Float64 softmax cross-entropy with class-index targets, as ``F.cross_entropy`` plus the extras.

    ``z' = c tanh(z / c)`` when soft-capped, ``lse = logsumexp(z')``, class weights ``w`` (ones
    when absent), smoothing ``eps``, per non-ignored row::

        loss = (1 - eps) w_y (lse - z'_y) + eps / C sum_j w_j (lse - z'_j) + z_loss w_y lse^2

    ignored rows contribute 0; ``mean`` divides by ``sum w_y`` over the non-ignored rows.
    """
    z, t, shape = _class_last(input, target)
    C = z.shape[1]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, -1)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    if bool(((safe < 0) | (safe >= C)).any()):
        raise ValueError("oracle: target out of range")
    w = weight.double().to(z.device) if weight is not None else torch.ones(C, dtype=torch.float64, device=z.device)
    w_y = w[safe]
    z_y = z.gather(1, safe[:, None]).squeeze(1)
    eps = label_smoothing
    loss = (1 - eps) * w_y * (lse - z_y)
    if eps:
        loss = loss + eps / C * ((lse[:, None] - z) * w).sum(-1)
    if z_loss:
        loss = loss + z_loss * w_y * lse * lse
    return _reduce(loss, w_y, valid, reduction, shape)


def stablemax_cross_entropy_oracle(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Float64 ``w_y * -log(s(x_y) / sum_j s(x_j))``, reduced like ``F.cross_entropy``.

    Written as ``log S - log s_y`` (not the log1p form of the implementation): in float64 the
    cancellation costs ~1e-16 * log(S) absolute, far below fp32 resolution of the loss even for
    a target logit of 1e8 (loss ~1e-7)."""
    z, t, shape = _class_last(input, target)
    C = z.shape[1]
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    if bool(((safe < 0) | (safe >= C)).any()):
        raise ValueError("oracle: target out of range")
    s = stablemax_s_oracle(z)
    loss = torch.log(s.sum(-1)) - torch.log(s.gather(1, safe[:, None]).squeeze(1))
    w = weight.double().to(z.device) if weight is not None else torch.ones(C, dtype=torch.float64, device=z.device)
    w_y = w[safe]
    return _reduce(w_y * loss, w_y, valid, reduction, shape)


def stablemax_cross_entropy_grad_formula(x: Tensor, target: Tensor) -> Tensor:
    """The hand-derived per-row gradient of unweighted, unreduced StableMax CE, float64:
    ``dL_i/dx_ij = (p_ij - [j = y_i]) / (1 + |x_ij|)`` (since ``s'(x) / s(x) = 1 / (1 + |x|)``)."""
    x = x.double()
    s = torch.where(x >= 0, x + 1, 1 / (1 - torch.clamp(x, max=0)))
    p = s / s.sum(-1, keepdim=True)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(x.shape[0]), target.long()] = 1.0
    return (p - onehot) / (1 + x.abs())


def linear_stablemax_cross_entropy_oracle(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    shift: bool = False,
) -> Tensor:
    """Explicit float64 ``stablemax_cross_entropy(input @ W^T + b, target)``; with ``shift``,
    ``input[..., t, :]`` predicts ``target[..., t + 1]`` (unreduced shape ``target.shape[:-1] + (T-1,)``)."""
    x = input.double()
    t = target.long()
    if shift:
        x, t = x[..., :-1, :], t[..., 1:]
    z = x @ linear_weight.double().T
    if linear_bias is not None:
        z = z + linear_bias.double()
    out_shape = t.shape
    V = z.shape[-1]
    loss = stablemax_cross_entropy_oracle(z.reshape(-1, V), t.reshape(-1), weight, ignore_index, reduction)
    return loss.reshape(out_shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------- Softmax Collapse


def softmax_collapse_oracle(logits: Tensor, target: Optional[Tensor] = None, ignore_index: int = -100):
    """``(sc_fraction, zero_loss_fraction or None)`` computed directly, as Python floats.

    A row has collapsed when ``sum_j exp(z_j - max z)`` (float64, then rounded to the logits'
    dtype) is exactly 1; its loss is zero when ``logsumexp(z) - z_y`` rounded to the logits' dtype
    is exactly 0. The tests build rows far from both rounding boundaries, so that the float64
    sum and an fp32-accumulated one round alike."""
    dt = logits.dtype
    z = logits.double().reshape(-1, logits.shape[-1])
    m = z.amax(-1, keepdim=True)
    sumexp = torch.exp(z - m).sum(-1)
    collapsed = sumexp.to(dt) == 1
    sc = collapsed.double().mean().item() if z.shape[0] else float("nan")
    if target is None:
        return sc, None
    t = target.reshape(-1).long()
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    # m + log(sumexp) - z_y: for a collapsed row whose target is the max this is exactly 0
    loss = (m.squeeze(1) + torch.log(sumexp) - z.gather(1, safe[:, None]).squeeze(1)).to(dt)
    n_valid = int(valid.sum())
    zero = float(((loss == 0) & valid).sum()) / n_valid if n_valid else float("nan")
    return sc, zero


# ----------------------------------------------------------------------------- comparison helpers


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str, *, scale: Optional[float] = None):
    """``|actual - expected| <= tol * (max|expected| + |expected|)`` elementwise (``max`` over the
    finite oracle values, or ``scale`` when given); NaN, +inf and -inf must sit exactly where the
    oracle has them."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        diff = (nan_a != nan_e).nonzero().tolist()
        raise AssertionError(
            f"{what}: NaN positions differ at {len(diff)} places, e.g. "
            + ", ".join(f"{tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}" for i in diff[:6]))
    inf_e = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf_e) and torch.equal(a[inf_e], e[inf_e]), (
        f"{what}: infinities differ: got {a[torch.isinf(a) | inf_e].tolist()[:8]}, "
        f"expected {e[torch.isinf(a) | inf_e].tolist()[:8]}")
    finite = torch.isfinite(e)
    if scale is None:
        scale = e[finite].abs().max().item() if bool(finite.any()) else 0.0
    ok = ((a - e).abs() <= tol * (scale + e.abs())) | ~finite
    if not bool(ok.all()):
        idx = tuple((~ok).nonzero()[0].tolist()) if a.dim() else ()
        raise AssertionError(
            f"{what} (tol {tol}, scale {scale:.3g}): {int((~ok).sum())}/{ok.numel()} mismatched; first at {idx}: "
            f"got {a[idx].item()!r}, expected {e[idx].item()!r}; max abs diff "
            f"{(a - e)[finite].abs().max().item():.3g}")
