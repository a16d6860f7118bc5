"""Sharded classification heads over ``torch.distributed`` (issue 6).

One mechanism, the sharded log-sum-exp (:mod:`.sharded_lse`): each rank reduces its slice of the
classes with the single-device fused op, per-row statistics are combined with all-reduces of
``O(rows)``, and the backward recomputes each slice locally. Two heads are built on it:

* :func:`vocab_parallel_cross_entropy`: :func:`nckernels.linear_cross_entropy` with the LM head split
  over a tensor-parallel group (hidden states replicated);
* :class:`PartialFC`: margin losses (CosFace, ArcFace, combined, Circle) with the class centres
  sharded over a data-parallel group and sampled per step.

Without an initialised process group every function runs as a group of one.
"""
from ..functional import MARGIN_LOSSES, MarginSpec, margin_spec
from .partial_fc import PartialFC
from .sharded_lse import ShardedHead, all_reduce_logsumexp, sharded_logsumexp, sharded_rows
from .vocab_parallel import vocab_parallel_cross_entropy

__all__ = [
    "MARGIN_LOSSES",
    "MarginSpec",
    "PartialFC",
    "ShardedHead",
    "all_reduce_logsumexp",
    "margin_spec",
    "sharded_logsumexp",
    "sharded_rows",
    "vocab_parallel_cross_entropy",
]
