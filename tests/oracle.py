"""Naive float64 oracles: the full logits, plain torch ops, no nckernels code.

Every backend of an op is tested against these, on the same random inputs. They are written
for clarity, not memory: the ``N x V`` logits are materialised in float64. Gradients come
from autograd through the oracle (the tests pass float64 leaf copies of the inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def linear_cross_entropy_oracle(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    shift: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(loss, lse)`` of linear cross-entropy, in float64.

    ``z = x W^T + b``; optional soft-cap ``z = c tanh(z / c)``; ``lse = logsumexp(z)``;
    per non-ignored token with class weights ``w`` (ones when absent) and smoothing ``eps``::

        loss_i = (1 - eps) w_y (lse_i - z_iy) + eps / V sum_j w_j (lse_i - z_ij) + z_loss w_y lse_i^2

    (PyTorch's ``cross_entropy`` with ``weight`` and ``label_smoothing``, plus the z-loss);
    ignored tokens contribute 0. ``mean`` divides the sum by ``sum_i w_{y_i}`` over the
    non-ignored tokens (0/0 = NaN when all are ignored). ``shift=True``: ``input[..., t, :]``
    predicts ``target[..., t + 1]``, and the unreduced loss / lse have shape
    ``target.shape[:-1] + (T - 1,)``. ``lse`` is the per-token log-sum-exp with the shape of
    the unreduced loss, 0 at ignored tokens.
    """
    x = input.double()
    W = linear_weight.double()
    tgt = target.long()
    if shift:
        x = x[..., :-1, :]
        tgt = tgt[..., 1:]
    V = W.shape[0]
    z = x @ W.T  # (..., V)
    if linear_bias is not None:
        z = z + linear_bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)

    valid = tgt != ignore_index
    safe_tgt = torch.where(valid, tgt, torch.zeros_like(tgt))
    if bool(((safe_tgt < 0) | (safe_tgt >= V)).any()):
        raise ValueError("oracle: target out of range")
    w = weight.double() if weight is not None else torch.ones(V, dtype=torch.float64, device=z.device)
    w_y = w[safe_tgt]
    z_y = z.gather(-1, safe_tgt.unsqueeze(-1)).squeeze(-1)

    eps = label_smoothing
    loss = (1 - eps) * w_y * (lse - z_y)
    loss = loss + eps / V * ((lse.unsqueeze(-1) - z) * w).sum(-1)
    loss = loss + z_loss * w_y * lse * lse

    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    loss = torch.where(valid, loss, zero)
    lse = torch.where(valid, lse, zero)
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    elif reduction == "mean":
        out = loss.sum() / torch.where(valid, w_y, zero).sum()
    else:
        raise ValueError(reduction)
    return out, lse
