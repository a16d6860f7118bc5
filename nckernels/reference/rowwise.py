"""Row-wise ops on explicit logits in PyTorch: softmax family, StableMax, their statistics.

StableMax (Prieto et al. 2025): ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` below;
``StableMax(x)_i = s(x_i) / sum_j s(x_j)``. Its cross-entropy is computed as
``log1p(S_other / s_y)`` with ``S_other = sum_{j != y} s(x_j)``, which stays accurate on
confident rows where ``-log(s_y / S)`` loses everything to rounding. The gradient of
StableMax CE is ``(p_j - [j = y]) / (1 + |x_j|)``; for (log-)StableMax it is the softmax
family's formula times ``1 / (1 + |x|)``.

Every function takes a row-major ``(R, C)`` matrix and reduces over its last dimension.
"""
from __future__ import annotations

import torch

from .linear_cross_entropy import _row_chunks, chunk_bytes, map_row_chunks, rows_backward_, rows_forward


def stablemax_s(x):
    """``s(x)``; the ``1 / (1 - x)`` branch is never evaluated at ``x >= 1`` (no inf, no NaN grad)."""
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))


def normalize(x, log: bool, stable: bool):
    xf = x.float()
    if stable:
        s = stablemax_s(xf)
        total = s.sum(-1, keepdim=True)
        y = s.log() - total.log() if log else s / total
    else:
        y = torch.log_softmax(xf, -1) if log else torch.softmax(xf, -1)
    return y.to(x.dtype)


def normalize_backward(x, y, dy, log: bool, stable: bool):
    yf, dyf = y.float(), dy.float()
    if log:
        dx = dyf - yf.exp() * dyf.sum(-1, keepdim=True)
    else:
        dx = yf * (dyf - (dyf * yf).sum(-1, keepdim=True))
    if stable:
        dx = dx / (1 + x.float().abs())
    return dx.to(y.dtype)


def softmax_stats(x, rows, target, class_weight, label_smoothing, softcap):
    """``(lse_hi, lse_lo, z'_target, sum_j omega_j z'_j)`` of the rows ``x[rows]`` (fp32), in row chunks."""
    return map_row_chunks(rows.numel(), x.shape[1], x.device, None, lambda lo, hi: rows_forward(
        x[rows[lo:hi]].float(), target[lo:hi], class_weight, label_smoothing, softcap))


def stablemax_stats(x, rows, target):
    """``(s(x_y), sum_{j != y} s(x_j))`` of the rows ``x[rows]`` (fp32), in row chunks."""
    return map_row_chunks(rows.numel(), x.shape[1], x.device, None,
                          lambda lo, hi: stablemax_rows_forward(x[rows[lo:hi]].float(), target[lo:hi]))


def stablemax_rows_forward(z, target, class_weight=None, label_smoothing=0.0, softcap=0.0):
    """Chunk epilogue of the linear op: ``(s(z_y), sum_{j != y} s(z_j))`` of fp32 logits ``z``."""
    s = stablemax_s(z)
    return s.gather(1, target[:, None]).squeeze(1), s.scatter_(1, target[:, None], 0.0).sum(-1)


def stablemax_rows_backward_(z, target, class_weight, norm, norm_lo, coef_p, coef_t, coef_u=None, softcap=0.0):
    """Overwrite fp32 logits ``z`` with ``(a s(z) / S - b [j = y]) / (1 + |z|)`` (``norm = S``; the other
    arguments mirror :func:`rows_backward_` and are unused)."""
    inv = 1 / (1 + z.abs())
    z.copy_(stablemax_s(z)).div_(norm[:, None]).mul_(coef_p[:, None])
    z.scatter_add_(1, target[:, None], -coef_t[:, None])
    return z.mul_(inv)


def dlogits(x, target, class_weight, norm, norm_lo, coef_p, coef_t, coef_u, softcap, ignore_index, stable):
    """``dL/dx`` for every row (``norm (+ norm_lo)``: the LSE as an fp32 pair, or ``S`` for StableMax),
    in row chunks of at most :func:`chunk_bytes` of fp32 temporaries; ignored rows get 0."""
    active_rows = (target != ignore_index).nonzero().squeeze(1)
    dx = torch.zeros_like(x)
    for lo, hi in _row_chunks(active_rows.numel(), x.shape[1], chunk_bytes()):
        rows = active_rows[lo:hi]
        z, tgt = x[rows].float(), target[rows]
        if stable:
            dz = stablemax_rows_backward_(z, tgt, None, norm[rows], None, coef_p[rows], coef_t[rows])
        else:
            dz = rows_backward_(z, tgt.clamp(min=0), class_weight, norm[rows], norm_lo[rows], coef_p[rows],
                                coef_t[rows] * (tgt >= 0), coef_u[rows], softcap)
        dx[rows] = dz.to(x.dtype)
    return dx
