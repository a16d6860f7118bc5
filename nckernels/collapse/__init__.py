"""Neural-collapse measurement: streaming class statistics and the NC metrics built on them.

    stats = nckernels.collapse.ClassStats(num_classes, dim, track_within_cov=True)
    for h, y in batches:
        stats.update(h, y)
    report = nckernels.collapse.metrics.compute(stats, weight=lm_head.weight)
"""
from . import metrics
from .metrics import NC4Agreement, compute, nc4_predictions, per_class
from .stats import ClassStats

__all__ = ["ClassStats", "NC4Agreement", "compute", "metrics", "nc4_predictions", "per_class"]
