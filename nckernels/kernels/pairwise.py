"""Pairwise Gram reductions over class means (DESIGN.md family 3): Triton kernels.

``pair_stats`` reduces four functions of every unordered pair of class means ``i < j`` to
``(count, mean, M2)`` without ever forming the ``K x K`` matrix:

* one program per upper-triangle tile pair ``(I, J)``, ``J >= I`` (``BLOCK x BLOCK`` pairs; in
  diagonal tiles only ``j > i`` counts), in a grouped order so that concurrent programs share
  their ``M_I`` / ``M_J`` tiles in L2;
* the Gram tile ``G = M_I M_J^T`` comes from ``linear_reduce._logits_tile`` (fp32, ``tl.dot``
  with ``input_precision="ieee"``: no TF32), the squared norms ``n_i = ||m_i||^2`` from a small
  row-norm kernel;
* the epilogue forms ``d2 = n_i + n_j - 2 G_ij`` and ``c_ij = G_ij / sqrt(n_i n_j)`` and reduces
  each quantity over the tile to ``(count, sum, M2 about the tile mean)`` (int32 / fp32), written
  to a ``(tiles, 4)`` partial buffer; the launch helper merges the partials in float64 with
  Chan's formula (vectorised). Extra memory: ``O(K + tiles)`` (plus an fp32 copy of ``means``
  when they are not fp32 already).

Near-coincident pairs. The Gram form cancels catastrophically when ``m_i ~ m_j`` (or
``u_i ~ u_j``): fp32 rounding alone would turn an exact duplicate into a tiny positive ``d2``,
hence a huge CDNV. Pairs with ``d2 <= NEAR * (n_i + n_j)`` or ``1 - c_ij <= NEAR`` are
*near*; a tile that holds any recomputes, for its near pairs only, ``d2 = sum_k (m_ik - m_jk)^2``
and ``t = ||u_i - u_j||^2 = sum_k (m_ik / ||m_i|| - m_jk / ||m_j||)^2`` directly (no
cancellation; about 4x the tile's Gram cost, once). The epilogue carries ``d2`` and ``t`` (far
pairs: ``t = 2 - 2 G_ij / sqrt(n_i n_j)``) and takes ``c_ij = 1 - t / 2``. Exact duplicates then
give ``d2 = 0`` and ``t = 0`` exactly, so they drop out of the CDNV and the log-distance kernel,
as the definition (``d2 > 0``) says. Random or collapsed-but-distinct means have no near pairs
and pay nothing for this.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference.pairwise import NEAR, PAIR_QUANTITIES as QUANTITIES, merge_moments
from .linear_reduce import _interpreted, _logits_tile
GROUP = 8  # row tiles per L2 group in the launch order


@triton.jit
def _row_sq_norms_kernel(M, OUT, K, D, stride_m, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < K
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = M + offs_r.to(tl.int64)[:, None] * stride_m + offs_k[None, :]
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = tl.load(ptrs + k0, mask=mask_r[:, None] & (offs_k[None, :] + k0 < D), other=0.0).to(tl.float32)
        acc += tl.sum(a * a, axis=1)
    tl.store(OUT + offs_r, acc, mask=mask_r)


@triton.jit
def _tile_moments(x, ok):
    """``(count, sum, M2 about the tile mean)`` of ``x`` over the pairs ``ok`` of a tile."""
    cnt = tl.sum(tl.sum(ok.to(tl.int32), axis=1), axis=0)
    s = tl.sum(tl.sum(tl.where(ok, x, 0.0), axis=1), axis=0)
    mean = s / tl.maximum(cnt, 1).to(tl.float32)
    dev = tl.where(ok, x - mean, 0.0)
    return cnt, s, tl.sum(tl.sum(dev * dev, axis=1), axis=0)


@triton.jit
def _store_moments(CNT, SUM, M2, slot, x, ok):
    cnt, s, m2 = _tile_moments(x, ok)
    tl.store(CNT + slot, cnt)
    tl.store(SUM + slot, s)
    tl.store(M2 + slot, m2)


@triton.jit
def _pair_stats_kernel(M, NORM, RNORM, VAR, TI, TJ, CNT, SUM, M2, K, D, stride_m, inv_km1, near,
                       POWER: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_i = tl.load(TI + pid) * BLOCK + tl.arange(0, BLOCK)
    offs_j = tl.load(TJ + pid) * BLOCK + tl.arange(0, BLOCK)
    mask_i = offs_i < K
    mask_j = offs_j < K
    rows_i = offs_i.to(tl.int64)
    rows_j = offs_j.to(tl.int64)
    g = _logits_tile(M, M, M, None, rows_i, rows_j, mask_i, mask_j, D, stride_m, stride_m,
                     False, 0, BLOCK, BLOCK, BLOCK_K, EVEN_K, PRECISION)
    n_i = tl.load(NORM + offs_i, mask=mask_i, other=0.0)
    n_j = tl.load(NORM + offs_j, mask=mask_j, other=0.0)
    r_i = tl.load(RNORM + offs_i, mask=mask_i, other=0.0)
    r_j = tl.load(RNORM + offs_j, mask=mask_j, other=0.0)
    pair = mask_i[:, None] & mask_j[None, :] & (offs_j[None, :] > offs_i[:, None])
    unit = pair & (n_i > 0)[:, None] & (n_j > 0)[None, :]

    # Two live tiles: d2 = ||m_i - m_j||^2 and t = ||u_i - u_j||^2 = 2 - 2c (c = 1 - t / 2).
    d2 = n_i[:, None] + n_j[None, :] - 2.0 * g
    t = 2.0 - 2.0 * (g * r_i[:, None] * r_j[None, :])
    near_pair = pair & ((d2 <= near * (n_i[:, None] + n_j[None, :])) | (unit & (t <= 2.0 * near)))
    if tl.max(tl.max(near_pair.to(tl.int32), axis=1), axis=0) > 0:
        # Rare: recompute the near pairs' distances directly (see the module docstring).
        # Accumulated in place (no extra tiles live); far pairs add 0.
        d2 = tl.where(near_pair, 0.0, d2)
        t = tl.where(near_pair, 0.0, t)
        for k in range(0, D):
            a = tl.load(M + rows_i * stride_m + k, mask=mask_i, other=0.0).to(tl.float32)
            b = tl.load(M + rows_j * stride_m + k, mask=mask_j, other=0.0).to(tl.float32)
            diff = tl.where(near_pair, a[:, None] - b[None, :], 0.0)
            d2 += diff * diff
            diff = tl.where(near_pair, (a * r_i)[:, None] - (b * r_j)[None, :], 0.0)
            t += diff * diff
    c = 1.0 - 0.5 * t

    slot = pid * 4
    # 0: CDNV (v_i + v_j) / (2 d2^p) over the pairs with d2 > 0
    v_i = tl.load(VAR + offs_i, mask=mask_i, other=0.0)
    v_j = tl.load(VAR + offs_j, mask=mask_j, other=0.0)
    ok = pair & (d2 > 0)
    den = tl.where(ok, d2, 1.0)
    x = (v_i[:, None] + v_j[None, :]) / (2.0 * den)
    if POWER == 2:
        x = x / den
    _store_moments(CNT, SUM, M2, slot, x, ok)
    # 1: cosine, 2: |cos + 1/(K-1)| over the pairs of nonzero means
    _store_moments(CNT, SUM, M2, slot + 1, c, unit)
    _store_moments(CNT, SUM, M2, slot + 2, tl.abs(c + inv_km1), unit)
    # 3: log(1 / ||u_i - u_j||) = -log(||u_i - u_j||^2) / 2 over the pairs with ||u_i - u_j|| > 0
    ok = unit & (t > 0)
    x = -0.5 * tl.log(tl.where(ok, t, 1.0))
    _store_moments(CNT, SUM, M2, slot + 3, x, ok)


# ----------------------------------------------------------------------------- launch helpers

def _tiles(m: torch.Tensor) -> dict:
    """Block shapes for this device (``NCKERNELS_PAIR_TILES=block,block_k,warps,stages`` overrides them)."""
    override = os.environ.get("NCKERNELS_PAIR_TILES")
    if override:
        b, k, w, s = (int(t) for t in override.split(","))
        return dict(BLOCK=b, BLOCK_K=k, num_warps=w, num_stages=s)
    if _interpreted() or m.device.type != "cuda":
        return dict(BLOCK=32, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK=128, BLOCK_K=16, num_warps=8, num_stages=3)


def _tile_pairs(T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangle tile pairs ``(I, J)``, ``J >= I``, grouped: ``GROUP`` consecutive row tiles sweep
    the column tiles together, so the programs in flight share few tiles (L2 reuse)."""
    ti, tj = torch.triu_indices(T, T, device=device)
    order = torch.argsort(((ti // GROUP) * T + tj) * GROUP + ti % GROUP)
    return ti[order].to(torch.int32).contiguous(), tj[order].to(torch.int32).contiguous()


def row_sq_norms(m: torch.Tensor) -> torch.Tensor:
    """fp32 ``||m_i||^2`` of the rows of a row-major ``(K, D)`` matrix, no ``K x D`` temporary."""
    K, D = m.shape
    out = torch.empty(K, dtype=torch.float32, device=m.device)
    if K:
        _row_sq_norms_kernel[(triton.cdiv(K, 64),)](m, out, K, D, m.stride(0), BLOCK_R=64, BLOCK_K=32)
    return out


def pair_stats(means: torch.Tensor, variances: torch.Tensor, cdnv_power: int) -> torch.Tensor:
    """Moments of pairwise class-mean statistics over the unordered pairs ``i < j``.

    ``means`` ``(K, D)``: class means already centred by the caller (any float dtype; computed in
    fp32, Gram products with TF32 off); ``variances`` ``(K,)``: per-class ``sigma_c^2``;
    ``cdnv_power`` 1 or 2. Returns float64 ``(4, 3)``: row ``q`` of ``QUANTITIES`` is
    ``(count, mean, M2)`` of

    0. ``cdnv``: ``(v_i + v_j) / (2 d2^p)``, ``d2 = ||m_i - m_j||^2``, pairs with ``d2 > 0``;
    1. ``cos``: ``c_ij = <m_i, m_j> / (||m_i|| ||m_j||)``, pairs with both norms nonzero;
    2. ``max_angle``: ``|c_ij + 1/(K-1)|``, the same pairs;
    3. ``log_inv_dist``: ``-log(||u_i - u_j||^2) / 2`` (``u = m / ||m||``), pairs with both norms
       nonzero and ``u_i != u_j``.

    ``M2`` is the sum of squared deviations from the mean (variance = M2 / count). A quantity
    with no counted pair (K < 2, say) has ``(0, 0, 0)``.
    """
    if means.dim() != 2 or variances.shape != (means.shape[0],):
        raise ValueError(f"pair_stats: means must be (K, D) and variances (K,), got {tuple(means.shape)} "
                         f"and {tuple(variances.shape)}")
    if cdnv_power not in (1, 2):
        raise ValueError(f"pair_stats: cdnv_power must be 1 or 2, got {cdnv_power!r}")
    K, D = means.shape
    if K < 2:
        return torch.zeros(4, 3, dtype=torch.float64, device=means.device)
    m = means.to(torch.float32)
    m = m if m.stride(-1) == 1 or D <= 1 else m.contiguous()
    var = variances.to(torch.float32).contiguous()
    norms = row_sq_norms(m)
    rnorm = torch.where(norms > 0, 1.0 / norms.sqrt(), 0.0)  # correctly rounded: exact for 2^k-scaled rows
    cfg = _tiles(m)
    ti, tj = _tile_pairs(triton.cdiv(K, cfg["BLOCK"]), m.device)
    P = ti.numel()
    cnt = torch.empty((P, 4), dtype=torch.int32, device=m.device)
    s = torch.empty((P, 4), dtype=torch.float32, device=m.device)
    m2 = torch.empty((P, 4), dtype=torch.float32, device=m.device)
    _pair_stats_kernel[(P,)](
        m, norms, rnorm, var, ti, tj, cnt, s, m2, K, D, m.stride(0), 1.0 / (K - 1), NEAR,
        POWER=int(cdnv_power), EVEN_K=D % cfg["BLOCK_K"] == 0, PRECISION="ieee", **cfg,
    )
    return merge_moments(cnt, s, m2)
