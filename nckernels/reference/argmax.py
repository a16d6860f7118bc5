"""Running argmax of implicit logits (DESIGN family 1's argmax reduction): the executable spec.

``linear_argmax(x, w, b)[i] = argmax_j (x_i . w_j + b_j)`` over class chunks, never ``N x C``:
ties go to the smallest index (like ``torch.argmax``), NaN logits never win, and a row whose
logits are all ``-inf`` (or ``C = 0``) gets ``-1``. Logits are computed in the dtype of ``x``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .linear_cross_entropy import chunk_bytes


def linear_argmax(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    N, C = x.shape[0], w.shape[0]
    best = torch.full((N,), -float("inf"), dtype=torch.float32, device=x.device)
    index = torch.full((N,), -1, dtype=torch.int64, device=x.device)
    step = max(1, chunk_bytes() // (4 * max(N, 1)))
    for start in range(0, C, step):
        z = (x @ w[start:start + step].T).float()
        if bias is not None:
            z = z + bias[start:start + step].float()
        z = z.nan_to_num(nan=-float("inf"), posinf=float("inf"), neginf=-float("inf"))
        value, arg = z.max(1)  # first maximum of the chunk
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, arg + start, index)
    return index
