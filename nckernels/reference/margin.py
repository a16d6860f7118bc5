"""Chunked PyTorch margin losses (CosFace, ArcFace, combined margin, class-level Circle): the spec and CPU path.

Rows ``e_i`` and class centres ``w_j`` are L2-normalised (``x / max(||x||, 1e-12)``, as
``F.normalize``), ``c_ij = e_hat_i . w_hat_j``. Each loss is softmax cross-entropy over
transformed logits, one transform for the target column ``y_i`` and one for the others::

    kind        target logit z_iy                       other logits z_ij          dz/dc (target; others)
    cosface     s (c - m3)                              s c                        s; s
    combined    s phi(c),  phi = cos(m1 theta + m2) - m3  s c                      s phi'(c); s
    circle      g a_p (c - (1 - m)), a_p = [1 + m - c]_+  g a_n (c - m), a_n = [c + m]_+   g a_p; g a_n

(``theta = acos(c)``; Circle's ``a_p``, ``a_n`` are detached: constants of the gradient). The
per-row loss is ``lse_i - z_iy = softplus(lse^o_i - z_iy)`` where ``lse^o_i`` is the
log-sum-exp over the *other* classes only (kept separately: the loss of a confident row is
then exact, not ``fl(lse) - z_y``, and ``C = 1`` gives ``lse^o = -inf``, loss 0). The gradient
w.r.t. the transformed logits is ``dL/dz_ij = g_i (p_ij - [j = y_i])``, times ``dz/dc`` above,
then back through ``c = e_hat . w_hat`` and the two normalisations
(``dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||``).

Memory: classes are processed in chunks of ``cols`` centres (``(B, cols)`` fp32 cosines and
their temporaries, plus the chunk's normalised centres, under ``chunk_bytes()``; env
``NCKERNELS_REFERENCE_CHUNK_MB``), with an online log-sum-exp across chunks; the backward
recomputes each chunk's cosines from the saved ``lse^o``. Neither ``B x C`` nor a normalised
copy of the ``C x D`` weight is ever allocated. The target column is masked out of the
chunks and handled per row (``O(B D)``): its cosine comes from ``e_hat_i . w_hat_{y_i}``.

The target transform ``phi`` (``combined``) and its policies:

* ``theta_overflow`` for ``m1 theta + m2 > pi`` (where ``cos`` stops being decreasing):
  ``"fallback"`` (insightface's classic rule, the default): ``phi = c - m3 - m2 sin(m2)``
  there (for ArcFace, ``m1 = 1, m3 = 0``: where ``c <= cos(pi - m)`` use ``c - m sin(m)``), with
  ``phi' = 1``; ``"clamp"``: ``m1 theta + m2`` clamped to ``pi`` (``phi = -1 - m3``, ``phi' = 0``);
  ``"none"``: plain ``cos(m1 theta + m2) - m3``.
* ``easy_margin``: ``phi`` only where ``c > 0``, plain ``c`` (``phi' = 1``) elsewhere.
* ``gradient="exact"``: ``phi'(c) = m1 sin(m1 theta + m2) / sin(theta)`` (0 in the clamped
  region, 1 in the fallback / easy region); ``gradient="insightface"``: ``phi' = 1`` everywhere
  (insightface's current ``CombinedMarginLoss``: forward ``s cos(theta + m)``, backward
  ``s (p - onehot)`` as if the target logit were ``s c``).
* ``sin(theta) = sqrt(max(1 - c^2, 0))`` with ``c`` clamped to ``[-1, 1]``; where it is exactly 0
  (``|c| = 1``: in fp32 ``sin(theta)`` is otherwise at least ~3.4e-4) ``phi'`` is taken as 0.
  There ``e_hat`` is parallel to ``w_hat``, so the gradient of ``c`` w.r.t. the raw vectors is 0
  anyway: the target's margin term contributes no gradient at exactly ``|c| = 1``, and nothing
  is divided by 0.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .linear_cross_entropy import chunk_bytes

NORM_EPS = 1e-12  # F.normalize's eps
KINDS = ("cosface", "combined", "circle")
OVERFLOW_POLICIES = ("fallback", "clamp", "none")
GRADIENTS = ("exact", "insightface")


# ----------------------------------------------------------------------------- transforms


def other_logits(c: Tensor, kind: str, s: float, m: float) -> tuple[Tensor, Tensor]:
    """Logits of the non-target classes from cosines ``c`` and ``dz/dc`` (``s c`` / Circle's ``g a_n (c - m)``)."""
    if kind == "circle":
        alpha_n = (c + m).clamp_min(0)
        return s * alpha_n * (c - m), s * alpha_n
    return s * c, torch.full_like(c, s)


def target_logit(c: Tensor, kind: str, s: float, m1: float, m2: float, m3: float, easy_margin: bool,
                 overflow: str, gradient: str) -> tuple[Tensor, Tensor]:
    """Target logit ``z_y`` and ``dz_y/dc`` (fp32 vectors) of target cosines ``c`` (see the module docstring).

    ``circle`` reads its margin from ``m2``; ``cosface`` from ``m3``."""
    if kind == "cosface":
        return s * (c - m3), torch.full_like(c, s)
    if kind == "circle":
        alpha_p = (1 + m2 - c).clamp_min(0)
        return s * alpha_p * (c - (1 - m2)), s * alpha_p
    cc = c.clamp(-1.0, 1.0)
    theta = torch.acos(cc)
    sin_theta = torch.sqrt((1 - cc * cc).clamp_min(0))
    arg = m1 * theta + m2
    phi = torch.cos(arg) - m3
    dphi = torch.where(sin_theta > 0, m1 * torch.sin(arg) / torch.where(sin_theta > 0, sin_theta, 1.0), 0.0)
    over = arg > math.pi
    if overflow == "fallback":
        phi = torch.where(over, c - m3 - m2 * math.sin(m2), phi)
        dphi = torch.where(over, 1.0, dphi)
    elif overflow == "clamp":
        phi = torch.where(over, -1.0 - m3, phi)
        dphi = torch.where(over, 0.0, dphi)
    if easy_margin:
        phi = torch.where(c > 0, phi, c)
        dphi = torch.where(c > 0, dphi, 1.0)
    if gradient == "insightface":
        dphi = torch.ones_like(dphi)
    return s * phi, s * dphi


# ----------------------------------------------------------------------------- helpers


def normalize(x: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``(x_hat, ||x||)`` of the rows of ``x``."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1)
    return x / norm.clamp_min(NORM_EPS)[:, None], norm


def normalize_backward(x_hat: Tensor, norm: Tensor, d_hat: Tensor) -> Tensor:
    """Gradient w.r.t. ``x`` of ``x_hat = x / max(||x||, eps)`` given ``d_hat = dL/dx_hat``."""
    proj = d_hat - x_hat * (x_hat * d_hat).sum(-1, keepdim=True)
    return torch.where((norm > NORM_EPS)[:, None], proj, d_hat) / norm.clamp_min(NORM_EPS)[:, None]


def _class_chunks(num_rows: int, num_classes: int, dim: int, budget: int):
    # per class: the (n, cols) cosines and ~2 fp32 temporaries, the chunk's centres, normalised
    # centres and their gradient (fp32)
    cols = max(1, budget // (4 * (3 * num_rows + 3 * dim)))
    for lo in range(0, num_classes, cols):
        yield lo, min(num_classes, lo + cols)


def _target_in_chunk(tgt: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Rows whose target lies in ``[lo, hi)`` and its column within the chunk."""
    rows = ((tgt >= lo) & (tgt < hi)).nonzero().squeeze(1)
    return rows, tgt[rows] - lo


# ----------------------------------------------------------------------------- the target column


class TargetTerms(NamedTuple):
    """The target column of the rows whose target lies in this weight (``tgt >= 0``)."""
    rows: Tensor      # (k,) row indices
    w_hat: Tensor     # (k, D) normalised target centres
    w_norm: Tensor    # (k,) their norms
    z: Tensor         # (k,) target logits z_y
    dz: Tensor        # (k,) dz_y / dc


def target_terms(e_hat: Tensor, w: Tensor, tgt: Tensor, kind: str, s: float, m1: float, m2: float, m3: float,
                 easy_margin: bool, overflow: str, gradient: str) -> TargetTerms:
    """Target logits of the rows with ``tgt >= 0``: ``O(k D)``, one centre per row."""
    rows = (tgt >= 0).nonzero().squeeze(1)
    w_hat, w_norm = normalize(w[tgt[rows]])
    c = (e_hat[rows] * w_hat).sum(-1)
    z, dz = target_logit(c, kind, s, m1, m2, m3, easy_margin, overflow, gradient)
    return TargetTerms(rows, w_hat, w_norm, z, dz)


def target_backward(e_hat: Tensor, de_hat: Tensor, dw: Tensor, tgt: Tensor, terms: TargetTerms, lse_o: Tensor,
                    z_t: Tensor, grad: Tensor) -> None:
    """Add the target column's ``g (p_y - 1) dz_y/dc`` to ``de_hat`` and ``dw`` (in place), with
    ``p_y - 1 = -sigmoid(lse^o - z_y)`` (no cancellation on confident rows)."""
    r = terms.rows
    dc = -grad[r] * torch.sigmoid(lse_o[r] - z_t[r]) * terms.dz
    de_hat.index_add_(0, r, dc[:, None] * terms.w_hat)
    dw.index_add_(0, tgt[r], normalize_backward(terms.w_hat, terms.w_norm, dc[:, None] * e_hat[r]).to(dw.dtype))


# ----------------------------------------------------------------------------- the other columns


def others_lse(e_hat: Tensor, w: Tensor, tgt: Tensor, kind: str, s: float, m: float,
               budget: int | None = None) -> Tensor:
    """fp32 ``lse^o_i``: log-sum-exp over the classes of ``w`` other than ``tgt_i`` (``-inf`` if none),
    in class chunks with an online log-sum-exp."""
    budget = budget or chunk_bytes()
    n, (C, D) = e_hat.shape[0], w.shape
    lse_o = torch.full((n,), -math.inf, dtype=torch.float32, device=e_hat.device)
    for lo, hi in _class_chunks(n, C, D, budget):
        w_hat, _ = normalize(w[lo:hi])
        z, _ = other_logits(e_hat @ w_hat.T, kind, s, m)
        rows, cols = _target_in_chunk(tgt, lo, hi)
        z[rows, cols] = -math.inf
        lse_o = torch.logaddexp(lse_o, torch.logsumexp(z, dim=1))
        del z, w_hat
    return lse_o


def others_backward(e_hat: Tensor, w: Tensor, tgt: Tensor, lse: Tensor, grad: Tensor, kind: str, s: float, m: float,
                    budget: int | None = None) -> tuple[Tensor, Tensor]:
    """``(dL/de_hat, dL/dw)`` (fp32) of the non-target columns: ``dL/dc_ij = g_i p_ij dz_ij/dc_ij`` with
    ``p_ij = exp(z_ij - lse_i)`` (``lse`` over all classes), recomputing each chunk's cosines."""
    budget = budget or chunk_bytes()
    n, (C, D) = e_hat.shape[0], w.shape
    de_hat = torch.zeros_like(e_hat)
    dw = torch.zeros((C, D), dtype=torch.float32, device=w.device)
    for lo, hi in _class_chunks(n, C, D, budget):
        w_hat, w_norm = normalize(w[lo:hi])
        z, dz = other_logits(e_hat @ w_hat.T, kind, s, m)
        dc = z.sub_(lse[:, None]).exp_().mul_(dz).mul_(grad[:, None])  # g p_j dz_j/dc_j
        rows, cols = _target_in_chunk(tgt, lo, hi)
        dc[rows, cols] = 0.0
        de_hat.addmm_(dc, w_hat)
        dw[lo:hi] = normalize_backward(w_hat, w_norm, dc.T @ e_hat)
        del z, dz, dc, w_hat
    return de_hat, dw


# ----------------------------------------------------------------------------- pair-wise Circle


def pair_circle(e: Tensor, labels: Tensor, gamma: float, m: float) -> tuple[Tensor, Tensor]:
    """Per-anchor pair-wise Circle loss of a batch and the mask of anchors that have both a positive
    and a negative (the loss is 0 elsewhere). Differentiable PyTorch over the ``B x B`` similarities
    (the batch, not the classes: ``B x B`` is the op's own size), rows of anchors in chunks.

    ``loss_i = softplus(LSE_{n: y_n != y_i} g a_n (s_in - m) + LSE_{p != i: y_p = y_i} -g a_p (s_ip - (1 - m)))``,
    ``a_n = [s_in + m]_+``, ``a_p = [1 + m - s_ip]_+`` detached, ``s = e_hat e_hat^T``.
    """
    e_hat = torch.nn.functional.normalize(e.float(), dim=-1, eps=NORM_EPS)
    n = e.shape[0]
    rows = max(1, chunk_bytes() // (4 * 6 * max(n, 1)))
    out, has_both = [], []
    idx = torch.arange(n, device=e.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        sim = e_hat[lo:hi] @ e_hat.T
        same = labels[lo:hi, None] == labels[None, :]
        pos = same & (idx[lo:hi, None] != idx[None, :])
        neg = ~same
        alpha_p = (1 + m - sim).clamp_min(0).detach()
        alpha_n = (sim + m).clamp_min(0).detach()
        both = pos.any(1) & neg.any(1)
        # rows without positives (negatives) get finite dummies: an all -inf LSE has a NaN gradient
        logit_p = (-gamma * alpha_p * (sim - (1 - m))).masked_fill(~pos & both[:, None], -math.inf)
        logit_n = (gamma * alpha_n * (sim - m)).masked_fill(~neg & both[:, None], -math.inf)
        x = torch.logsumexp(logit_p, 1) + torch.logsumexp(logit_n, 1)
        out.append(torch.where(both, torch.nn.functional.softplus(torch.where(both, x, 0.0)), 0.0))
        has_both.append(both)
    return torch.cat(out), torch.cat(has_both)
