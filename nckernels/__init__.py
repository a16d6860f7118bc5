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
)
from .modules import CutCrossEntropyLoss
from . import collapse  # noqa: E402  (nckernels.collapse.ClassStats, .metrics)

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
]
__version__ = "0.1.0"
