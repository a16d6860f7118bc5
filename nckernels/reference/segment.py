"""Per-class statistics of features grouped by label (DESIGN family 2): the executable spec.

For rows ``h_i`` (``N x D``) with labels ``y_i`` (rows labelled ``ignore_index`` skipped)::

    counts_c = #{i : y_i = c}
    sums_c   = sum_{y_i = c} h_i
    m2_c     = sum_{y_i = c} ||h_i - mean_c||^2,   mean_c = sums_c / counts_c
    scatter  = sum_i (h_i - mean_{y_i}) (h_i - mean_{y_i})^T        (pooled, D x D, optional)

``m2`` is taken about the batch's *own* class means, so batches merge exactly with Chan's formula
(``nckernels.collapse.ClassStats``). Features are upcast to float64 before any subtraction and
the residuals are formed explicitly (two passes): the one-pass ``sum h^2 - (sum h)^2 / n`` form
loses every digit of a class whose ``||mean||^2 / tr(Sigma)`` is 1e6. Rows are processed in chunks
of at most :func:`chunk_rows` so that the float64 copies stay bounded.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .linear_cross_entropy import chunk_bytes


def chunk_rows(dim: int) -> int:
    """Rows per chunk so that a float64 copy of a chunk (and its residuals) fits the chunk budget."""
    return max(1, chunk_bytes() // (16 * max(dim, 1)))


def _chunks(features: Tensor, labels: Tensor, ignore_index: int):
    step = chunk_rows(features.shape[1])
    for start in range(0, features.shape[0], step):
        y = labels[start:start + step]
        keep = y != ignore_index
        yield features[start:start + step][keep].double(), y[keep].long()


def segment_stats(features: Tensor, labels: Tensor, num_classes: int, ignore_index: int):
    """``(counts int64 (C,), sums float64 (C, D), m2 float64 (C,))``; empty classes are 0."""
    D = features.shape[1]
    counts = torch.zeros(num_classes, dtype=torch.int64, device=features.device)
    sums = torch.zeros(num_classes, D, dtype=torch.float64, device=features.device)
    for h, y in _chunks(features, labels, ignore_index):
        counts += torch.bincount(y, minlength=num_classes)
        sums.index_add_(0, y, h)
    means = sums / counts.clamp(min=1).unsqueeze(1)
    m2 = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    for h, y in _chunks(features, labels, ignore_index):
        m2.index_add_(0, y, (h - means[y]).square().sum(1))
    return counts, sums, m2


def within_scatter(features: Tensor, labels: Tensor, means: Tensor, ignore_index: int) -> Tensor:
    """Pooled within-class scatter ``sum_i r_i r_i^T``, ``r_i = h_i - means[y_i]`` (float64, D x D)."""
    D = features.shape[1]
    scatter = torch.zeros(D, D, dtype=torch.float64, device=features.device)
    for h, y in _chunks(features, labels, ignore_index):
        r = h - means[y]
        scatter.addmm_(r.T, r)
    return scatter


def class_scatter(features: Tensor, labels: Tensor, classes: Tensor, means: Tensor, ignore_index: int) -> Tensor:
    """Per-class scatter ``sum_{y_i = c} r_i r_i^T`` for each class in ``classes`` (float64, k x D x D).

    ``means`` holds the batch means of ``classes`` (k x D).
    """
    D = features.shape[1]
    out = torch.zeros(len(classes), D, D, dtype=torch.float64, device=features.device)
    for h, y in _chunks(features, labels, ignore_index):
        for k, c in enumerate(classes.tolist()):
            r = h[y == c] - means[k]
            out[k].addmm_(r.T, r)
    return out
