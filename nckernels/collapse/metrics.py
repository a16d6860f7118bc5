"""Neural-collapse metrics from accumulated class statistics (:class:`ClassStats`).

Notation: over the *included* classes (``n_c >= min_count``; ``K`` of them, ``N`` rows) with
means ``mu_c``, the global mean ``mu_G`` (mean of the class means by default, or the sample mean),
centred means ``m_c = mu_c - mu_G`` (rows of ``M``), per-class variances ``sigma_c^2 = tr Sigma_c``
(``M2_c / n_c``, or ``M2_c / (n_c - 1)`` with ``unbiased=True``) and classifier rows ``w_c``:

=====================  ====================================================================
key                    definition
=====================  ====================================================================
``nc1_pinv``           ``Tr(Sigma_W Sigma_B^+) / K`` (Papyan et al. 2020), ``Sigma_W = S_W / N``
                       (pooled scatter of *all* classes: needs ``track_within_cov``),
                       ``Sigma_B = M^T M / K``
``nc1_quotient``       ``Tr Sigma_W / Tr Sigma_B = (sum_c M2_c / N) / (sum_c ||m_c||^2 / K)``
``cdnv``               mean over pairs ``c < c'`` of ``(sigma_c^2 + sigma_c'^2) / (2 ||mu_c - mu_c'||^(2p))``,
                       ``p = cdnv_power``: 1 (Galanti et al.), 2 (Wu & Papyan 2024); duplicate means skipped
``equinorm_means``     coefficient of variation (std / mean, population std) of ``||m_c||``
``equinorm_weights``   CoV of ``||w_c||``                                        (needs ``weight``)
``equiangularity``     std over pairs of ``cos(m_c, m_c')``
``max_angle``          mean over pairs of ``|cos(m_c, m_c') + 1 / (K - 1)|``
``gnc2_mean/var``      mean / variance over pairs of ``log(1 / ||u_c - u_c'||)``, ``u = m / ||m||`` (GNC2,
                       Liu et al. 2023; the hyperspherical-uniformity kernel of Wu & Papyan)
``nc3_duality``        ``|| W / ||W||_F - M / ||M||_F ||_F^2``                    (needs ``weight``)
``nc3_mean_cos``       mean of ``cos(w_c, m_c)``                                  (needs ``weight``)
``unc3``               CoV of ``cos(w_c, m_c)``                                   (needs ``weight``)
``nc4``                fraction of held-out tokens on which the nearest-class-mean classifier
                       ``argmin_c ||h - mu_c||`` (included classes only) agrees with the linear
                       classifier ``argmax_c (w_c . h + b_c)`` (all classes)     (needs ``nc4=``)
``nc4_class_mean``     mean over classes (of the tokens' labels) of the per-class agreement
=====================  ====================================================================

Pair statistics come from the pairwise Gram reduction (``kernels/pairwise.py`` on GPU): the
``K x K`` matrix never exists. NC4 comes from :func:`nc4_predictions`: two running argmaxes over
class tiles, no ``N x C`` matrix.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from ..functional import _check_labels
from ..ops.collapse import linear_argmax, pair_stats
from .stats import ClassStats

GLOBAL_MEANS = ("class_means", "sample")


def _cov(x: Tensor) -> float:
    """Coefficient of variation ``std / mean`` (population std)."""
    if x.numel() == 0:
        return math.nan
    return float(x.std(correction=0) / x.mean())


def _check_weight(stats: ClassStats, weight: Optional[Tensor], bias: Optional[Tensor]):
    if weight is not None and (not isinstance(weight, Tensor) or weight.shape != (stats.num_classes, stats.dim)):
        raise ValueError(f"weight must be a ({stats.num_classes}, {stats.dim}) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (stats.num_classes,)):
        raise ValueError(f"bias must be a ({stats.num_classes},) tensor")


def included_classes(stats: ClassStats, min_count: int = 1, unbiased: bool = False) -> Tensor:
    """Boolean mask of the classes a metric uses: ``n_c >= min_count`` (``>= 2`` when ``unbiased``,
    since a single sample has no unbiased variance)."""
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
    return stats.counts >= max(min_count, 2 if unbiased else 1)


def per_class(stats: ClassStats, weight: Optional[Tensor] = None, *, global_mean: str = "class_means",
              unbiased: bool = False, min_count: int = 1) -> dict:
    """Per-class tensors (length ``C``; NaN for excluded classes): ``count``, ``included``,
    ``mean_norm`` ``||mu_c - mu_G||``, ``variance`` ``sigma_c^2`` and, with ``weight``,
    ``weight_norm`` ``||w_c||`` and ``weight_cos`` ``cos(w_c, mu_c - mu_G)``."""
    if global_mean not in GLOBAL_MEANS:
        raise ValueError(f"global_mean must be one of {GLOBAL_MEANS}, got {global_mean!r}")
    _check_weight(stats, weight, None)
    keep = included_classes(stats, min_count, unbiased)
    mu_g = stats.global_mean(weighted=global_mean == "sample", min_count=max(min_count, 2 if unbiased else 1))
    centred = stats.means - mu_g
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=stats.device)
    variance = stats.unbiased_variances if unbiased else stats.variances
    out = {"count": stats.counts, "included": keep, "mean_norm": centred.norm(dim=1).where(keep, nan),
           "variance": variance.where(keep, nan)}
    if weight is not None:
        w = weight.to(stats.device, torch.float64)
        out["weight_norm"] = w.norm(dim=1)
        out["weight_cos"] = torch.nn.functional.cosine_similarity(w, centred.nan_to_num(), dim=1, eps=1e-300).where(keep, nan)
    return out


def _pair_moments(centred: Tensor, variance: Tensor, cdnv_power: int, impl: str) -> Tensor:
    backend = _backend.choose("pair_stats", impl, centred.device)
    return pair_stats(centred, variance, cdnv_power, backend).cpu()


def _subset_metrics(centred, variance, w, cdnv_power, impl) -> dict:
    """The metrics that need only the classes of one subset (all included classes, or a band)."""
    moments = _pair_moments(centred, variance, cdnv_power, impl)  # rows: cdnv, cos, max_angle, log_inv_dist

    def mean(q):
        return float(moments[q, 1]) if moments[q, 0] > 0 else math.nan

    def var(q):
        return float(moments[q, 2] / moments[q, 0]) if moments[q, 0] > 0 else math.nan

    out = {"classes": int(centred.shape[0]), "cdnv": mean(0), "equinorm_means": _cov(centred.norm(dim=1)),
           "equiangularity": math.sqrt(var(1)) if moments[1, 0] > 0 else math.nan, "max_angle": mean(2),
           "gnc2_mean": mean(3), "gnc2_var": var(3), "mean_variance": float(variance.mean()) if len(variance) else math.nan}
    if w is not None:
        cos = torch.nn.functional.cosine_similarity(w, centred, dim=1, eps=1e-300)
        out.update(equinorm_weights=_cov(w.norm(dim=1)), nc3_mean_cos=float(cos.mean()) if len(cos) else math.nan,
                   unc3=_cov(cos))
    return out


def compute(stats: ClassStats, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
            global_mean: str = "class_means", unbiased: bool = False, min_count: int = 1, cdnv_power: int = 1,
            bands: Optional[Sequence[int]] = None, nc4=None, impl: str = "auto") -> dict:
    """All metrics of the module docstring as a dict of floats, plus ``conventions`` and ``bands``.

    Args:
        stats: the accumulated :class:`ClassStats`.
        weight: ``(C, D)`` classifier rows ``w_c`` (the output embedding); adds the W keys.
        bias: ``(C,)`` classifier bias, used by NC4 when ``nc4`` is ``(features, labels)``.
        global_mean: ``"class_means"`` (mean of class means, default) or ``"sample"`` (token mean).
        unbiased: per-class variances with ``n_c - 1`` (classes with one row are then excluded).
        min_count: classes with fewer rows are excluded everywhere (NC4 candidates included).
        cdnv_power: ``p`` of the CDNV denominator, 1 or 2.
        bands: ascending count edges ``e_0 < e_1 < ...``: also report the per-class metrics of
            the classes with ``e_i <= n_c < e_{i+1}`` (last band unbounded) under ``"bands"``.
        nc4: an :class:`NC4Agreement` filled on held-out data, or a ``(features, labels)`` pair
            (``-100`` labels skipped) to measure now with ``weight`` and ``bias``.
        impl: backend of the pair and argmax reductions.
    """
    if not isinstance(stats, ClassStats):
        raise TypeError(f"stats must be a ClassStats, got {type(stats).__name__}")
    if global_mean not in GLOBAL_MEANS:
        raise ValueError(f"global_mean must be one of {GLOBAL_MEANS}, got {global_mean!r}")
    if cdnv_power not in (1, 2):
        raise ValueError(f"cdnv_power must be 1 or 2, got {cdnv_power!r}")
    _check_weight(stats, weight, bias)
    keep = included_classes(stats, min_count, unbiased)
    threshold = max(min_count, 2 if unbiased else 1)
    K = int(keep.sum())
    if K < 2:
        raise ValueError(f"compute needs at least 2 classes with >= {threshold} rows, got {K}")
    mu_g = stats.global_mean(weighted=global_mean == "sample", min_count=threshold)
    centred = stats.means[keep] - mu_g
    variance = (stats.unbiased_variances if unbiased else stats.variances)[keep]
    w = None if weight is None else weight.to(stats.device, torch.float64)[keep]
    counts = stats.counts[keep]

    out = _subset_metrics(centred, variance, w, cdnv_power, impl)
    trace_b = float(centred.square().sum() / K)
    out["nc1_quotient"] = float(stats.m2[keep].sum() / counts.sum()) / trace_b
    if stats.track_within_cov:
        sigma_b = centred.T @ centred / K
        out["nc1_pinv"] = float(torch.trace(stats.within_cov @ torch.linalg.pinv(sigma_b, hermitian=True))) / K
    if w is not None:
        out["nc3_duality"] = float((w / w.norm() - centred / centred.norm()).square().sum())

    agreement = None
    if nc4 is not None:
        if isinstance(nc4, NC4Agreement):
            agreement = nc4
        else:
            features, labels = nc4
            if weight is None:
                raise ValueError("nc4=(features, labels) needs weight (the linear classifier)")
            agreement = NC4Agreement(stats, weight, bias, min_count=min_count, impl=impl).update(features, labels)
        out["nc4"] = agreement.agreement
        out["nc4_class_mean"] = agreement.class_mean_agreement
        out["nc4_tokens"] = agreement.tokens

    if bands is not None:
        edges = [int(e) for e in bands]
        if not edges or edges != sorted(set(edges)) or edges[0] < 1:
            raise ValueError(f"bands must be ascending distinct counts >= 1, got {list(bands)!r}")
        out["bands"] = []
        for lo, hi in zip(edges, edges[1:] + [None]):
            sel = (counts >= lo) & (counts < hi) if hi is not None else counts >= lo
            band = _subset_metrics(centred[sel], variance[sel], None if w is None else w[sel], cdnv_power, impl)
            band.update(lo=lo, hi=hi, tokens=int(counts[sel].sum()))
            if agreement is not None:
                band["nc4"] = agreement.band_agreement(lo, hi)
            out["bands"].append(band)

    out["conventions"] = {"global_mean": global_mean, "unbiased": unbiased, "min_count": min_count,
                          "effective_min_count": threshold, "cdnv_power": cdnv_power, "classes": K,
                          "tokens": int(counts.sum()), "nc1_pinv_sigma_w": "pooled over all classes / N"}
    return out


def nc4_predictions(features: Tensor, means: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    class_mask: Optional[Tensor] = None, compute_dtype: torch.dtype = torch.float32,
                    impl: str = "auto"):
    """Per-token ``(linear_pred, ncc_pred)``: ``argmax_c (w_c . h + b_c)`` over all classes, and the
    nearest class mean ``argmin_c ||h - mu_c||^2 = argmax_c (2 mu_c . h - ||mu_c||^2)`` over the
    classes of ``class_mask`` (default: every class with a finite mean).

    Both are running argmaxes over class tiles (``kernels/linear_reduce.py``): no ``N x C`` matrix.
    Products are computed in ``compute_dtype`` (float32 by default, exact up to fp32 rounding; pass
    ``torch.bfloat16`` for the fast path of a bf16 model) with fp32 accumulation; ties go to the
    smallest class index. A token with no candidate class gets ``-1``.

    Args:
        features: ``(N, D)`` hidden states. means: ``(C, D)`` class means. weight: ``(C, D)``.
        bias: optional ``(C,)``. class_mask: optional ``(C,)`` bool of NCC candidates.
    """
    for name, t in (("features", features), ("means", means), ("weight", weight)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating tensor")
    if means.shape != weight.shape or features.shape[1] != weight.shape[1]:
        raise ValueError(f"features (N, D), means and weight (C, D) disagree: {tuple(features.shape)}, "
                         f"{tuple(means.shape)}, {tuple(weight.shape)}")
    dev = features.device
    finite = means.isfinite().all(1)
    candidates = finite if class_mask is None else finite & class_mask.to(means.device).bool()
    index = candidates.nonzero().squeeze(1).to(dev)  # the NCC runs over the candidate classes only
    mu = means.to(dev)[index].double()
    backend = _backend.choose("linear_argmax", impl, dev)
    h = features.to(compute_dtype)
    linear_bias = None if bias is None else bias.to(dev, torch.float32)
    linear = linear_argmax(h, weight.to(dev, compute_dtype), linear_bias, backend)
    nearest = linear_argmax(h, (2 * mu).to(compute_dtype), (-mu.square().sum(1)).float(), backend)
    ncc = torch.where(nearest >= 0, index[nearest.clamp(min=0)] if len(index) else nearest, -1)
    return linear, ncc


class NC4Agreement:
    """Accumulates NC4 agreement on held-out tokens, per label class (int64 counts).

    Built from the training :class:`ClassStats` (its means are the NCC centres; classes below
    ``min_count`` are never NCC candidates) and the linear classifier ``weight``/``bias``.
    """

    def __init__(self, stats: ClassStats, weight: Tensor, bias: Optional[Tensor] = None, *, min_count: int = 1,
                 compute_dtype: torch.dtype = torch.float32, ignore_index: int = -100, impl: str = "auto"):
        _check_weight(stats, weight, bias)
        self.num_classes, self.ignore_index = stats.num_classes, ignore_index
        self._train_counts = stats.counts
        self._means, self._mask = stats.means, included_classes(stats, min_count)
        self._weight, self._bias = weight, bias
        self.compute_dtype, self.impl = compute_dtype, impl
        self.hits = torch.zeros(stats.num_classes, dtype=torch.int64)
        self.seen = torch.zeros(stats.num_classes, dtype=torch.int64)

    def update(self, features: Tensor, labels: Tensor) -> "NC4Agreement":
        rows, y = _check_labels(features, labels, self.num_classes, self.ignore_index)
        keep = y != self.ignore_index
        rows, y = rows[keep], y[keep]
        dev = rows.device
        linear, ncc = nc4_predictions(rows, self._means.to(dev), self._weight.to(dev),
                                      None if self._bias is None else self._bias.to(dev), class_mask=self._mask,
                                      compute_dtype=self.compute_dtype, impl=self.impl)
        self.seen += torch.bincount(y, minlength=self.num_classes).cpu()
        self.hits += torch.bincount(y, weights=(linear == ncc).double(), minlength=self.num_classes).long().cpu()
        return self

    def all_reduce(self, group=None) -> "NC4Agreement":
        import torch.distributed as dist

        for t in (self.hits, self.seen):
            dist.all_reduce(t, group=group)
        return self

    @property
    def tokens(self) -> int:
        return int(self.seen.sum())

    @property
    def agreement(self) -> float:
        """Token-weighted agreement (NaN before any token)."""
        return int(self.hits.sum()) / self.tokens if self.tokens else math.nan

    @property
    def per_class(self) -> Tensor:
        """Agreement among the held-out tokens of each label class (NaN for unseen classes)."""
        return self.hits.double() / self.seen.double().where(self.seen > 0, float("nan"))

    @property
    def class_mean_agreement(self) -> float:
        rate = self.per_class
        rate = rate[rate.isfinite()]
        return float(rate.mean()) if len(rate) else math.nan

    def band_agreement(self, lo: int, hi: Optional[int]) -> float:
        """Token-weighted agreement over labels whose *training* count is in ``[lo, hi)``."""
        n = self._train_counts
        sel = (n >= lo) & (n < hi) if hi is not None else n >= lo
        seen = int(self.seen[sel].sum())
        return float(self.hits[sel].sum()) / seen if seen else math.nan

    def state_dict(self) -> dict:
        return {"hits": self.hits.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> "NC4Agreement":
        self.hits, self.seen = state["hits"].clone(), state["seen"].clone()
        return self
