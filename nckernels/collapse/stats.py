"""Streaming per-class statistics: counts, means, residual sums of squares, pooled scatter.

:class:`ClassStats` accumulates, over any number of batches and ranks, for every class ``c``::

    n_c     number of rows labelled c                          (int64)
    mu_c    their mean                                         (float64, D)
    M2_c    sum ||h - mu_c||^2 over them                       (float64)
    S_W     sum_i (h_i - mu_{y_i}) (h_i - mu_{y_i})^T          (float64, D x D, optional)
    S_c     sum_{y_i = c} (h_i - mu_c) (h_i - mu_c)^T          (float64, D x D, chosen classes only)

Two partial states ``a`` and ``b`` merge exactly with Chan's formula: with ``n = n_a + n_b`` and
``delta = mu_b - mu_a``::

    mu  = mu_a + delta n_b / n
    M2  = M2_a + M2_b + ||delta||^2 n_a n_b / n
    S   = S_a  + S_b  + delta delta^T n_a n_b / n          (per class, summed over classes for S_W)

so one big update, many small ones, a merge of shards and an all-reduce over ranks agree to
rounding (float64). Memory is O(C D) (+ D x D), independent of the number of rows.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import functional as F
from ..reference.segment import class_scatter

_STATE_VERSION = 1


class ClassStats:
    """Streaming accumulator of per-class statistics of features ``(..., dim)`` by label.

    Args:
        num_classes: number of classes ``C`` (labels in ``[0, C)``).
        dim: feature width ``D``.
        track_within_cov: also accumulate the pooled within-class scatter ``S_W`` (``D x D``),
            needed for Papyan's ``Tr(Sigma_W Sigma_B^+)``.
        cov_classes: optional class indices whose full ``D x D`` covariance is accumulated.
        ignore_index: label of rows to skip.
        device: where the state lives (default: CPU).
        impl: backend of the per-batch reduction (see :func:`nckernels.class_stats`).
    """

    def __init__(self, num_classes: int, dim: int, *, track_within_cov: bool = False,
                 cov_classes: Optional[Sequence[int]] = None, ignore_index: int = -100,
                 device: Optional[torch.device | str] = None, impl: str = "auto"):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        device = torch.device(device if device is not None else "cpu")
        self.num_classes, self.dim = num_classes, dim
        self.ignore_index, self.impl = ignore_index, impl
        self._counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self._means = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self._scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device) if track_within_cov else None
        self._cov_classes = None
        self._class_scatter = None
        if cov_classes is not None:
            classes = torch.as_tensor(list(cov_classes), dtype=torch.int64)
            if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes or
                                    classes.unique().numel() != classes.numel()):
                raise ValueError(f"cov_classes must be distinct class indices in [0, {num_classes}), got "
                                 f"{classes.tolist()}")
            self._cov_classes = classes.to(device)
            self._class_scatter = torch.zeros(len(classes), dim, dim, dtype=torch.float64, device=device)

    # ------------------------------------------------------------------ accumulation
    @property
    def device(self) -> torch.device:
        return self._counts.device

    @property
    def track_within_cov(self) -> bool:
        return self._scatter is not None

    @property
    def cov_classes(self) -> Optional[Tensor]:
        return self._cov_classes

    def update(self, features: Tensor, labels: Tensor) -> "ClassStats":
        """Add a batch: ``features (..., D)``, ``labels (...)`` (``ignore_index`` rows skipped).

        The batch is reduced over the classes it contains only (labels renumbered ``0..k-1``), so
        an update costs O(rows D + k D), not O(C D), however large the vocabulary.
        """
        if features.shape[-1:] != (self.dim,):
            raise ValueError(f"features must have last dim {self.dim}, got shape {tuple(features.shape)}")
        rows, y = F._check_labels(features, labels, self.num_classes, self.ignore_index)
        valid = y != self.ignore_index
        present = torch.unique(y[valid])
        if present.numel() == 0:
            return self
        compact = torch.where(valid, torch.searchsorted(present, y), -1)
        batch = F.class_stats(rows, compact, present.numel(), ignore_index=-1, within_cov=self.track_within_cov,
                              impl=self.impl)
        counts, sums, m2 = batch[:3]
        means = sums / counts.unsqueeze(1)
        scatter = batch.scatter.to(self.device) if self.track_within_cov else None
        cls = None
        if self._cov_classes is not None:
            classes = self._cov_classes.to(rows.device)
            slot = torch.searchsorted(present, classes).clamp(max=present.numel() - 1)
            found = present[slot] == classes
            cov_means = torch.where(found.unsqueeze(1), means[slot], 0.0)
            cls = class_scatter(rows, y, classes, cov_means, self.ignore_index).to(self.device)
        dev = self.device
        self._merge(present.to(dev), counts.to(dev), means.to(dev), m2.to(dev), scatter, cls)
        return self

    def merge(self, other: "ClassStats") -> "ClassStats":
        """Fold another accumulator (same classes, width and tracking) into this one, exactly."""
        self._check_compatible(other)
        dev = self.device
        idx = (other._counts > 0).nonzero().squeeze(1)
        self._merge(idx.to(dev), other._counts[idx].to(dev), other._means[idx].to(dev), other._m2[idx].to(dev),
                    None if other._scatter is None else other._scatter.to(dev),
                    None if other._class_scatter is None else other._class_scatter.to(dev))
        return self

    def _merge(self, idx, n_b, mu_b, m2_b, scatter_b, class_scatter_b):
        """Chan's merge of part ``b`` (rows of the sorted classes ``idx``) into the state."""
        if idx.numel() == 0:  # no rows: nothing to add (b's scatters are zero)
            return
        n_a = self._counts[idx]
        mu_a = self._means[idx]
        n = n_a + n_b
        delta = mu_b - mu_a
        n_a, n_b, total = n_a.double(), n_b.double(), n.clamp(min=1).double()
        cross = n_a * n_b / total  # 0 when either part has no rows of the class
        self._means[idx] = mu_a + delta * (n_b / total).unsqueeze(1)
        self._m2[idx] += m2_b + delta.square().sum(1) * cross
        self._counts[idx] = n
        if self._scatter is not None:
            self._scatter += scatter_b + (delta * cross.unsqueeze(1)).T @ delta
        if self._class_scatter is not None:
            slot = torch.searchsorted(idx, self._cov_classes).clamp(max=idx.numel() - 1)
            found = idx[slot] == self._cov_classes
            d = delta[slot] * found.unsqueeze(1)
            self._class_scatter += class_scatter_b + (cross[slot] * found)[:, None, None] * (d.unsqueeze(2) * d.unsqueeze(1))

    def all_reduce(self, group=None) -> "ClassStats":
        """Replace this rank's state by the merge of every rank's state (collective; all ranks call it).

        Two rounds of ``all_reduce(SUM)`` of O(C D) (+ D x D) float64: the global counts and sums,
        then each rank's ``M2_r + n_r ||mu_r - mu||^2`` (and ``S_r + sum_c n_rc delta delta^T``)
        about the global means ``mu``: Chan's formula for any number of parts.
        """
        import torch.distributed as dist

        counts = self._counts.clone()
        dist.all_reduce(counts, group=group)
        sums = self._means * self._counts.unsqueeze(1).double()
        dist.all_reduce(sums, group=group)
        means = sums / counts.clamp(min=1).unsqueeze(1).double()
        delta = self._means - means
        local = self._counts.double()
        m2 = self._m2 + delta.square().sum(1) * local
        dist.all_reduce(m2, group=group)
        if self._scatter is not None:
            self._scatter += (delta * local.unsqueeze(1)).T @ delta
            dist.all_reduce(self._scatter, group=group)
        if self._class_scatter is not None:
            d = delta[self._cov_classes]
            self._class_scatter += local[self._cov_classes, None, None] * (d.unsqueeze(2) * d.unsqueeze(1))
            dist.all_reduce(self._class_scatter, group=group)
        self._counts, self._means, self._m2 = counts, means, m2
        return self

    # ------------------------------------------------------------------ results
    @property
    def total(self) -> int:
        """Number of rows accumulated."""
        return int(self._counts.sum())

    @property
    def counts(self) -> Tensor:
        """Rows per class (int64, ``C``)."""
        return self._counts.clone()

    @property
    def means(self) -> Tensor:
        """Class means ``mu_c`` (float64, ``C x D``); NaN rows for classes never seen."""
        return self._means.masked_fill((self._counts == 0).unsqueeze(1), float("nan"))

    @property
    def m2(self) -> Tensor:
        """``M2_c = sum ||h - mu_c||^2`` per class (float64, ``C``)."""
        return self._m2.clone()

    @property
    def variances(self) -> Tensor:
        """Biased per-class variance ``tr Sigma_c = M2_c / n_c`` (NaN where ``n_c = 0``)."""
        return self._m2 / self._counts.double().where(self._counts > 0, float("nan"))

    @property
    def unbiased_variances(self) -> Tensor:
        """Unbiased per-class variance ``M2_c / (n_c - 1)`` (NaN where ``n_c < 2``)."""
        return self._m2 / (self._counts.double() - 1).where(self._counts > 1, float("nan"))

    def global_mean(self, weighted: bool = False, min_count: int = 1) -> Tensor:
        """``mu_G``: the mean of the class means (``weighted=False``, Papyan's convention) or the
        sample mean ``sum_c n_c mu_c / N`` (``weighted=True``), over classes with ``n_c >= min_count``."""
        keep = self._counts >= max(min_count, 1)
        if weighted:
            w = self._counts.double() * keep
            return (self._means * w.unsqueeze(1)).sum(0) / w.sum()
        return self._means[keep].mean(0)

    @property
    def within_cov(self) -> Tensor:
        """Pooled within-class covariance ``Sigma_W = S_W / N`` (float64, ``D x D``)."""
        if self._scatter is None:
            raise RuntimeError("within_cov needs ClassStats(..., track_within_cov=True)")
        return self._scatter / max(self.total, 1)

    @property
    def class_covs(self) -> Tensor:
        """Biased covariance ``S_c / n_c`` of each of ``cov_classes`` (float64, ``k x D x D``)."""
        if self._class_scatter is None:
            raise RuntimeError("class_covs needs ClassStats(..., cov_classes=[...])")
        n = self._counts[self._cov_classes].double()
        return self._class_scatter / n.where(n > 0, float("nan"))[:, None, None]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """A snapshot of the state (CPU copies; later updates do not change it)."""
        def copy(t):
            return None if t is None else t.detach().to("cpu", copy=True)

        return {
            "version": _STATE_VERSION, "num_classes": self.num_classes, "dim": self.dim,
            "ignore_index": self.ignore_index, "counts": copy(self._counts), "means": copy(self._means),
            "m2": copy(self._m2), "scatter": copy(self._scatter), "cov_classes": copy(self._cov_classes),
            "class_scatter": copy(self._class_scatter),
        }

    def load_state_dict(self, state: dict) -> "ClassStats":
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported ClassStats state version {state.get('version')!r}")
        if (state["num_classes"], state["dim"]) != (self.num_classes, self.dim):
            raise ValueError(f"state has num_classes={state['num_classes']}, dim={state['dim']}; this "
                             f"accumulator has num_classes={self.num_classes}, dim={self.dim}")
        if (state["scatter"] is None) == self.track_within_cov:
            raise ValueError("state and accumulator disagree on track_within_cov")
        theirs = state["cov_classes"]
        if (theirs is None) != (self._cov_classes is None) or (
                theirs is not None and not torch.equal(theirs, self._cov_classes.cpu())):
            raise ValueError("state and accumulator track different cov_classes")
        def own(key, dtype):
            return state[key].to(self.device, dtype, copy=True)

        self._counts, self._means, self._m2 = own("counts", torch.int64), own("means", torch.float64), own("m2", torch.float64)
        if self._scatter is not None:
            self._scatter = own("scatter", torch.float64)
        if self._class_scatter is not None:
            self._class_scatter = own("class_scatter", torch.float64)
        return self

    def _check_compatible(self, other: "ClassStats"):
        if not isinstance(other, ClassStats):
            raise TypeError(f"other must be a ClassStats, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(f"cannot merge ClassStats of (C={other.num_classes}, D={other.dim}) into "
                             f"(C={self.num_classes}, D={self.dim})")
        if other.track_within_cov != self.track_within_cov:
            raise ValueError("cannot merge ClassStats that disagree on track_within_cov")
        if (other._cov_classes is None) != (self._cov_classes is None) or (
                other._cov_classes is not None and not torch.equal(other._cov_classes.cpu(), self._cov_classes.cpu())):
            raise ValueError("cannot merge ClassStats that track different cov_classes")

    def __repr__(self) -> str:
        seen = int((self._counts > 0).sum())
        return (f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, rows={self.total}, "
                f"classes_seen={seen}, track_within_cov={self.track_within_cov})")
