"""nckernels: fused loss and statistics kernels for classification heads at scale."""
from .functional import (
    ClassStatsResult,
    ClassStatsWithScatter,
    SoftmaxCollapse,
    class_stats,
    cross_entropy,
    linear_cross_entropy,
    linear_stablemax_cross_entropy,
    log_softmax,
    log_stablemax,
    logsumexp,
    softmax,
    softmax_collapse,
    stablemax,
    stablemax_cross_entropy,
    cosface_loss,
    arcface_loss,
    combined_margin_loss,
    circle_loss,
    pair_circle_loss,
)
from .modules import ArcFaceLoss, CircleLoss, CombinedMarginLoss, CosFaceLoss, CutCrossEntropyLoss, PairCircleLoss
from . import collapse  # noqa: E402  (nckernels.collapse.ClassStats, .metrics)
from . import distributed  # noqa: E402  (nckernels.distributed.PartialFC, .vocab_parallel_cross_entropy)

__all__ = [
    "ClassStatsResult",
    "ClassStatsWithScatter",
    "class_stats",
    "collapse",
    "CutCrossEntropyLoss",
    "SoftmaxCollapse",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_stablemax_cross_entropy",
    "log_softmax",
    "log_stablemax",
    "logsumexp",
    "softmax",
    "softmax_collapse",
    "stablemax",
    "stablemax_cross_entropy",
    # margin losses (issue 6)
    "cosface_loss",
    "arcface_loss",
    "combined_margin_loss",
    "circle_loss",
    "pair_circle_loss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "CircleLoss",
    "PairCircleLoss",
    "distributed",
]
__version__ = "0.1.0"
