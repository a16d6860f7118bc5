"""nckernels: fused loss and statistics kernels for classification heads at scale."""
from .functional import (
    SoftmaxCollapse,
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

__all__ = [
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
