"""Row reductions over implicit logits ``z = x W^T + b`` (DESIGN.md family 1): Triton kernels.

No ``N x V`` logits ever reach global memory, not even a chunk: every kernel computes a
``BLOCK_M x BLOCK_V`` tile of logits in registers (``_logits_tile``), applies the logit
transform (soft-capping here), and reduces it on the spot.

* ``forward``: grid ``(row tiles, vocabulary splits)``; each program streams its split's
  vocabulary tiles with an online log-sum-exp and also sums the target logit and the
  class-weighted logit sum (label smoothing). Per-split partials ``(max, sumexp, z_target,
  z_smooth)`` (``4 x splits x N`` floats) are merged on the host: deterministic.
* ``backward``: recomputes each tile, forms ``dL/dz`` from the per-token coefficients
  ``(a, b, c)`` of ``reference.linear_cross_entropy`` (``dL/dz' = a p - b onehot - c omega``),
  then ``dX += dZ W`` and ``dW += dZ^T X``, accumulated in fp32:
  - default: one fused kernel over ``(row tile, vocab tile)`` that atomically adds its
    contributions (fp32 atomics: exact, not bitwise reproducible);
  - ``deterministic=True``: two kernels with exclusive ownership (one program per row tile
    for ``dX``, one per vocabulary tile for ``dW`` and ``db``), fixed summation order,
    bitwise reproducible, at the price of recomputing the logits twice;
  - ``grad_filter=tau`` (opt-in approximation): tiles whose ``|dL/dz|`` are all below
    ``tau`` skip the two gradient products.
  Low-precision weights accumulate ``dW`` in an fp32 buffer of at most ``SLAB_BYTES`` that is
  cast into the gradient slab by slab, so extra memory is ``O(N D + slab)``, never ``O(N V)``.

* ``linear_argmax``: grid ``(row tiles, vocabulary splits)``; each program keeps a running
  ``(max, argmax)`` per row over its split's tiles (``_fold_argmax``: NaN logits never win, ties go
  to the smallest index); per-split partials (``2 x splits x N``) are merged on the host.

Ignored tokens are dropped before launch (``rows`` lists the tokens that count): they cost
no FLOPs.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..reference.margin import NORM_EPS, normalize_backward
from .logit_math import dlogits, fold_stats, lse_fold, margin_logits

SLAB_BYTES = 256 * 2**20


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _logits_tile(X, W, B, RNW, rows, offs_v, mask_m, mask_v, D, stride_x, stride_w,
                 HAS_BIAS: tl.constexpr, MARGIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tile ``z[m, v] = X[rows[m]] . W[offs_v[v]] (+ B[offs_v[v]])``; with ``MARGIN`` the cosines
    ``X[rows[m]] . W[offs_v[v]] * RNW[offs_v[v]]`` (rows of ``X`` normalised, ``RNW`` the centres'
    inverse norms). ``W`` tiles are cast to ``X``'s dtype (fp32 master centres, bf16 embeddings)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_x + offs_k[None, :]
    w_ptrs = W + offs_v[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=mask_v[None, :], other=0.0).to(a.dtype)
        else:
            k_left = D - k * BLOCK_K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(w_ptrs, mask=mask_v[None, :] & (offs_k[:, None] < k_left), other=0.0).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if MARGIN > 0:
        acc *= tl.load(RNW + offs_v, mask=mask_v, other=0.0)[None, :]
    return acc


@triton.jit
def _forward_kernel(X, W, B, RNW, CW, ROWS, TGT, PART, n_rows, V, D, stride_x, stride_w, tiles_per_split, softcap,
                    margin_s, margin_m,
                    HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
                    STABLE: tl.constexpr, MARGIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    rows = tl.load(ROWS + offs_m, mask=mask_m, other=0)
    tgt = tl.load(TGT + offs_m, mask=mask_m, other=0)
    stat0 = tl.zeros((BLOCK_M,), tl.float32) if STABLE else tl.full((BLOCK_M,), float("-inf"), tl.float32)
    stat1 = tl.zeros((BLOCK_M,), tl.float32)
    z_tgt = tl.zeros((BLOCK_M,), tl.float32)
    z_smooth = tl.zeros((BLOCK_M,), tl.float32)
    for t in range(0, tiles_per_split):
        offs_v = (pid_s * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(X, W, B, RNW, rows, offs_v, mask_m, mask_v, D, stride_x, stride_w,
                         HAS_BIAS, MARGIN, BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
        if MARGIN > 0:
            z = margin_logits(z, offs_v, tgt, margin_s, margin_m, MARGIN == 2)[0]
        stat0, stat1, z_tgt, z_smooth = fold_stats(z, offs_v, mask_v, tgt, CW, stat0, stat1, z_tgt, z_smooth,
                                                   softcap, HAS_CW, SOFTCAP, SMOOTH, STABLE)
    out = PART + pid_s * n_rows + offs_m
    plane = n_splits * n_rows
    tl.store(out, stat0, mask=mask_m)
    tl.store(out + plane, stat1, mask=mask_m)
    tl.store(out + 2 * plane, z_tgt, mask=mask_m)
    tl.store(out + 3 * plane, z_smooth, mask=mask_m)


@triton.jit
def _fold_argmax(z, v0, mask_v, best, arg):
    """Fold a logit tile into the running ``(max, argmax)`` of each row. NaN and masked logits never
    win; within a tile the smallest index of the maximum wins, and a later tile must be strictly
    larger to take over (so ties go to the smallest index overall); ``-inf`` never beats the
    initial ``best = -inf``, so rows without a finite-or-+inf logit keep ``arg = -1``."""
    z = tl.where(mask_v[None, :] & (z == z), z, float("-inf"))
    m, j = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
    take = m > best
    return tl.where(take, m, best), tl.where(take, v0 + j, arg)


@triton.jit
def _argmax_kernel(X, W, B, PMAX, PARG, n_rows, V, D, stride_x, stride_w, tiles_per_split,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    rows = offs_m.to(tl.int64)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    arg = tl.full((BLOCK_M,), -1, tl.int32)
    for t in range(0, tiles_per_split):
        v0 = (pid_s * tiles_per_split + t) * BLOCK_V
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(X, W, B, None, rows, offs_v.to(tl.int64), mask_m, mask_v, D, stride_x, stride_w,
                         HAS_BIAS, 0, BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
        best, arg = _fold_argmax(z, v0, mask_v, best, arg)
    tl.store(PMAX + pid_s * n_rows + offs_m, best, mask=mask_m)
    tl.store(PARG + pid_s * n_rows + offs_m, arg, mask=mask_m)


@triton.jit
def _grad_logits_tile(X, W, B, RNW, CW, rows, tgt, norm, norm_lo, coef_p, coef_t, coef_u, offs_v, mask_m, mask_v,
                      D, stride_x, stride_w, softcap, margin_s, margin_m,
                      HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
                      STABLE: tl.constexpr, MARGIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tile of ``dL/dz`` (``logit_math.dlogits``) of the recomputed logits, zero outside the masks;
    with ``MARGIN``, ``dL/dc`` of the cosines (the non-target columns; the target's is 0)."""
    z = _logits_tile(X, W, B, RNW, rows, offs_v, mask_m, mask_v, D, stride_x, stride_w,
                     HAS_BIAS, MARGIN, BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
    if MARGIN > 0:
        z, dz_dc = margin_logits(z, offs_v, tgt, margin_s, margin_m, MARGIN == 2)
    dz = dlogits(z, offs_v, mask_m, mask_v, tgt, norm, norm_lo, coef_p, coef_t, coef_u, CW, softcap,
                 HAS_CW, SOFTCAP, SMOOTH, STABLE)
    if MARGIN > 0:
        dz *= dz_dc
    return dz


@triton.jit
def _dx_factor(dz, RNW, offs_v, mask_v, dtype, MARGIN: tl.constexpr):
    """The left factor of ``dX += dZ W``: ``dL/dz``, or for cosines ``dL/dc`` over the centres' norms
    (``c = x_hat . w / ||w||``), in ``X``'s dtype."""
    if MARGIN > 0:
        dz = dz * tl.load(RNW + offs_v, mask=mask_v, other=0.0)[None, :]
    return dz.to(dtype)


@triton.jit
def _keep(dz, filter_eps, FILTER: tl.constexpr):
    """Whether a gradient tile takes part in dX / dW: always, unless ``grad_filter`` is on and all
    ``|dL/dz| < filter_eps`` (the opt-in approximation)."""
    if FILTER:
        return tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps
    return True


@triton.jit
def _load_row_terms(ROWS, TGT, LSE, LSE_LO, CP, CT, CU, offs_m, mask_m):
    rows = tl.load(ROWS + offs_m, mask=mask_m, other=0)
    tgt = tl.load(TGT + offs_m, mask=mask_m, other=0)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    lse_lo = tl.load(LSE_LO + offs_m, mask=mask_m, other=0.0)
    coef_p = tl.load(CP + offs_m, mask=mask_m, other=0.0)
    coef_t = tl.load(CT + offs_m, mask=mask_m, other=0.0)
    coef_u = tl.load(CU + offs_m, mask=mask_m, other=0.0)
    return rows, tgt, lse, lse_lo, coef_p, coef_t, coef_u


@triton.jit
def _backward_atomic_kernel(X, W, B, RNW, CW, ROWS, TGT, LSE, LSE_LO, CP, CT, CU, DX, DW, DB, n_rows, v_lo, v_hi,
                            D, stride_x, stride_w, softcap, margin_s, margin_m, filter_eps,
                            HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr,
                            SMOOTH: tl.constexpr, STABLE: tl.constexpr, MARGIN: tl.constexpr, FILTER: tl.constexpr,
                            GROUP_M: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                            EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (row tile, vocab tile) of the slab ``[v_lo, v_hi)``; fp32 atomics into
    ``DX (n_rows, D)``, ``DW (v_hi - v_lo, D)`` and ``DB``."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(n_rows, BLOCK_M)
    n_v = tl.cdiv(v_hi - v_lo, BLOCK_V)
    per_group = GROUP_M * n_v  # grouped order: GROUP_M row tiles share each streamed W tile in L2
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_v = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    offs_v = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_hi
    rows, tgt, lse, lse_lo, coef_p, coef_t, coef_u = _load_row_terms(
        ROWS, TGT, LSE, LSE_LO, CP, CT, CU, offs_m, mask_m)
    dz = _grad_logits_tile(
        X, W, B, RNW, CW, rows, tgt, lse, lse_lo, coef_p, coef_t, coef_u, offs_v, mask_m, mask_v, D, stride_x,
        stride_w, softcap, margin_s, margin_m, HAS_BIAS, HAS_CW, SOFTCAP, SMOOTH, STABLE, MARGIN, BLOCK_M,
        BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
    if _keep(dz, filter_eps, FILTER):
        if HAS_BIAS:
            tl.atomic_add(DB + offs_v - v_lo, tl.sum(dz, axis=0), mask=mask_v)
        dz_x = _dx_factor(dz, RNW, offs_v, mask_v, X.dtype.element_ty, MARGIN)
        dz_in = dz.to(X.dtype.element_ty)
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = W + offs_v[:, None] * stride_w + offs_k[None, :]
        x_ptrs = X + rows[:, None] * stride_x + offs_k[None, :]
        dx_ptrs = DX + offs_m[:, None] * D + offs_k[None, :]
        dw_ptrs = DW + (offs_v - v_lo)[:, None] * D + offs_k[None, :]
        for k in range(0, tl.cdiv(D, BLOCK_K)):
            mask_k = offs_k < D - k * BLOCK_K
            w_k = tl.load(w_ptrs, mask=mask_v[:, None] & mask_k[None, :], other=0.0).to(X.dtype.element_ty)
            tl.atomic_add(dx_ptrs, tl.dot(dz_x, w_k, input_precision=PRECISION),
                          mask=mask_m[:, None] & mask_k[None, :])
            x_k = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            tl.atomic_add(dw_ptrs, tl.dot(tl.trans(dz_in), x_k, input_precision=PRECISION),
                          mask=mask_v[:, None] & mask_k[None, :])
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            dx_ptrs += BLOCK_K
            dw_ptrs += BLOCK_K


@triton.jit
def _backward_dx_kernel(X, W, B, RNW, CW, ROWS, TGT, LSE, LSE_LO, CP, CT, CU, DX, n_rows, V, D, stride_x, stride_w,
                        softcap, margin_s, margin_m, filter_eps,
                        HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr,
                        SMOOTH: tl.constexpr, STABLE: tl.constexpr, MARGIN: tl.constexpr, FILTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """Deterministic ``DX``: one program owns a row tile and sweeps the vocabulary in order."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    rows, tgt, lse, lse_lo, coef_p, coef_t, coef_u = _load_row_terms(
        ROWS, TGT, LSE, LSE_LO, CP, CT, CU, offs_m, mask_m)
    offs_k = tl.arange(0, BLOCK_K)
    for v in range(0, tl.cdiv(V, BLOCK_V)):
        offs_v = v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        dz = _grad_logits_tile(
            X, W, B, RNW, CW, rows, tgt, lse, lse_lo, coef_p, coef_t, coef_u, offs_v, mask_m, mask_v, D, stride_x,
            stride_w, softcap, margin_s, margin_m, HAS_BIAS, HAS_CW, SOFTCAP, SMOOTH, STABLE, MARGIN, BLOCK_M,
            BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
        if _keep(dz, filter_eps, FILTER):
            dz_x = _dx_factor(dz, RNW, offs_v, mask_v, X.dtype.element_ty, MARGIN)
            w_ptrs = W + offs_v[:, None] * stride_w + offs_k[None, :]
            dx_ptrs = DX + offs_m[:, None] * D + offs_k[None, :]
            for k in range(0, tl.cdiv(D, BLOCK_K)):
                mask = mask_m[:, None] & (offs_k[None, :] < D - k * BLOCK_K)
                w_k = tl.load(w_ptrs, mask=mask_v[:, None] & (offs_k[None, :] < D - k * BLOCK_K),
                              other=0.0).to(X.dtype.element_ty)
                acc = tl.load(dx_ptrs, mask=mask, other=0.0)
                tl.store(dx_ptrs, tl.dot(dz_x, w_k, acc, input_precision=PRECISION), mask=mask)
                w_ptrs += BLOCK_K
                dx_ptrs += BLOCK_K


@triton.jit
def _backward_dw_kernel(X, W, B, RNW, CW, ROWS, TGT, LSE, LSE_LO, CP, CT, CU, DW, DB, n_rows, v_lo, v_hi, D, stride_x,
                        stride_w, softcap, margin_s, margin_m, filter_eps,
                        HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr,
                        SMOOTH: tl.constexpr, STABLE: tl.constexpr, MARGIN: tl.constexpr, FILTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """Deterministic ``DW`` and ``DB``: one program owns a vocab tile and sweeps the rows in order."""
    offs_v = v_lo + tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_hi
    offs_k = tl.arange(0, BLOCK_K)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for m in range(0, tl.cdiv(n_rows, BLOCK_M)):
        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_rows
        rows, tgt, lse, lse_lo, coef_p, coef_t, coef_u = _load_row_terms(
            ROWS, TGT, LSE, LSE_LO, CP, CT, CU, offs_m, mask_m)
        dz = _grad_logits_tile(
            X, W, B, RNW, CW, rows, tgt, lse, lse_lo, coef_p, coef_t, coef_u, offs_v, mask_m, mask_v, D, stride_x,
            stride_w, softcap, margin_s, margin_m, HAS_BIAS, HAS_CW, SOFTCAP, SMOOTH, STABLE, MARGIN, BLOCK_M,
            BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
        if _keep(dz, filter_eps, FILTER):
            db += tl.sum(dz, axis=0)
            dz_t = tl.trans(dz.to(X.dtype.element_ty))
            x_ptrs = X + rows[:, None] * stride_x + offs_k[None, :]
            dw_ptrs = DW + (offs_v - v_lo)[:, None] * D + offs_k[None, :]
            for k in range(0, tl.cdiv(D, BLOCK_K)):
                mask = mask_v[:, None] & (offs_k[None, :] < D - k * BLOCK_K)
                x_k = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < D - k * BLOCK_K), other=0.0)
                acc = tl.load(dw_ptrs, mask=mask, other=0.0)
                tl.store(dw_ptrs, tl.dot(dz_t, x_k, acc, input_precision=PRECISION), mask=mask)
                x_ptrs += BLOCK_K
                dw_ptrs += BLOCK_K
    if HAS_BIAS:
        tl.store(DB + offs_v - v_lo, db, mask=mask_v)


@triton.jit
def _pair_circle_tile(E, LAB, rows, offs_v, mask_m, mask_v, labels_m, n, D, stride_e, gamma, margin,
                      BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Anchors ``rows`` against candidates ``offs_v`` of the batch (``E`` normalised): the negative and
    positive masks (the anchor itself excluded), Circle's logits ``z_n = g a_n (c - m)``,
    ``z_p = -g a_p (c - (1 - m))`` and their derivatives ``g a_n``, ``-g a_p`` (``a`` detached)."""
    c = _logits_tile(E, E, None, None, rows, offs_v, mask_m, mask_v, D, stride_e, stride_e,
                     False, 0, BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
    labels_v = tl.load(LAB + offs_v, mask=mask_v, other=0)
    both = mask_m[:, None] & mask_v[None, :]
    same = labels_m[:, None] == labels_v[None, :]
    neg = both & (labels_m[:, None] != labels_v[None, :])
    pos = both & same & (rows[:, None] != offs_v[None, :])
    a_n = tl.maximum(c + margin, 0.0)
    a_p = tl.maximum(1.0 + margin - c, 0.0)
    return neg, pos, gamma * a_n * (c - margin), -gamma * a_p * (c - (1.0 - margin)), gamma * a_n, -gamma * a_p


@triton.jit
def _pair_circle_forward_kernel(E, LAB, PART, n, D, stride_e, tiles_per_split, gamma, margin,
                                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                                EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """Per anchor and candidate split: running ``(max, sumexp)`` of the negative and the positive logits."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    rows = offs_m.to(tl.int64)
    labels_m = tl.load(LAB + offs_m, mask=mask_m, other=0)
    m_n = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    m_p = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_n = tl.zeros((BLOCK_M,), tl.float32)
    s_p = tl.zeros((BLOCK_M,), tl.float32)
    for t in range(0, tiles_per_split):
        offs_v = ((pid_s * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < n
        neg, pos, z_n, z_p, _, _ = _pair_circle_tile(E, LAB, rows, offs_v, mask_m, mask_v, labels_m, n, D, stride_e,
                                                     gamma, margin, BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
        m_n, s_n = lse_fold(m_n, s_n, tl.where(neg, z_n, float("-inf")))
        m_p, s_p = lse_fold(m_p, s_p, tl.where(pos, z_p, float("-inf")))
    out = PART + pid_s * n + offs_m
    plane = tl.num_programs(1) * n
    tl.store(out, m_n, mask=mask_m)
    tl.store(out + plane, s_n, mask=mask_m)
    tl.store(out + 2 * plane, m_p, mask=mask_m)
    tl.store(out + 3 * plane, s_p, mask=mask_m)


@triton.jit
def _pair_circle_backward_kernel(E, LAB, LN, LP, COEF, DE, n, D, stride_e, gamma, margin,
                                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                                 EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """``dL/de_hat_i = sum_j (dL/dc_ij + dL/dc_ji) e_hat_j``: one program owns a tile of rows and sweeps
    the batch (``c`` is symmetric, so both anchors' terms come from one tile; no atomics, deterministic).
    Anchor ``i``'s term: ``k_i p_ij dz_ij/dc`` with ``p`` the softmax over its negatives (positives),
    ``k_i = grad_i sigmoid(lse_n_i + lse_p_i)``; anchors without both have ``k = 0``, ``lse = +inf``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    rows = offs_m.to(tl.int64)
    labels_m = tl.load(LAB + offs_m, mask=mask_m, other=0)
    ln_m = tl.load(LN + offs_m, mask=mask_m, other=float("inf"))
    lp_m = tl.load(LP + offs_m, mask=mask_m, other=float("inf"))
    k_m = tl.load(COEF + offs_m, mask=mask_m, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    for v in range(0, tl.cdiv(n, BLOCK_V)):
        offs_v = (v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < n
        neg, pos, z_n, z_p, dz_n, dz_p = _pair_circle_tile(E, LAB, rows, offs_v, mask_m, mask_v, labels_m, n, D,
                                                           stride_e, gamma, margin, BLOCK_M, BLOCK_V, BLOCK_K,
                                                           EVEN_K, PRECISION)
        ln_v = tl.load(LN + offs_v, mask=mask_v, other=float("inf"))
        lp_v = tl.load(LP + offs_v, mask=mask_v, other=float("inf"))
        k_v = tl.load(COEF + offs_v, mask=mask_v, other=0.0)
        p_n = k_m[:, None] * tl.exp(z_n - ln_m[:, None]) + k_v[None, :] * tl.exp(z_n - ln_v[None, :])
        p_p = k_m[:, None] * tl.exp(z_p - lp_m[:, None]) + k_v[None, :] * tl.exp(z_p - lp_v[None, :])
        dc = tl.where(neg, dz_n * p_n, 0.0) + tl.where(pos, dz_p * p_p, 0.0)
        dc_in = dc.to(E.dtype.element_ty)
        e_ptrs = E + offs_v[:, None] * stride_e + offs_k[None, :]
        de_ptrs = DE + rows[:, None] * D + offs_k[None, :]
        for k in range(0, tl.cdiv(D, BLOCK_K)):
            mask_k = offs_k[None, :] < D - k * BLOCK_K
            e_k = tl.load(e_ptrs, mask=mask_v[:, None] & mask_k, other=0.0)
            acc = tl.load(de_ptrs, mask=mask_m[:, None] & mask_k, other=0.0)
            tl.store(de_ptrs, tl.dot(dc_in, e_k, acc, input_precision=PRECISION), mask=mask_m[:, None] & mask_k)
            e_ptrs += BLOCK_K
            de_ptrs += BLOCK_K


# ----------------------------------------------------------------------------- launch helpers

def _tiles(x: torch.Tensor) -> dict:
    """Block shapes and launch settings for this device and dtype (``NCKERNELS_LCE_TILES=m,v,k,warps,stages``
    overrides them, for tuning on the GPU)."""
    if _interpreted() or x.device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_V=32, BLOCK_K=16, num_warps=4, num_stages=1)
    override = os.environ.get("NCKERNELS_LCE_TILES")
    if override:
        m, v, k, w, s = (int(t) for t in override.split(","))
        return dict(BLOCK_M=m, BLOCK_V=v, BLOCK_K=k, num_warps=w, num_stages=s)
    if x.dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class Margin(NamedTuple):
    """The cosine logit transform of the margin losses' non-target columns (``logit_math.margin_logits``):
    the rows of ``x`` are normalised, ``inv_norms (V,)`` fp32 holds ``1 / max(||w_j||, eps)``."""
    circle: bool      # Circle's ``g [c + m]_+ (c - m)``, else ``s c``
    scale: float
    margin: float
    inv_norms: torch.Tensor

    @property
    def code(self) -> int:
        return 2 if self.circle else 1


def _margin_args(margin: Optional[Margin]) -> tuple:
    """``(RNW, margin_s, margin_m)`` kernel arguments."""
    if margin is None:
        return None, 0.0, 0.0
    return margin.inv_norms, float(margin.scale), float(margin.margin)


def _common(x, w, bias, class_weight, softcap, smooth, stable, cfg, margin=None):
    D = x.shape[1]
    return dict(HAS_BIAS=bias is not None, HAS_CW=class_weight is not None, SOFTCAP=softcap > 0,
                SMOOTH=smooth, STABLE=stable, MARGIN=margin.code if margin is not None else 0,
                EVEN_K=D % cfg["BLOCK_K"] == 0, PRECISION=_precision(x), **cfg)


def _row_major(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _vocab_splits(x, n: int, V: int, cfg: dict):
    """``(row tiles, vocabulary splits, tiles per split)``: enough programs for ~2 waves of SMs."""
    n_m = triton.cdiv(n, cfg["BLOCK_M"])
    n_v = triton.cdiv(V, cfg["BLOCK_V"])
    splits = max(1, min(n_v, triton.cdiv(2 * _num_sms(x.device), n_m)))
    tiles_per_split = triton.cdiv(n_v, splits)
    return n_m, triton.cdiv(n_v, tiles_per_split), tiles_per_split


def _merge_lse(m, s, dtype=torch.float32):
    """LSE of each row from per-split ``(max, sumexp)`` partials ``(splits, n)`` (``logit_math.lse_fold``),
    evaluated in ``dtype``."""
    return torch.logsumexp(torch.where(m.isinf(), 0.0, m).to(dtype) + torch.log(s.to(dtype)), 0)


def forward(x, w, bias, rows, target, class_weight, label_smoothing, softcap, stable=False, margin=None):
    """Row statistics of the hidden rows ``x[rows]`` (fp32): ``(lse, lse_lo, z'_target, sum_j omega_j z'_j)``
    (the partial LSEs merged in float64, split into ``fl(lse)`` and its rounding residual ``lse_lo``),
    or with ``stable`` (StableMax) ``(s(z_target), sum_{j != target} s(z_j))``. With ``margin``
    (a :class:`Margin`) the LSE is over the transformed cosines of the non-target columns only."""
    x, w = _row_major(x), _row_major(w)
    n, (V, D) = rows.numel(), w.shape
    cfg = _tiles(x)
    n_m, splits, tiles_per_split = _vocab_splits(x, n, V, cfg)
    part = torch.empty((4, splits, n), dtype=torch.float32, device=x.device)
    rnw, margin_s, margin_m = _margin_args(margin)
    _forward_kernel[(n_m, splits)](
        x, w, bias, rnw, class_weight, rows, target, part, n, V, D, x.stride(0), w.stride(0), tiles_per_split,
        float(softcap), margin_s, margin_m,
        **_common(x, w, bias, class_weight, softcap, label_smoothing > 0, stable, cfg, margin),
    )
    if stable:
        return part[0].sum(0), part[1].sum(0)
    lse = _merge_lse(part[0], part[1], torch.float64)
    hi = lse.float()
    return hi, torch.where(hi.isfinite(), (lse - hi).float(), 0.0), part[2].sum(0), part[3].sum(0)


def backward(x, w, bias, rows, target, class_weight, norm, norm_lo, coef_p, coef_target, coef_uniform, softcap,
             grad_filter=0.0, deterministic=False, stable=False, margin=None, fp32_grads=False):
    """``(dx, dw, db)`` from ``dL/dz = (a p - b onehot - c omega) t'(z)`` over ``rows``; ``norm + norm_lo`` is
    the LSE (softmax; ``p = exp((z - norm) - norm_lo)``) or ``norm`` is ``S`` (StableMax) of each row. With ``margin``: ``dx = dL/dx_hat`` and
    ``dw_j = sum_i dL/dc_ij x_hat_i = dL/dw_hat_j`` (w.r.t. the normalised centres), over the
    non-target columns. ``fp32_grads``: ``dx`` and ``dw`` in fp32 whatever the inputs' dtype."""
    x, w = _row_major(x), _row_major(w)
    n, (V, D) = rows.numel(), w.shape
    cfg = _tiles(x)
    flags = _common(x, w, bias, class_weight, softcap, bool((coef_uniform != 0).any()), stable, cfg, margin)
    scalars = (float(softcap),) + _margin_args(margin)[1:] + (float(grad_filter),)
    rnw = _margin_args(margin)[0]
    terms = (rows, target, norm.contiguous(), norm_lo.contiguous(), coef_p.contiguous(), coef_target.contiguous(),
             coef_uniform.contiguous())
    n_m = triton.cdiv(n, cfg["BLOCK_M"])
    dx_rows = torch.zeros((n, D), dtype=torch.float32, device=x.device)
    dw_dtype = torch.float32 if fp32_grads else w.dtype
    direct = dw_dtype == torch.float32  # accumulate straight into the gradient
    dw = torch.zeros_like(w, dtype=dw_dtype) if direct else torch.empty_like(w)
    db = torch.zeros(V, dtype=torch.float32, device=w.device) if bias is not None else None
    slab = V if direct else max(cfg["BLOCK_V"], SLAB_BYTES // (4 * D) // cfg["BLOCK_V"] * cfg["BLOCK_V"])
    buf = dw if direct else torch.empty((min(slab, V), D), dtype=torch.float32, device=w.device)
    flags["FILTER"] = grad_filter > 0
    if deterministic:
        _backward_dx_kernel[(n_m,)](x, w, bias, rnw, class_weight, *terms, dx_rows, n, V, D, x.stride(0),
                                    w.stride(0), *scalars, **flags)
    for v_lo in range(0, V, slab):
        v_hi = min(V, v_lo + slab)
        if not direct:
            buf.zero_()
        db_slab = db[v_lo:v_hi] if db is not None else None
        n_v = triton.cdiv(v_hi - v_lo, cfg["BLOCK_V"])
        if deterministic:
            _backward_dw_kernel[(n_v,)](x, w, bias, rnw, class_weight, *terms, buf, db_slab, n, v_lo, v_hi, D,
                                        x.stride(0), w.stride(0), *scalars, **flags)
        else:
            buf_slab = buf if not direct else dw[v_lo:v_hi]
            _backward_atomic_kernel[(n_m * n_v,)](
                x, w, bias, rnw, class_weight, *terms, dx_rows, buf_slab, db_slab, n, v_lo, v_hi, D,
                x.stride(0), w.stride(0), *scalars, GROUP_M=8, **flags,
            )
        if not direct:
            dw[v_lo:v_hi] = buf[: v_hi - v_lo]
    dx = torch.zeros_like(x, dtype=torch.float32 if fp32_grads else x.dtype)
    dx[rows] = dx_rows.to(dx.dtype)
    return dx, dw, (db.to(bias.dtype) if db is not None else None)


def linear_argmax(x, w, bias=None):
    """``argmax_j (x_i . w_j + b_j)`` for every row of ``x (N, D)`` over the ``C`` rows of ``w (C, D)``
    (same float dtype; ``bias (C,)`` optional, may hold ``-inf`` for classes that must never win):
    int64 ``(N,)``. Logits are fp32 (accumulated in fp32, TF32 as ``_precision`` says) and never
    stored. Ties go to the smallest index (like ``torch.argmax``); NaN logits never win (unlike
    ``torch.argmax``, which returns a NaN's index); a row without any logit ``> -inf`` (all
    ``-inf``, or ``C = 0``) gets ``-1``. Extra memory: ``2 x splits x N`` partials."""
    x, w = _row_major(x), _row_major(w)
    (n, D), V = x.shape, w.shape[0]
    if n == 0 or V == 0:
        return torch.full((n,), -1, dtype=torch.int64, device=x.device)
    bias = bias.contiguous() if bias is not None else None
    cfg = _tiles(x)
    n_m, splits, tiles_per_split = _vocab_splits(x, n, V, cfg)
    pmax = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    parg = torch.empty((splits, n), dtype=torch.int32, device=x.device)
    _argmax_kernel[(n_m, splits)](
        x, w, bias, pmax, parg, n, V, D, x.stride(0), w.stride(0), tiles_per_split,
        HAS_BIAS=bias is not None, EVEN_K=D % cfg["BLOCK_K"] == 0, PRECISION=_precision(x), **cfg,
    )
    if splits == 1:
        return parg[0].to(torch.int64)
    # Splits hold increasing class ranges: the first split that reaches the overall max holds the
    # smallest winning index (pmax is never NaN; rows that are all -inf have -1 in every split).
    first = (pmax == pmax.amax(0, keepdim=True)).to(torch.int32).argmax(0, keepdim=True)
    return parg.gather(0, first)[0].to(torch.int64)


# ----------------------------------------------------------------------------- margin losses

def _margin(w, kind: str, s: float, m: float) -> Margin:
    norms = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32)
    return Margin(kind == "circle", s, m, 1.0 / norms.clamp_min(NORM_EPS))


def margin_others_lse(x_hat, w, tgt, kind: str, s: float, m: float):
    """``reference.margin.others_lse`` on the fused kernel: fp32 log-sum-exp over the transformed cosines
    of the classes other than ``tgt`` (``-1``: none excluded). ``x_hat (n, D)`` normalised rows in the
    compute dtype (the centres ``w (C, D)`` are cast to it tile by tile, never copied or normalised)."""
    rows = torch.arange(x_hat.shape[0], device=x_hat.device)
    return forward(x_hat, w, None, rows, tgt, None, 0.0, 0.0, margin=_margin(w, kind, s, m))[0]


def margin_others_backward(x_hat, w, tgt, lse, grad, kind: str, s: float, m: float):
    """``reference.margin.others_backward`` on the fused kernels: fp32 ``(dL/dx_hat, dL/dw)`` of the
    non-target columns, ``dL/dc_ij = g_i p_ij dz_ij/dc_ij``. The normalisation backward of the centres,
    ``dw_j = (g_j - w_hat_j (w_hat_j . g_j)) / ||w_j||`` with ``g_j = sum_i dL/dc_ij x_hat_i``, runs in
    slabs of 32 MiB."""
    n = x_hat.shape[0]
    margin = _margin(w, kind, s, m)
    zeros = torch.zeros(n, dtype=torch.float32, device=x_hat.device)
    dx_hat, dw, _ = backward(x_hat, w, None, torch.arange(n, device=x_hat.device), tgt, None, lse, zeros, grad,
                             zeros, zeros, 0.0, deterministic=torch.are_deterministic_algorithms_enabled(), margin=margin,
                             fp32_grads=True)
    inv = margin.inv_norms
    rows_per_slab = max(1, 2**25 // (4 * w.shape[1]))  # 32 MiB fp32 temporaries
    for lo in range(0, w.shape[0], rows_per_slab):
        hi = min(w.shape[0], lo + rows_per_slab)
        w_hat = w[lo:hi].float() * inv[lo:hi, None]
        dw[lo:hi] = normalize_backward(w_hat, 1.0 / inv[lo:hi], dw[lo:hi])
    return dx_hat, dw


def pair_circle_forward(e_hat, labels, gamma: float, margin: float):
    """Per anchor, fp32 ``(lse_n, lse_p)``: log-sum-exp of the pair-wise Circle logits over its negatives
    and over its positives (``-inf`` where it has none). ``e_hat (B, D)`` normalised rows in the compute
    dtype, ``labels (B,)`` int64. The ``B x B`` similarities exist only as register tiles."""
    e_hat, labels = _row_major(e_hat), labels.contiguous()
    (n, D), cfg = e_hat.shape, _tiles(e_hat)
    n_m, splits, tiles_per_split = _vocab_splits(e_hat, n, n, cfg)
    part = torch.empty((4, splits, n), dtype=torch.float32, device=e_hat.device)
    _pair_circle_forward_kernel[(n_m, splits)](e_hat, labels, part, n, D, e_hat.stride(0), tiles_per_split,
                                               float(gamma), float(margin), EVEN_K=D % cfg["BLOCK_K"] == 0,
                                               PRECISION=_precision(e_hat), **cfg)
    return _merge_lse(part[0], part[1]), _merge_lse(part[2], part[3])


def pair_circle_backward(e_hat, labels, lse_n, lse_p, coef, gamma: float, margin: float):
    """fp32 ``dL/de_hat (B, D)`` given per-anchor ``coef = grad sigmoid(lse_n + lse_p)``; anchors without a
    positive and a negative must carry ``coef = 0`` and ``lse_n = lse_p = +inf``."""
    e_hat, labels = _row_major(e_hat), labels.contiguous()
    (n, D), cfg = e_hat.shape, _tiles(e_hat)
    de_hat = torch.zeros((n, D), dtype=torch.float32, device=e_hat.device)
    _pair_circle_backward_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        e_hat, labels, lse_n.contiguous(), lse_p.contiguous(), coef.contiguous(), de_hat, n, D, e_hat.stride(0),
        float(gamma), float(margin), EVEN_K=D % cfg["BLOCK_K"] == 0, PRECISION=_precision(e_hat), **cfg)
    return de_hat
