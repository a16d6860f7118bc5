"""Statistics over all pairs of class means (DESIGN family 3): the executable spec, in float64.

For centred class means ``m_i`` (``K x D``), per-class variances ``v_i`` and every unordered pair
``i < j`` (the diagonal never counts), with ``n_i = ||m_i||^2``, ``G_ij = m_i . m_j``,
``d2_ij = n_i + n_j - 2 G_ij`` and ``c_ij = G_ij / sqrt(n_i n_j)``:

====  ================  ===========================================  ==========================
row   name              value                                        pairs counted
====  ================  ===========================================  ==========================
0     ``cdnv``          ``(v_i + v_j) / (2 d2_ij ** p)``             ``d2_ij > 0``
1     ``cos``           ``c_ij``                                     ``n_i > 0 and n_j > 0``
2     ``max_angle``     ``|c_ij + 1 / (K - 1)|``                     as ``cos``
3     ``log_inv_dist``  ``log(1 / ||u_i - u_j||) = -log(2 - 2 c_ij) / 2``  as ``cos`` and ``c_ij < 1``
====  ================  ===========================================  ==========================

(``u = m / ||m||``). :func:`pair_stats` returns, per row, ``(count, mean, M2)`` with
``M2 = sum (x - mean)^2``; a quantity with no counted pair has ``(0, 0, 0)``. Duplicate means
are excluded, never infinite. The ``K x K`` matrix never exists: rows are processed in blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .linear_cross_entropy import chunk_bytes

PAIR_QUANTITIES = ("cdnv", "cos", "max_angle", "log_inv_dist")


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor, dim: int = 0):
    """Merge partial ``(count, mean, M2)`` along ``dim`` with Chan's formula (float64)."""
    count, mean, m2 = count.double(), mean.double(), m2.double()
    total = count.sum(dim)
    grand = (count * mean).sum(dim) / total.clamp(min=1)
    spread = (count * (mean - grand.unsqueeze(dim)).square()).sum(dim)
    return total, torch.where(total > 0, grand, 0.0), torch.where(total > 0, m2.sum(dim) + spread, 0.0)


def pair_stats(means: Tensor, variances: Tensor, cdnv_power: int) -> Tensor:
    """``(4, 3)`` float64: ``(count, mean, M2)`` of each quantity in :data:`PAIR_QUANTITIES`."""
    m = means.double()
    v = variances.double()
    K = m.shape[0]
    sq = m.square().sum(1)
    offdiag_cos = 1.0 / (K - 1) if K > 1 else 0.0
    step = max(1, chunk_bytes() // (8 * 8 * max(K, 1)))
    parts = []
    for start in range(0, K, step):
        stop = min(K, start + step)
        gram = m[start:stop] @ m.T
        rows = torch.arange(start, stop, device=m.device).unsqueeze(1)
        upper = torch.arange(K, device=m.device).unsqueeze(0) > rows
        sq_i, sq_j = sq[start:stop].unsqueeze(1), sq.unsqueeze(0)
        d2 = sq_i + sq_j - 2 * gram
        nonzero = upper & (sq_i > 0) & (sq_j > 0)
        cos = gram / (sq_i * sq_j).sqrt().where(nonzero, 1.0)
        one_minus = 2 - 2 * cos
        values = [
            (v[start:stop].unsqueeze(1) + v.unsqueeze(0)) / (2 * d2.where(d2 > 0, 1.0) ** cdnv_power),
            cos,
            (cos + offdiag_cos).abs(),
            -0.5 * one_minus.where(one_minus > 0, 1.0).log(),
        ]
        masks = [upper & (d2 > 0), nonzero, nonzero, nonzero & (one_minus > 0)]
        for q, (x, mask) in enumerate(zip(values, masks)):
            x = x[mask]
            n = x.numel()
            mean = x.mean() if n else x.new_zeros(())
            parts.append((q, n, mean, (x - mean).square().sum()))
    out = torch.zeros(len(PAIR_QUANTITIES), 3, dtype=torch.float64, device=m.device)
    for q in range(len(PAIR_QUANTITIES)):
        rows = [p for p in parts if p[0] == q]
        if not rows:
            continue
        count = torch.tensor([float(p[1]) for p in rows], dtype=torch.float64, device=m.device)
        total, mean, m2 = merge_moments(count, torch.stack([p[2] for p in rows]), torch.stack([p[3] for p in rows]))
        out[q] = torch.stack([total, mean, m2])
    return out
