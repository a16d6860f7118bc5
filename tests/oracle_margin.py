"""Naive float64 oracles of the margin losses: the full ``B x C`` cosines, plain torch ops, no nckernels code.

Written from the papers' formulas, for clarity, not memory. Gradients come from autograd
through the oracle (tests pass float64 leaf copies of the inputs): ``acos`` and friends
differentiate themselves, Circle's alphas are ``.detach()``-ed, and insightface's gradient is
reproduced with the straight-through trick ``s cos + (s phi - s cos).detach()``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _reduce(loss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()  # 0/0 = NaN when every row is ignored


def margin_oracle(embeddings: Tensor, weight: Tensor, target: Tensor, *, kind: str, scale: float = 64.0,
                  margin: float = 0.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, easy_margin: bool = False,
                  theta_overflow: str = "fallback", gradient: str = "exact", reduction: str = "mean",
                  ignore_index: int = -100) -> Tensor:
    """Float64 loss of ``kind`` in ``cosface`` (``margin``), ``arcface`` (``margin``), ``combined``
    (``m1, m2, m3``), ``circle`` (``scale`` = gamma, ``margin``)."""
    e, w = embeddings.double(), weight.double()
    cos = _unit(e) @ _unit(w).T  # (B, C)
    valid = target != ignore_index
    t = torch.where(valid, target, 0).long()
    onehot = torch.nn.functional.one_hot(t, w.shape[0]).bool()
    cos_t = cos.gather(1, t[:, None]).squeeze(1)
    s = scale
    if kind == "cosface":
        others = s * cos
        z_t = s * (cos_t - margin)
    elif kind == "circle":
        m = margin
        others = s * torch.relu(cos + m).detach() * (cos - m)
        z_t = s * torch.relu(1 + m - cos_t).detach() * (cos_t - (1 - m))
    else:
        if kind == "arcface":
            m1, m2, m3 = 1.0, margin, 0.0
        theta = torch.acos(cos_t)
        angle = m1 * theta + m2
        if theta_overflow == "clamp":
            phi = torch.cos(torch.clamp(angle, max=math.pi)) - m3
        else:
            phi = torch.cos(angle) - m3
        if theta_overflow == "fallback":
            if kind == "arcface":  # insightface's rule, as written there
                th, mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
                phi = torch.where(cos_t > th, phi, cos_t - mm)
            else:
                phi = torch.where(angle <= math.pi, phi, cos_t - m3 - m2 * math.sin(m2))
        if easy_margin:
            phi = torch.where(cos_t > 0, phi, cos_t)
        others = s * cos
        z_t = s * phi
        if gradient == "insightface":
            z_t = s * cos_t + (s * phi - s * cos_t).detach()
    logits = torch.where(onehot, z_t[:, None], others)
    loss = torch.logsumexp(logits, dim=1) - z_t
    return _reduce(loss, valid, reduction)


def pair_circle_oracle(embeddings: Tensor, labels: Tensor, *, gamma: float, margin: float,
                       reduction: str = "mean") -> Tensor:
    """Float64 pair-wise Circle loss, one anchor at a time (pytorch-metric-learning's averaging)."""
    e = _unit(embeddings.double())
    B, m = e.shape[0], margin
    losses, has = [], []
    for i in range(B):
        pos = [j for j in range(B) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(B) if labels[j] != labels[i]]
        if not pos or not neg:
            losses.append(torch.zeros((), dtype=torch.float64))
            has.append(False)
            continue
        sp = torch.stack([e[i] @ e[j] for j in pos])
        sn = torch.stack([e[i] @ e[j] for j in neg])
        lp = -gamma * torch.relu(1 + m - sp).detach() * (sp - (1 - m))
        ln = gamma * torch.relu(sn + m).detach() * (sn - m)
        losses.append(torch.nn.functional.softplus(torch.logsumexp(ln, 0) + torch.logsumexp(lp, 0)))
        has.append(True)
    loss = torch.stack(losses)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(1, sum(has))
