"""Row reductions over explicit logits (DESIGN.md family 1 without the matmul): Triton kernels.

Every kernel takes a row-major ``(R, C)`` matrix and works on ``(BLOCK_M, BLOCK_C)`` tiles:
many short rows per program, or one long row streamed in ``BLOCK_C`` chunks. When a row fits
in one tile (``SINGLE``) it is read once; otherwise statistics are gathered online in one
sweep (max and sum together, Milakov & Gimelshein 2018) and a second sweep writes.

* ``row_stats``: per-row statistics of ``logit_math.fold_stats`` (LSE parts or StableMax sums,
  target logit, smoothing sum): the forward of logsumexp, cross-entropy and StableMax CE, one
  read of each logit.
* ``normalize``: softmax, log-softmax, StableMax, log-StableMax (one read + one write when the
  row fits on chip).
* ``normalize_backward``: their backward, ``dx = y (dy - sum dy y)`` (``dx = dy - exp(y) sum dy``
  for the log forms), times ``1 / (1 + |x|)`` for StableMax.
* ``dlogits``: ``dL/dz`` of ``logit_math.dlogits`` for every row: the backward of logsumexp,
  cross-entropy and StableMax CE, one read + one write.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .logit_math import dlogits, fold_stats, stablemax_s


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _row_stats_kernel(X, stride_x, ROWS, TGT, CW, OUT, n_rows, C, softcap,
                      HAS_TGT: tl.constexpr, HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
                      STABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    rows = tl.load(ROWS + offs_m, mask=mask_m, other=0)
    tgt = tl.load(TGT + offs_m, mask=mask_m, other=-1) if HAS_TGT else tl.full((BLOCK_M,), -1, tl.int64)
    stat0 = tl.zeros((BLOCK_M,), tl.float32) if STABLE else tl.full((BLOCK_M,), float("-inf"), tl.float32)
    stat1 = tl.zeros((BLOCK_M,), tl.float32)
    z_tgt = tl.zeros((BLOCK_M,), tl.float32)
    z_smooth = tl.zeros((BLOCK_M,), tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    ptrs = X + rows[:, None] * stride_x + offs_c[None, :]
    for c0 in range(0, C, BLOCK_C):
        mask_c = offs_c + c0 < C
        z = tl.load(ptrs + c0, mask=mask_m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        stat0, stat1, z_tgt, z_smooth = fold_stats(z, offs_c + c0, mask_c, tgt, CW, stat0, stat1, z_tgt, z_smooth,
                                                   softcap, HAS_CW, SOFTCAP, SMOOTH, STABLE)
    tl.store(OUT + offs_m, stat0, mask=mask_m)
    tl.store(OUT + n_rows + offs_m, stat1, mask=mask_m)
    tl.store(OUT + 2 * n_rows + offs_m, z_tgt, mask=mask_m)
    tl.store(OUT + 3 * n_rows + offs_m, z_smooth, mask=mask_m)


@triton.jit
def _normalized(z, stat0, stat1, LOG: tl.constexpr, STABLE: tl.constexpr):
    if STABLE:
        if LOG:
            return tl.log(stablemax_s(z)) - tl.log(stat1)[:, None]
        return stablemax_s(z) / stat1[:, None]
    if LOG:
        y = z - (stat0 + tl.log(stat1))[:, None]
    else:
        y = tl.exp(z - stat0[:, None]) / stat1[:, None]
    return tl.where((tl.abs(stat0) == float("inf"))[:, None], float("nan"), y)  # as torch.softmax does


@triton.jit
def _normalize_kernel(X, Y, n_rows, C, LOG: tl.constexpr, STABLE: tl.constexpr, SINGLE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    offs_c = tl.arange(0, BLOCK_C)
    none = tl.full((BLOCK_M,), -1, tl.int64)
    stat0 = tl.zeros((BLOCK_M,), tl.float32) if STABLE else tl.full((BLOCK_M,), float("-inf"), tl.float32)
    stat1 = tl.zeros((BLOCK_M,), tl.float32)
    dummy = tl.zeros((BLOCK_M,), tl.float32)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    if SINGLE:
        mask = mask_m[:, None] & (offs_c[None, :] < C)
        z = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        stat0, stat1, dummy, dummy = fold_stats(z, offs_c, offs_c < C, none, X, stat0, stat1, dummy, dummy,
                                                1.0, False, False, False, STABLE)
        tl.store(y_ptrs, _normalized(z, stat0, stat1, LOG, STABLE).to(Y.dtype.element_ty), mask=mask)
    else:
        for c0 in range(0, C, BLOCK_C):
            mask_c = offs_c + c0 < C
            z = tl.load(x_ptrs + c0, mask=mask_m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            stat0, stat1, dummy, dummy = fold_stats(z, offs_c + c0, mask_c, none, X, stat0, stat1, dummy, dummy,
                                                    1.0, False, False, False, STABLE)
        for c0 in range(0, C, BLOCK_C):
            mask = mask_m[:, None] & (offs_c[None, :] + c0 < C)
            z = tl.load(x_ptrs + c0, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs + c0, _normalized(z, stat0, stat1, LOG, STABLE).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_grad(x_ptrs, y, dy, acc, LOG: tl.constexpr, STABLE: tl.constexpr, mask):
    if LOG:
        dx = dy - tl.exp(y) * acc[:, None]
    else:
        dx = y * (dy - acc[:, None])
    if STABLE:
        dx = dx / (1.0 + tl.abs(tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)))
    return dx


@triton.jit
def _normalize_backward_kernel(X, Y, DY, DX, n_rows, C, LOG: tl.constexpr, STABLE: tl.constexpr,
                               SINGLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    offs_c = tl.arange(0, BLOCK_C)
    base = offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    acc = tl.zeros((BLOCK_M,), tl.float32)
    if SINGLE:
        mask = mask_m[:, None] & (offs_c[None, :] < C)
        y = tl.load(Y + base, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + base, mask=mask, other=0.0).to(tl.float32)
        acc = tl.sum(dy, axis=1) if LOG else tl.sum(dy * y, axis=1)
        dx = _normalize_grad(X + base, y, dy, acc, LOG, STABLE, mask)
        tl.store(DX + base, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        for c0 in range(0, C, BLOCK_C):
            mask = mask_m[:, None] & (offs_c[None, :] + c0 < C)
            dy = tl.load(DY + base + c0, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += tl.sum(dy, axis=1)
            else:
                acc += tl.sum(dy * tl.load(Y + base + c0, mask=mask, other=0.0).to(tl.float32), axis=1)
        for c0 in range(0, C, BLOCK_C):
            mask = mask_m[:, None] & (offs_c[None, :] + c0 < C)
            y = tl.load(Y + base + c0, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + c0, mask=mask, other=0.0).to(tl.float32)
            dx = _normalize_grad(X + base + c0, y, dy, acc, LOG, STABLE, mask)
            tl.store(DX + base + c0, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _dlogits_kernel(X, DX, TGT, CW, NORM, NORM_LO, CP, CT, CU, n_rows, C, softcap, ignore_index,
                    HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, STABLE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    tgt = tl.load(TGT + offs_m, mask=mask_m, other=ignore_index)
    active = mask_m & (tgt != ignore_index)
    norm = tl.load(NORM + offs_m, mask=mask_m, other=1.0)
    norm_lo = tl.load(NORM_LO + offs_m, mask=mask_m, other=0.0)
    coef_p = tl.load(CP + offs_m, mask=mask_m, other=0.0)
    coef_t = tl.load(CT + offs_m, mask=mask_m, other=0.0)
    coef_u = tl.load(CU + offs_m, mask=mask_m, other=0.0)
    offs_c = tl.arange(0, BLOCK_C)
    base = offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    for c0 in range(0, C, BLOCK_C):
        mask_c = offs_c + c0 < C
        z = tl.load(X + base + c0, mask=active[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        dz = dlogits(z, offs_c + c0, active, mask_c, tgt, norm, norm_lo, coef_p, coef_t, coef_u, CW, softcap,
                     HAS_CW, SOFTCAP, SMOOTH, STABLE)
        tl.store(DX + base + c0, dz.to(DX.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------- launch helpers

def _blocks(C: int, x: torch.Tensor, single_max: int | None = None):
    """``(BLOCK_M, BLOCK_C, SINGLE, num_warps)``: a whole row per tile up to ``single_max``
    elements, else 1 row x ``BLOCK_C`` chunks; about 4k-16k elements a tile."""
    if _interpreted() or x.device.type != "cuda":
        single_max, chunk, tile = 64, 32, 256  # small, so that tests cover both paths
    else:
        single_max = single_max or (16384 if x.element_size() <= 2 else 8192)
        chunk, tile = 4096, 8192
    c_pow2 = triton.next_power_of_2(max(C, 1))
    if c_pow2 <= single_max:
        block_c, single = c_pow2, True
    else:
        block_c, single = chunk, False
    block_m = max(1, min(tile // block_c, 64)) if single else 1
    warps = 4 if block_c * block_m <= 2048 else 8 if block_c * block_m <= 8192 else 16
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps), single


def row_stats(x, rows, target, class_weight, label_smoothing, softcap, stable):
    """``(4, n)`` fp32 statistics of the rows ``x[rows]`` (see ``logit_math.fold_stats``)."""
    n, C = rows.numel(), x.shape[1]
    out = torch.empty((4, n), dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    cfg, _ = _blocks(C, x)
    _row_stats_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        x, x.stride(0), rows, target, class_weight, out, n, C, float(softcap),
        HAS_TGT=target is not None, HAS_CW=class_weight is not None, SOFTCAP=softcap > 0,
        SMOOTH=label_smoothing > 0, STABLE=stable, **cfg)
    return out


def normalize(x, log: bool, stable: bool):
    """Softmax / log-softmax / StableMax / log-StableMax over the last dim of contiguous ``x``."""
    R, C = x.shape
    y = torch.empty_like(x)
    if R and C:
        cfg, single = _blocks(C, x)
        _normalize_kernel[(triton.cdiv(R, cfg["BLOCK_M"]),)](x, y, R, C, LOG=log, STABLE=stable, SINGLE=single, **cfg)
    return y


def normalize_backward(x, y, dy, log: bool, stable: bool):
    R, C = y.shape
    dx = torch.empty_like(y)
    if R and C:
        cfg, single = _blocks(C, y)
        _normalize_backward_kernel[(triton.cdiv(R, cfg["BLOCK_M"]),)](
            x, y, dy, dx, R, C, LOG=log, STABLE=stable, SINGLE=single, **cfg)
    return dx


def dlogits_rows(x, target, class_weight, norm, norm_lo, coef_p, coef_t, coef_u, softcap, ignore_index, stable):
    """``dL/dx`` for every row of contiguous ``x``; rows whose target is ``ignore_index`` get 0."""
    R, C = x.shape
    dx = torch.empty_like(x)
    if R and C:
        cfg, _ = _blocks(C, x, single_max=4096)
        _dlogits_kernel[(triton.cdiv(R, cfg["BLOCK_M"]),)](
            x, dx, target, class_weight, norm, norm_lo, coef_p, coef_t, coef_u, R, C, float(softcap), int(ignore_index),
            HAS_CW=class_weight is not None, SOFTCAP=softcap > 0, SMOOTH=bool((coef_u != 0).any()), STABLE=stable,
            **cfg)
    return dx
