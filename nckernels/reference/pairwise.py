"""Statistics over all pairs of class means (DESIGN family 3): the executable spec, in float64.

For centred class means ``m_i`` (``K x D``), per-class variances ``v_i`` and every unordered pair
``i < j`` (the diagonal never counts), with ``n_i = ||m_i||^2``, ``G_ij = m_i . m_j``,
``d2_ij = ||m_i - m_j||^2`` and ``c_ij = 1 - ||u_i - u_j||^2 / 2 = G_ij / sqrt(n_i n_j)`` (``u = m / ||m||``):

====  ================  ===========================================  ==========================
row   name              value                                        pairs counted
====  ================  ===========================================  ==========================
0     ``cdnv``          ``(v_i + v_j) / (2 d2_ij ** p)``             ``d2_ij > 0``
1     ``cos``           ``c_ij``                                     ``n_i > 0 and n_j > 0``
2     ``max_angle``     ``|c_ij + 1 / (K - 1)|``                     as ``cos``
3     ``log_inv_dist``  ``log(1 / ||u_i - u_j||) = -log(2 - 2 c_ij) / 2``  as ``cos`` and ``c_ij < 1``
====  ================  ===========================================  ==========================

:func:`pair_stats` returns, per row, ``(count, mean, M2)`` with
``M2 = sum (x - mean)^2``; a quantity with no counted pair has ``(0, 0, 0)``. Duplicate means
are excluded, never infinite: ``d2`` and ``||u_i - u_j||^2`` come from the Gram form except for near
pairs (``d2 <= NEAR (n_i + n_j)`` or ``||u_i - u_j||^2 <= 2 NEAR``), where the Gram form cancels and
they are recomputed as sums of squared differences (as the Triton kernel does). The ``K x K``
matrix never exists: rows are processed in blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .linear_cross_entropy import chunk_bytes

PAIR_QUANTITIES = ("cdnv", "cos", "max_angle", "log_inv_dist")
NEAR = 2.0**-10  # pairs closer than this (relatively) get their distances recomputed without cancellation


def merge_moments(cnt: Tensor, s: Tensor, m2: Tensor) -> Tensor:
    """Chan's merge of per-part ``(count, sum, M2 about the part mean)`` along dim 0 -> float64
    ``(..., 3)`` rows ``(count, mean, M2)``; empty parts are ignored, an empty total gives ``(0, 0, 0)``."""
    cnt, s = cnt.to(torch.float64), s.to(torch.float64)
    n = cnt.sum(0)
    mean = s.sum(0) / n.clamp(min=1)
    m2 = m2.to(torch.float64).sum(0) + (cnt * (s / cnt.clamp(min=1) - mean) ** 2).sum(0)
    return torch.stack([n, mean, m2], dim=-1)


def _distances(m: Tensor, unit: Tensor, sq: Tensor, rows: slice):
    """``d2 = ||m_i - m_j||^2`` and ``t = ||u_i - u_j||^2`` of rows ``rows`` against all rows: the Gram
    form, with near pairs (where it cancels) recomputed as sums of squared differences."""
    gram = m[rows] @ m.T
    d2 = sq[rows].unsqueeze(1) + sq.unsqueeze(0) - 2 * gram
    t = 2 - 2 * (unit[rows] @ unit.T)
    near = (d2 <= NEAR * (sq[rows].unsqueeze(1) + sq.unsqueeze(0))) | (t <= 2 * NEAR)
    i, j = near.nonzero(as_tuple=True)
    d2[i, j] = (m[rows][i] - m[j]).square().sum(1)
    t[i, j] = (unit[rows][i] - unit[j]).square().sum(1)
    return d2, t


def pair_stats(means: Tensor, variances: Tensor, cdnv_power: int) -> Tensor:
    """``(4, 3)`` float64: ``(count, mean, M2)`` of each quantity in :data:`PAIR_QUANTITIES`."""
    m = means.double()
    v = variances.double()
    K = m.shape[0]
    sq = m.square().sum(1)
    norm = sq.sqrt()
    unit = m / norm.where(norm > 0, 1.0).unsqueeze(1)
    offdiag_cos = 1.0 / (K - 1) if K > 1 else 0.0
    step = max(1, chunk_bytes() // (8 * 8 * max(K, 1)))
    parts = []
    for start in range(0, K, step):
        rows = slice(start, min(K, start + step))
        d2, t = _distances(m, unit, sq, rows)
        upper = torch.arange(K, device=m.device).unsqueeze(0) > torch.arange(rows.start, rows.stop, device=m.device).unsqueeze(1)
        nonzero = upper & (norm[rows] > 0).unsqueeze(1) & (norm > 0).unsqueeze(0)
        cos = 1 - t / 2
        values = [(v[rows].unsqueeze(1) + v.unsqueeze(0)) / (2 * d2.where(d2 > 0, 1.0) ** cdnv_power),
                  cos, (cos + offdiag_cos).abs(), -0.5 * t.where(t > 0, 1.0).log()]
        masks = [upper & (d2 > 0), nonzero, nonzero, nonzero & (t > 0)]
        parts.append([_moments(x[mask]) for x, mask in zip(values, masks)])
    if not parts:
        return torch.zeros(len(PAIR_QUANTITIES), 3, dtype=torch.float64, device=m.device)
    stacked = torch.tensor(parts, dtype=torch.float64, device=m.device)  # (chunks, quantities, 3)
    return merge_moments(stacked[..., 0], stacked[..., 1], stacked[..., 2])


def _moments(x: Tensor):
    """``(count, sum, M2 about the mean)`` of a 1-D tensor, as floats."""
    n = x.numel()
    if n == 0:
        return (0.0, 0.0, 0.0)
    return (float(n), float(x.sum()), float((x - x.mean()).square().sum()))
