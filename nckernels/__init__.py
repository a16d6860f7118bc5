"""nckernels: fused loss and statistics kernels for classification heads at scale."""
from .functional import linear_cross_entropy
from .modules import CutCrossEntropyLoss

__all__ = ["linear_cross_entropy", "CutCrossEntropyLoss"]
__version__ = "0.1.0"
