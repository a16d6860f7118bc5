"""Triton helpers shared by every row reduction over logits, explicit or implicit.

A *logit tile* is a ``(BLOCK_M, BLOCK_V)`` fp32 block of raw logits ``z`` (explicit logits
loaded from memory, or ``x W^T + b`` computed in registers). The helpers here apply the logit
transform and fold the tile into per-row statistics, or turn it into ``dL/dz``:

* softmax family (``STABLE=False``): ``z' = c tanh(z / c)`` when soft-capped, running
  ``(max, sumexp)`` for the log-sum-exp, plus the target logit and ``sum_j omega_j z'_j``;
* StableMax (``STABLE=True``): ``s(z) = z + 1`` for ``z >= 0``, ``1 / (1 - z)`` below; no max
  is needed: the running statistics are ``sum_{j != y} s(z_j)`` and ``s(z_y)``, so the loss
  ``log1p(S_other / s_y)`` never subtracts two large numbers.

Gradient (both families): ``dL/dz_j = (a p_j - b [j = y] - c omega_j) t'(z_j)`` with ``p`` the
normalised probabilities and the per-row coefficients ``a, b, c`` computed by the op. For
StableMax ``p_j t'(z_j) = s(z_j) / S * 1 / (1 + |z_j|)``, and the onehot term is scaled by the
same ``1 / (1 + |z_y|)``: the transform derivative is ``s'(z) / s(z) = 1 / (1 + |z|)`` on the
log scale.

Margin losses (``margin_logits``): the tile holds cosines; the non-target columns are
transformed (``s c``, or Circle's re-weighting), the target column is ``-inf`` (its margin
transform is applied per row outside the kernel), and the gradient is the softmax one times
``dz/dc``.
"""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1, no inf/inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def stablemax_s(z):
    """``s(z) = z + 1`` (z >= 0), ``1 / (1 - z)`` (z < 0), without evaluating 1/(1 - z) at z >= 1."""
    return tl.where(z >= 0, z + 1.0, 1.0 / (1.0 - tl.minimum(z, 0.0)))


@triton.jit
def lse_fold(m, s, z):
    """Fold a tile ``z`` (``-inf`` where masked) into each row's running ``(max, sum exp(z - max))``.
    Like torch.logsumexp, an infinite max is replaced by 0 as the reference point: two ``-inf``
    maxima must not make NaN, and a ``+inf`` logit gives an LSE of ``+inf``; ``lse = m + log(s)``
    (``merge_lse`` on the host)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)


@triton.jit
def margin_logits(c, offs_v, tgt, scale, margin, CIRCLE: tl.constexpr):
    """Non-target logits of a cosine tile and ``dz/dc`` (``reference.margin.other_logits``):
    ``s c`` and ``s``, or Circle's ``g a_n (c - m)`` and ``g a_n`` with ``a_n = [c + m]_+``
    (detached). The target column becomes ``-inf``: the margin losses handle it per row."""
    if CIRCLE:
        alpha = tl.maximum(c + margin, 0.0)
        z = scale * alpha * (c - margin)
        dz_dc = scale * alpha
    else:
        z = scale * c
        dz_dc = c * 0.0 + scale
    return tl.where(offs_v[None, :] == tgt[:, None], float("-inf"), z), dz_dc


@triton.jit
def fold_stats(z, offs_v, mask_v, tgt, CW, stat0, stat1, z_tgt, z_smooth, softcap,
               HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, STABLE: tl.constexpr):
    """Fold a raw logit tile into per-row statistics.

    Softmax: ``stat0`` running max, ``stat1`` running sum of ``exp(z' - m)`` with ``m`` the max,
    or 0 where the max is infinite: ``lse = m + log(stat1)``.
    StableMax: ``stat0`` running ``s(z_y)``, ``stat1`` running ``sum_{j != y} s(z_j)``.
    ``z_tgt`` accumulates the (transformed) target logit, ``z_smooth`` ``sum_j omega_j z'_j``.
    """
    is_tgt = offs_v[None, :] == tgt[:, None]
    if STABLE:
        s = tl.where(mask_v[None, :], stablemax_s(z), 0.0)
        stat0 += tl.sum(tl.where(is_tgt, s, 0.0), axis=1)
        stat1 += tl.sum(tl.where(is_tgt, 0.0, s), axis=1)
    else:
        if SOFTCAP:
            z = softcap * tanh(z / softcap)
        stat0, stat1 = lse_fold(stat0, stat1, tl.where(mask_v[None, :], z, float("-inf")))
    z_tgt += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)
    if SMOOTH:
        if HAS_CW:
            z = z * tl.load(CW + offs_v, mask=mask_v, other=0.0)[None, :]
        z_smooth += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
    return stat0, stat1, z_tgt, z_smooth


@triton.jit
def dlogits(z, offs_v, mask_m, mask_v, tgt, norm, norm_lo, coef_p, coef_t, coef_u, CW, softcap,
            HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, STABLE: tl.constexpr):
    """``dL/dz`` of a raw logit tile (fp32), zero outside the masks; ``norm`` is the row's LSE
    (softmax) or ``S = sum_j s(z_j)`` (StableMax). ``norm_lo`` is the LSE's rounding residual
    (``lse = norm + norm_lo`` exactly): ``p = exp((z - norm) - norm_lo)`` keeps the tiny
    off-target mass that ``exp(z - fl(lse))`` rounds away on confident rows."""
    onehot = offs_v[None, :] == tgt[:, None]
    if STABLE:
        inv = 1.0 / (1.0 + tl.abs(z))
        dz = (coef_p[:, None] * stablemax_s(z) / norm[:, None] - tl.where(onehot, coef_t[:, None], 0.0)) * inv
    else:
        if SOFTCAP:
            th = tanh(z / softcap)
            z = softcap * th
        dz = coef_p[:, None] * tl.exp((z - norm[:, None]) - norm_lo[:, None])
        dz -= tl.where(onehot, coef_t[:, None], 0.0)
        if SMOOTH:
            if HAS_CW:
                dz -= coef_u[:, None] * tl.load(CW + offs_v, mask=mask_v, other=0.0)[None, :]
            else:
                dz -= coef_u[:, None]
        if SOFTCAP:
            dz *= 1.0 - th * th
    return tl.where(mask_m[:, None] & mask_v[None, :], dz, 0.0)
