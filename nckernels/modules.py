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


# ----------------------------------------------------------------------------- margin losses (issue 6)


class _MarginHead(nn.Module):
    """A margin loss holding its class centres: ``weight`` is an fp32 ``(num_classes, embedding_size)``
    ``nn.Parameter`` (initialised ``N(0, 0.01)``, as insightface); ``forward(embeddings, target)``.

    The centres stay fp32 under ``torch.autocast``: bf16/fp16 embeddings are upcast inside the
    op, which normalises and computes in fp32; the weight's gradient is fp32."""

    _fn = None

    def __init__(self, num_classes: int, embedding_size: int, *, reduction: str = "mean", ignore_index: int = -100,
                 impl: str = "auto", **options):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=0.01)
        self.options = dict(options, reduction=reduction, ignore_index=ignore_index, impl=impl)

    def forward(self, embeddings: Tensor, target: Tensor) -> Tensor:
        return type(self)._fn(embeddings, self.weight, target, **self.options)

    def extra_repr(self) -> str:
        C, D = self.weight.shape
        return f"num_classes={C}, embedding_size={D}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class CosFaceLoss(_MarginHead):
    """Module form of :func:`nckernels.cosface_loss` (``scale=64.0, margin=0.35``) with its class centres."""

    _fn = staticmethod(F.cosface_loss)

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float = 64.0, margin: float = 0.35,
                 reduction: str = "mean", ignore_index: int = -100, impl: str = "auto"):
        super().__init__(num_classes, embedding_size, reduction=reduction, ignore_index=ignore_index, impl=impl,
                         scale=scale, margin=margin)


class ArcFaceLoss(_MarginHead):
    """Module form of :func:`nckernels.arcface_loss` (``scale=64.0, margin=0.5`` radians) with its class centres."""

    _fn = staticmethod(F.arcface_loss)

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, theta_overflow: str = "fallback", gradient: str = "exact",
                 reduction: str = "mean", ignore_index: int = -100, impl: str = "auto"):
        super().__init__(num_classes, embedding_size, reduction=reduction, ignore_index=ignore_index, impl=impl,
                         scale=scale, margin=margin, easy_margin=easy_margin, theta_overflow=theta_overflow,
                         gradient=gradient)


class CombinedMarginLoss(_MarginHead):
    """Module form of :func:`nckernels.combined_margin_loss` (``s (cos(m1 theta + m2) - m3)``) with its centres."""

    _fn = staticmethod(F.combined_margin_loss)

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, easy_margin: bool = False, theta_overflow: str = "fallback",
                 gradient: str = "exact", reduction: str = "mean", ignore_index: int = -100, impl: str = "auto"):
        super().__init__(num_classes, embedding_size, reduction=reduction, ignore_index=ignore_index, impl=impl,
                         scale=scale, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin, theta_overflow=theta_overflow,
                         gradient=gradient)


class CircleLoss(_MarginHead):
    """Module form of the class-level :func:`nckernels.circle_loss` (``gamma=256.0, margin=0.25``) with its centres."""

    _fn = staticmethod(F.circle_loss)

    def __init__(self, num_classes: int, embedding_size: int, *, gamma: float = 256.0, margin: float = 0.25,
                 reduction: str = "mean", ignore_index: int = -100, impl: str = "auto"):
        super().__init__(num_classes, embedding_size, reduction=reduction, ignore_index=ignore_index, impl=impl,
                         gamma=gamma, margin=margin)


class PairCircleLoss(nn.Module):
    """Module form of :func:`nckernels.pair_circle_loss` (``gamma=80.0, margin=0.4``); ``forward(embeddings,
    labels)``; no parameters (the pairs come from the batch)."""

    def __init__(self, *, gamma: float = 80.0, margin: float = 0.4, reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        self.options = dict(gamma=gamma, margin=margin, reduction=reduction, impl=impl)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return F.pair_circle_loss(embeddings, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
