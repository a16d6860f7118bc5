"""``nn.Module`` wrappers of the functional ops: drop-in losses."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F


class CutCrossEntropyLoss(nn.Module):
    """Module form of :func:`nckernels.linear_cross_entropy`; ``forward(input, linear_weight,
    target, linear_bias=None)``. Options as in the function; ``weight`` is a buffer."""

    def __init__(self, weight: Optional[Tensor] = None, *, reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                 shift: bool = False, return_lse: bool = False, grad_filter: Optional[float] = None,
                 impl: str = "auto"):
        super().__init__()
        self.register_buffer("weight", weight)
        self.options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, shift=shift, return_lse=return_lse,
                            grad_filter=grad_filter, impl=impl)

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor] = None):
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                      **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
