"""User-facing functions: argument checks, backend choice, then the custom op."""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import backend as _backend
from .ops.linear_cross_entropy import linear_ce_forward

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("none", "mean", "sum")


def _check_tensor(name: str, t, *, dtypes=None, ndim=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_scalar(name: str, value, *, low=None, high=None, strict_low=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (strict_low and value == low)):
        raise ValueError(f"{name} must be {'>' if strict_low else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    return_lse: bool = False,
    grad_filter: Optional[float] = None,
    impl: str = "auto",
):
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` against ``target``, without logits.

    A drop-in for ``torch.nn.functional.linear_cross_entropy`` (class-index targets) that never
    materialises the ``N x V`` logits, on any backend. With ``z = x W^T + b``, optional
    soft-capping ``z' = softcap * tanh(z / softcap)`` and ``lse = logsumexp(z')``, the per-token
    loss is PyTorch's ``cross_entropy`` term (class ``weight`` and ``label_smoothing`` with
    PyTorch's semantics) plus ``z_loss * weight[y] * lse**2``; ``reduction="mean"`` divides by
    the summed weight of the non-ignored targets (NaN when all are ignored, like PyTorch).

    Args:
        input: ``(..., D)`` hidden states, fp32, fp16 or bf16.
        linear_weight: ``(V, D)`` classifier / output-embedding weight, same dtype as ``input``.
        target: ``(...)`` int64 or int32 class indices, ``ignore_index`` for ignored tokens.
        linear_bias: optional ``(V,)`` bias.
        weight: optional ``(V,)`` class weights.
        z_loss: coefficient of the auxiliary ``lse**2`` term (PaLM), averaged like the loss.
        softcap: ``c`` applies ``c * tanh(z / c)`` to the logits (Gemma-2); ``None`` for none.
        shift: causal-LM shift: ``input[..., t, :]`` predicts ``target[..., t + 1]`` (no copy of
            ``input``); the unreduced loss then has shape ``target.shape[:-1] + (T - 1,)``.
        return_lse: also return the per-token log-sum-exp (fp32, differentiable; 0 at ignored
            tokens, whose logits are never computed).
        grad_filter: ``None`` (exact, the default) or a threshold ``tau``: backward tiles whose
            logit gradients are all below ``tau`` in magnitude are skipped (an approximation, as
            in Apple's Cut Cross-Entropy, which uses ``2**-12``); Triton backend only.
        impl: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"`` (see ``nckernels.backend``).

    Under ``torch.autocast`` the projection runs in the autocast dtype (as ``F.linear`` would)
    and the loss in fp32.

    Returns:
        The fp32 loss (a scalar, or per token for ``reduction="none"``), and the fp32 LSE with the
        shape of the unreduced loss when ``return_lse``.
    """
    _check_scalar("label_smoothing", label_smoothing, low=0.0, high=1.0)
    _check_scalar("z_loss", z_loss, low=0.0)
    if softcap is not None:
        _check_scalar("softcap", softcap, low=0.0, strict_low=True)
    if grad_filter is not None:
        _check_scalar("grad_filter", grad_filter, low=0.0, strict_low=True)
    x, w, b, tgt, cw, lead, backend = _prepare_linear(input, linear_weight, target, linear_bias, weight, reduction,
                                                      ignore_index, shift, impl)
    if grad_filter is not None and backend != "triton":
        raise ValueError(f"grad_filter is implemented by the Triton backend only (impl resolved to {backend!r})")
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
    if backend != "triton" and reduction != "none" and not return_lse and wants_grad:
        # chunked CPU path: loss and gradients in one pass (3 matmuls per chunk instead of 4)
        from .ops.linear_cross_entropy import linear_ce_loss_and_grad

        return linear_ce_loss_and_grad(x, w, b, tgt, cw, ignore_index, float(label_smoothing), float(z_loss),
                                       float(softcap or 0.0), reduction == "mean", backend)[0]
    loss_tok, lse, _ = linear_ce_forward(x, w, b, tgt, cw, ignore_index, float(label_smoothing), float(z_loss),
                                      float(softcap or 0.0), float(grad_filter or 0.0), backend)
    loss = _reduce(loss_tok, tgt, cw, ignore_index, reduction, lead)
    if reduction == "none" and shift:
        loss = loss[..., :-1]
    if not return_lse:
        return loss
    lse = lse.view(lead)
    return loss, (lse[..., :-1] if shift else lse)


def linear_stablemax_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    shift: bool = False,
    impl: str = "auto",
) -> Tensor:
    """:func:`stablemax_cross_entropy` of ``input @ linear_weight.T + linear_bias``, without logits.

    The fused kernels of :func:`linear_cross_entropy` with the StableMax logit transform: the
    forward sums ``s(z)`` (no max pass), the backward recomputes tiles with
    ``dL/dz_j = weight[y] (p_j - [j = y]) / (1 + |z_j|)``. Arguments as in
    :func:`linear_cross_entropy`.
    """
    from .ops.linear_cross_entropy import linear_stablemax_ce_forward

    x, w, b, tgt, cw, lead, backend = _prepare_linear(input, linear_weight, target, linear_bias, weight, reduction,
                                                      ignore_index, shift, impl)
    loss_tok, _ = linear_stablemax_ce_forward(x, w, b, tgt, cw, ignore_index, backend)
    loss = _reduce(loss_tok, tgt, cw, ignore_index, reduction, lead)
    return loss[..., :-1] if reduction == "none" and shift else loss


def _prepare_linear(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, shift, impl,
                    weight_name="linear_weight"):
    """Check the arguments of the linear losses (errors call the weight matrix ``weight_name``); return flat
    ``(x, w, b, target, class_weight)``, the unreduced loss shape and the backend."""
    _check_tensor("input", input, dtypes=_FLOAT_DTYPES)
    _check_tensor(weight_name, linear_weight, ndim=2)
    _check_tensor("target", target)
    if torch.is_autocast_enabled(input.device.type):  # the linear layer runs in autocast's dtype, like F.linear
        cast = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(cast), linear_weight.to(cast)
        linear_bias = linear_bias.to(cast) if linear_bias is not None else None
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dimension (..., D)")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"{weight_name} dtype {linear_weight.dtype} must match input dtype {input.dtype}")
    V, D = linear_weight.shape
    if input.shape[-1] != D:
        raise ValueError(f"input has {input.shape[-1]} features but {weight_name} has shape {(V, D)}")
    if target.is_floating_point() or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal input.shape[:-1] = {tuple(input.shape[:-1])}")
    if linear_bias is not None:
        _check_tensor("linear_bias", linear_bias, ndim=1)
        if linear_bias.shape[0] != V:
            raise ValueError(f"linear_bias must have shape ({V},), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} must match input dtype {input.dtype}")
    if weight is not None:
        _check_tensor("weight", weight, ndim=1)
        if not weight.is_floating_point():
            raise TypeError(f"weight (class weights) must be floating point, got {weight.dtype}")
        if weight.shape[0] != V:
            raise ValueError(f"weight (class weights) must have shape ({V},), got {tuple(weight.shape)}")
    for name, t in ((weight_name, linear_weight), ("target", target), ("linear_bias", linear_bias),
                    ("weight", weight)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if shift and input.dim() < 2:
        raise ValueError("shift=True needs input of shape (..., T, D)")
    backend = _backend.choose("linear_cross_entropy", impl, input.device)
    target = target.long()
    if shift:  # token t predicts t + 1; the last position of each sequence predicts nothing
        target = torch.cat([target[..., 1:], target.new_full(target.shape[:-1] + (1,), ignore_index)], -1)
    class_weight = weight.float().contiguous() if weight is not None else None
    return (input.reshape(-1, D), linear_weight, linear_bias, target.reshape(-1), class_weight, target.shape,
            backend)


# ----------------------------------------------------------------------------- explicit logits

def _rows_last(x: Tensor, dim: int):
    """``x`` with ``dim`` moved last, as a contiguous ``(R, C)`` matrix, and how to undo it."""
    ndim = max(x.dim(), 1)  # a 0-d tensor is one row of one element, as in torch
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for a tensor of {x.dim()} dimensions")
    moved = x.movedim(dim, -1) if x.dim() else x.reshape(1)
    shape = moved.shape
    return moved.reshape(math.prod(shape[:-1]), shape[-1]).contiguous(), shape


def _normalize(x: Tensor, dim: int, log: bool, stable: bool, impl: str, name: str) -> Tensor:
    from .ops.rowwise import normalize

    _check_tensor("input", x, dtypes=_FLOAT_DTYPES)
    backend = _backend.choose("softmax", impl, x.device)
    rows, shape = _rows_last(x, dim)
    y = normalize(rows, log, stable, backend).view(shape)
    return y.movedim(-1, dim) if x.dim() else y.view(())


def softmax(input: Tensor, dim: int = -1, *, impl: str = "auto") -> Tensor:
    """``exp(x_i - lse(x))`` along ``dim``, in the input dtype (fp32 accumulation; online when a row
    does not fit on chip)."""
    return _normalize(input, dim, False, False, impl, "softmax")


def log_softmax(input: Tensor, dim: int = -1, *, impl: str = "auto") -> Tensor:
    """``x_i - lse(x)`` along ``dim``, in the input dtype."""
    return _normalize(input, dim, True, False, impl, "log_softmax")


def stablemax(input: Tensor, dim: int = -1, *, impl: str = "auto") -> Tensor:
    """StableMax ``s(x_i) / sum_j s(x_j)`` with ``s(x) = x + 1`` (x >= 0), ``1 / (1 - x)`` (x < 0)."""
    return _normalize(input, dim, False, True, impl, "stablemax")


def log_stablemax(input: Tensor, dim: int = -1, *, impl: str = "auto") -> Tensor:
    """``log s(x_i) - log sum_j s(x_j)`` along ``dim``."""
    return _normalize(input, dim, True, True, impl, "log_stablemax")


def logsumexp(input: Tensor, dim: int = -1, keepdim: bool = False, *, impl: str = "auto") -> Tensor:
    """``log sum exp`` along ``dim``, fp32 (rows of -inf give -inf, a +inf gives +inf, as in torch)."""
    from .ops.rowwise import logsumexp as lse_op

    _check_tensor("input", input, dtypes=_FLOAT_DTYPES)
    backend = _backend.choose("softmax", impl, input.device)
    rows, shape = _rows_last(input, dim)
    if rows.shape[1] == 0:  # the log of an empty sum: -inf, with torch's (zero) gradient
        out = torch.logsumexp(rows.float(), -1).view(shape[:-1])
    else:
        out = lse_op(rows, backend).view(shape[:-1])
    return out.unsqueeze(dim) if keepdim and input.dim() else out


def _class_rows(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, name: str):
    """``(N, C, d...)`` logits and ``(N, d...)`` targets -> ``(R, C)`` rows, ``(R,)`` int64 targets."""
    _check_tensor("input", input, dtypes=_FLOAT_DTYPES)
    _check_tensor("target", target)
    if target.is_floating_point() or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype} "
                        f"(probability targets: impl='reference' of {name})")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension")
    class_dim = 0 if input.dim() == 1 else 1
    expected = input.shape[:class_dim] + input.shape[class_dim + 1:]
    if target.shape != expected:
        raise ValueError(f"target shape {tuple(target.shape)} must be {tuple(expected)} for input of shape "
                         f"{tuple(input.shape)}")
    C = input.shape[class_dim]
    if weight is not None:
        _check_tensor("weight", weight, ndim=1)
        if not weight.is_floating_point() or weight.shape[0] != C:
            raise ValueError(f"weight (class weights) must be a floating ({C},) tensor, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
    for n, t in (("target", target), ("weight", weight)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{n} is on {t.device} but input is on {input.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    rows, _ = _rows_last(input, class_dim)
    cw = weight.float().contiguous() if weight is not None else None
    return rows, target.reshape(-1).long(), cw, target.shape


def _reduce(loss_tok: Tensor, target: Tensor, cw: Optional[Tensor], ignore_index: int, reduction: str, shape):
    if reduction == "none":
        return loss_tok.view(shape)
    if reduction == "sum":
        return loss_tok.sum()
    valid = target != ignore_index
    denom = valid.sum() if cw is None else (cw[torch.where(valid, target, 0)] * valid).sum()
    return loss_tok.sum() / denom


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, impl: str = "auto") -> Tensor:
    """``F.cross_entropy`` on explicit logits (class dim 1), with z-loss and soft-capping.

    Per row: PyTorch's weighted, label-smoothed cross-entropy of ``z' = softcap tanh(z / softcap)``
    plus ``z_loss * weight[y] * lse**2``. Class-index targets run on the chosen backend (one
    read of the logits forward, one read + one write backward); probability targets (a float
    ``target`` shaped like ``input``) go through PyTorch (the reference).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_scalar("label_smoothing", label_smoothing, low=0.0, high=1.0)
    _check_scalar("z_loss", z_loss, low=0.0)
    if softcap is not None:
        _check_scalar("softcap", softcap, low=0.0, strict_low=True)
    if isinstance(target, Tensor) and target.is_floating_point() and target.shape == input.shape:
        if z_loss or softcap:
            raise ValueError("z_loss and softcap need class-index targets")
        return torch.nn.functional.cross_entropy(input.float(), target.float(), weight, reduction=reduction,
                                                 label_smoothing=label_smoothing)
    from .ops.rowwise import cross_entropy_forward

    rows, tgt, cw, shape = _class_rows(input, target, weight, ignore_index, "cross_entropy")
    backend = _backend.choose("cross_entropy", impl, input.device)
    loss_tok = cross_entropy_forward(rows, tgt, cw, ignore_index, float(label_smoothing), float(z_loss),
                                     float(softcap or 0.0), backend)[0]
    return _reduce(loss_tok, tgt, cw, ignore_index, reduction, shape)


def stablemax_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                            ignore_index: int = -100, reduction: str = "mean", *, impl: str = "auto") -> Tensor:
    """Cross-entropy of StableMax probabilities, ``weight[y] * log1p(sum_{j != y} s(x_j) / s(x_y))``.

    The log1p form stays exact in fp32 on confident rows (no ``-log(s_y / S)`` cancellation) and
    has no NaN at ``x = 1``; gradient ``weight[y] (p_j - [j = y]) / (1 + |x_j|)``. Reductions and
    ``ignore_index`` as in ``F.cross_entropy``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    from .ops.rowwise import stablemax_ce_forward

    rows, tgt, cw, shape = _class_rows(input, target, weight, ignore_index, "stablemax_cross_entropy")
    backend = _backend.choose("stablemax_cross_entropy", impl, input.device)
    loss_tok, _ = stablemax_ce_forward(rows, tgt, cw, ignore_index, backend)
    return _reduce(loss_tok, tgt, cw, ignore_index, reduction, shape)


class SoftmaxCollapse(NamedTuple):
    """Softmax-Collapse measures of one batch of logits (0-d fp32 tensors; no host sync)."""

    sc_fraction: Tensor  # rows whose max-shifted sum_j exp(z_j - max) rounds to exactly 1
    zero_loss_fraction: Optional[Tensor]  # rows (with a target) whose CE loss is exactly 0
    rows: int


def softmax_collapse(logits: Tensor, target: Optional[Tensor] = None, *, ignore_index: int = -100,
                     impl: str = "auto") -> SoftmaxCollapse:
    """Softmax Collapse diagnostics (Prieto et al. 2025) of ``logits (..., C)``, classes last.

    A row has collapsed when, in the logits' precision, ``sum_j exp(z_j - max_k z_k)`` rounds to
    exactly 1: every other class underflows next to the largest, and the loss and its gradient
    become exactly 0. Returns the fraction of such rows and, given ``target``, the fraction of
    (non-ignored) rows whose cross-entropy ``lse - z_y`` is exactly 0 in the logits' precision.
    One read of the logits by the row-statistics kernel; nothing ``N x C`` is written.
    """
    from .ops.rowwise import row_softmax_stats

    _check_tensor("logits", logits, dtypes=_FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty class dimension last, got shape {tuple(logits.shape)}")
    rows, _ = _rows_last(logits, -1)
    if target is not None:
        _check_tensor("target", target)
        if target.is_floating_point() or target.shape != logits.shape[:-1]:
            raise ValueError(f"target must be integer class indices of shape {tuple(logits.shape[:-1])}, "
                             f"got {target.dtype} {tuple(target.shape)}")
        tgt = target.reshape(-1).long()
        if bool(((tgt != ignore_index) & ((tgt < 0) | (tgt >= logits.shape[-1]))).any()):
            raise ValueError(f"target contains class indices outside [0, {logits.shape[-1]})")
    else:
        tgt = torch.zeros(rows.shape[0], dtype=torch.long, device=logits.device)
    backend = _backend.choose("softmax", impl, logits.device)
    m, sumexp, z_t = row_softmax_stats(rows, torch.where(tgt == ignore_index, 0, tgt), backend)
    dtype = logits.dtype
    collapsed = sumexp.to(dtype) == 1
    n = rows.shape[0]
    sc = collapsed.float().mean() if n else torch.tensor(float("nan"), device=logits.device)
    zero = None
    if target is not None:
        valid = tgt != ignore_index
        loss = ((m - z_t) + torch.log(sumexp)).to(dtype)  # not fl(lse) - z_t: tiny losses must survive
        zero = ((loss == 0) & valid).sum() / valid.sum()
    return SoftmaxCollapse(sc, zero, n)


class ClassStatsResult(NamedTuple):
    """Per-class statistics of one batch (see :func:`class_stats`)."""

    counts: Tensor  # int64 (C,)
    sums: Tensor    # float64 (C, D)
    m2: Tensor      # float64 (C,): sum over the class's rows of ||h - mean_c||^2


class ClassStatsWithScatter(NamedTuple):
    """:class:`ClassStatsResult` plus the pooled within-class scatter."""

    counts: Tensor
    sums: Tensor
    m2: Tensor
    scatter: Tensor  # float64 (D, D): sum_i (h_i - mean_{y_i}) (h_i - mean_{y_i})^T


def _check_labels(features: Tensor, labels: Tensor, num_classes: int, ignore_index: int):
    """Validate ``features (..., D)`` / ``labels (...)``; return ``(N, D)`` rows and ``(N,)`` labels."""
    _check_tensor("features", features, dtypes=_FLOAT_DTYPES + (torch.float64,))
    _check_tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must hold class indices as int64 or int32, got {labels.dtype}")
    if features.dim() < 1 or labels.shape != features.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be features.shape[:-1] for features of shape "
                         f"{tuple(features.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels is on {labels.device} but features is on {features.device}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    y = labels.reshape(-1)
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels contains class indices outside [0, {num_classes}) "
                         f"(first: {int(y[bad][0])}; ignore_index={ignore_index})")
    return features.reshape(-1, features.shape[-1]), y


def class_stats(features: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int = -100,
                within_cov: bool = False, impl: str = "auto"):
    """Per-class counts, sums and residual sums of squares of ``features`` grouped by ``labels``.

    For rows ``h_i`` with labels ``y_i`` (``ignore_index`` skipped)::

        counts_c = #{i : y_i = c},  sums_c = sum_{y_i = c} h_i,
        m2_c = sum_{y_i = c} ||h_i - mean_c||^2,  mean_c = sums_c / counts_c

    about the batch's own class means, so that batches merge exactly (Chan's formula; see
    :class:`nckernels.collapse.ClassStats`). Features are upcast to float64 before any
    subtraction; ``counts`` are int64, ``sums`` and ``m2`` float64, empty classes exactly 0.
    With ``within_cov=True`` also returns the pooled within-class scatter
    ``sum_i (h_i - mean_{y_i})(h_i - mean_{y_i})^T`` (float64, ``D x D``).

    Args:
        features: ``(..., D)`` fp32, fp16, bf16 or fp64.
        labels: ``(...)`` int64 or int32 class indices in ``[0, num_classes)`` or ``ignore_index``.
        impl: ``"auto"``, ``"triton"``, ``"cuda"`` (csrc/cuda, JIT-built with nvcc on first use),
            ``"cpp"`` or ``"reference"`` (see ``nckernels.backend``).

    Returns:
        :class:`ClassStatsResult` ``(counts, sums, m2)``, or :class:`ClassStatsWithScatter`
        ``(counts, sums, m2, scatter)`` when ``within_cov``.
    """
    from .ops.collapse import segment_stats
    from .reference.segment import within_scatter

    rows, y = _check_labels(features, labels, num_classes, ignore_index)
    backend = _backend.choose("class_stats", impl, features.device)
    if backend == "triton" and rows.dtype == torch.float64:
        backend = "reference"  # the Triton kernel reads fp32/fp16/bf16
    counts, sums, m2 = segment_stats(rows, y, num_classes, ignore_index, backend)
    if not within_cov:
        return ClassStatsResult(counts, sums, m2)
    means = sums / counts.clamp(min=1).unsqueeze(1)
    return ClassStatsWithScatter(counts, sums, m2, within_scatter(rows, y, means, ignore_index))


# ----------------------------------------------------------------------------- margin losses (issue 6)
#
# Normalised-linear softmax losses of face recognition / metric learning: rows and class
# centres are L2-normalised inside the op, cos_ij = e_hat_i . w_hat_j, and the loss is softmax
# cross-entropy over transformed logits (the target column and the others transformed
# differently). The math, the theta + m > pi policies and the gradient at |cos| = 1 are
# specified in nckernels/reference/margin.py. Backends: Triton (the cosine logit transform on
# the fused linear-reduce kernels, kernels/linear_reduce.py: logits live in registers only) and
# the chunked PyTorch reference (online log-sum-exp over class chunks). Neither allocates a
# B x C matrix or a normalised copy of the weight.

_OVERFLOW_POLICIES = ("fallback", "clamp", "none")
_MARGIN_GRADIENTS = ("exact", "insightface")


def _prepare_margin(op: str, embeddings, weight, target, reduction, ignore_index, impl):
    """Check the arguments of a class-level margin loss; return ``(embeddings, weight, target, backend)``."""
    _check_tensor("embeddings", embeddings, dtypes=_FLOAT_DTYPES, ndim=2)
    _check_tensor("weight", weight, dtypes=_FLOAT_DTYPES, ndim=2)
    _check_tensor("target", target)
    if target.is_floating_point() or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    B, D = embeddings.shape
    C, Dw = weight.shape
    if Dw != D:
        raise ValueError(f"embeddings have {D} features but weight has shape {(C, Dw)} (num_classes, embedding_size)")
    if C < 1:
        raise ValueError("weight must have at least one class (row)")
    if target.shape != (B,):
        raise ValueError(f"target shape {tuple(target.shape)} must be ({B},) for embeddings of shape {(B, D)}")
    for name, t in (("weight", weight), ("target", target)):
        if t.device != embeddings.device:
            raise ValueError(f"{name} is on {t.device} but embeddings is on {embeddings.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    backend = _backend.choose(op, impl, embeddings.device)
    # the target range is checked by the op (a host sync; kept out of the traced graph, as linear_cross_entropy)
    return embeddings, weight, target.long(), backend


def _check_choice(name: str, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class MarginSpec(NamedTuple):
    """A margin loss in the terms of the margin ops (``nckernels/reference/margin.py``): the functional op it
    is (``"arcface_loss"``...), the logit ``kind``, scale ``s``, margins ``m1, m2, m3`` and the angular options."""
    op: str
    kind: str
    s: float
    m1: float
    m2: float
    m3: float
    easy_margin: bool
    overflow: str
    gradient: str


def _check_angular(easy_margin, theta_overflow, gradient):
    _check_choice("theta_overflow", theta_overflow, _OVERFLOW_POLICIES)
    _check_choice("gradient", gradient, _MARGIN_GRADIENTS)
    if not isinstance(easy_margin, bool):
        raise TypeError(f"easy_margin must be a bool, got {easy_margin!r}")


def _cosface_spec(scale=64.0, margin=0.35):
    _check_scalar("scale", scale, low=0.0, strict_low=True)
    _check_scalar("margin", margin, low=0.0, high=2.0)
    return MarginSpec("cosface_loss", "cosface", float(scale), 1.0, 0.0, float(margin), False, "none", "exact")


def _arcface_spec(scale=64.0, margin=0.5, easy_margin=False, theta_overflow="fallback", gradient="exact"):
    _check_scalar("scale", scale, low=0.0, strict_low=True)
    _check_scalar("margin", margin, low=0.0, high=math.pi)
    _check_angular(easy_margin, theta_overflow, gradient)
    return MarginSpec("arcface_loss", "combined", float(scale), 1.0, float(margin), 0.0, easy_margin, theta_overflow,
                      gradient)


def _combined_spec(scale=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=False, theta_overflow="fallback", gradient="exact"):
    _check_scalar("scale", scale, low=0.0, strict_low=True)
    _check_scalar("m1", m1, low=0.0, strict_low=True)
    _check_scalar("m2", m2, low=0.0, high=math.pi)
    _check_scalar("m3", m3, low=0.0, high=2.0)
    _check_angular(easy_margin, theta_overflow, gradient)
    return MarginSpec("combined_margin_loss", "combined", float(scale), float(m1), float(m2), float(m3), easy_margin,
                      theta_overflow, gradient)


def _circle_spec(gamma=256.0, margin=0.25):
    _check_scalar("gamma", gamma, low=0.0, strict_low=True)
    _check_scalar("margin", margin, low=0.0, high=1.0)
    return MarginSpec("circle_loss", "circle", float(gamma), 1.0, float(margin), 0.0, False, "none", "exact")


# name -> the parameters (and defaults, ranges) of the nckernels function of that loss
MARGIN_LOSSES = {"cosface": _cosface_spec, "arcface": _arcface_spec, "combined": _combined_spec,
                 "circle": _circle_spec}


def margin_spec(margin_loss: Union[str, tuple[str, Mapping]]) -> MarginSpec:
    """``"arcface"`` or ``("cosface", {"scale": 64, "margin": 0.35})``: a name of :data:`MARGIN_LOSSES` and the
    keyword arguments of its nckernels function (``cosface_loss``, ``arcface_loss``, ``combined_margin_loss``,
    ``circle_loss``; defaults and ranges as there)."""
    name, params = (margin_loss, {}) if isinstance(margin_loss, str) else tuple(margin_loss)
    if name not in MARGIN_LOSSES or not isinstance(params, Mapping):
        raise ValueError(f"margin_loss must be one of {tuple(MARGIN_LOSSES)} or a (name, params dict) pair, "
                         f"got {margin_loss!r}")
    try:
        return MARGIN_LOSSES[name](**params)
    except TypeError as err:
        raise TypeError(f"margin_loss {name!r}: {err}") from None


def _margin_loss(spec: MarginSpec, embeddings, weight, target, reduction, ignore_index, impl):
    from .ops.margin import margin_ce_forward

    e, w, tgt, backend = _prepare_margin(spec.op, embeddings, weight, target, reduction, ignore_index, impl)
    loss_tok = margin_ce_forward(e, w, tgt, spec.kind, spec.s, spec.m1, spec.m2, spec.m3, spec.easy_margin,
                                 spec.overflow, spec.gradient, ignore_index, backend)[0]
    return _reduce(loss_tok, tgt, None, ignore_index, reduction, tgt.shape)


def cosface_loss(embeddings: Tensor, weight: Tensor, target: Tensor, *, scale: float = 64.0, margin: float = 0.35,
                 reduction: str = "mean", ignore_index: int = -100, impl: str = "auto") -> Tensor:
    """CosFace / AM-softmax loss (Wang et al. 2018) of ``embeddings`` against class centres ``weight``.

    With ``cos_ij = e_hat_i . w_hat_j`` (rows of both L2-normalised inside the op; gradients flow
    through the normalisation to the raw tensors), the logits are ``s (cos_iy - m)`` for the
    target and ``s cos_ij`` for the other classes, followed by softmax cross-entropy over all
    ``C`` classes. No ``B x C`` matrix is allocated: the Triton kernels keep each tile of cosines
    in registers and reduce it with an online log-sum-exp (the reference does the same over class
    chunks); the backward recomputes the cosines. The target column is computed per row.

    Args:
        embeddings: ``(B, D)`` fp32, fp16 or bf16. The reference computes in fp32; the Triton
            kernels multiply in the embeddings' dtype (bf16 rows: bf16 tensor cores, as autocast
            would; fp32 rows: fp32, or TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set)
            and accumulate, normalise and transform in fp32.
        weight: ``(C, D)`` class centres (keep them fp32 under AMP; see :class:`CosFaceLoss`).
        target: ``(B,)`` int64 / int32 class indices, ``ignore_index`` for rows to skip.
        scale: ``s > 0``. margin: ``m`` in ``[0, 2]``.
        reduction: ``"mean"`` (over non-ignored rows; NaN when all are ignored, like PyTorch),
            ``"sum"`` or ``"none"`` (``(B,)``, 0 at ignored rows).
        impl: ``"auto"`` (Triton on CUDA, the reference on CPU), ``"triton"`` or ``"reference"``.
            Under ``torch.use_deterministic_algorithms(True)`` the Triton backward avoids atomics
            and is bitwise reproducible.

    Returns:
        The fp32 loss.
    """
    return _margin_loss(_cosface_spec(scale, margin), embeddings, weight, target, reduction, ignore_index, impl)


def combined_margin_loss(embeddings: Tensor, weight: Tensor, target: Tensor, *, scale: float = 64.0,
                         m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, easy_margin: bool = False,
                         theta_overflow: str = "fallback", gradient: str = "exact", reduction: str = "mean",
                         ignore_index: int = -100, impl: str = "auto") -> Tensor:
    """Combined-margin loss (insightface): target logit ``s (cos(m1 theta + m2) - m3)``, others ``s cos``.

    ``theta = acos(cos_iy)``; SphereFace's ``m1``, ArcFace's ``m2`` and CosFace's ``m3`` are all
    honoured at once (unlike insightface's ``CombinedMarginLoss``, which drops ``m2`` when
    ``m3 > 0``). Normalisation, backends and reductions as in :func:`cosface_loss`.

    Args:
        m1: ``> 0``. m2: in ``[0, pi]``. m3: in ``[0, 2]``.
        theta_overflow: what to do where ``m1 theta + m2 > pi`` (there ``cos(.)`` increases again with
            ``theta``, rewarding the wrong direction):

            * ``"fallback"`` (default): insightface's classic rule, the target logit becomes
              ``s (cos - m3 - m2 sin(m2))`` (for ArcFace: where ``cos > cos(pi - m)`` use
              ``cos(theta + m)``, else ``cos - m sin(m)``; note the rule is not continuous at the
              threshold), with derivative ``s`` w.r.t. ``cos``;
            * ``"clamp"``: ``m1 theta + m2`` is clamped to ``pi`` (logit ``s (-1 - m3)``, zero gradient there);
            * ``"none"``: the plain formula (what insightface's current code computes).
        easy_margin: apply the margin only where ``cos > 0`` (plain ``s cos`` elsewhere).
        gradient: ``"exact"`` (default): the true derivative
            ``d cos(m1 theta + m2) / d cos = m1 sin(m1 theta + m2) / sin(theta)``; ``"insightface"``:
            the forward above but the backward of the target logit taken as ``s`` per unit ``cos``
            (insightface since Dec 2022 computes ``s (p - onehot)`` w.r.t. ``s cos``, dropping the
            ``sin(theta + m) / sin(theta)`` factor).

    No NaN at ``cos = +-1``, in fp16/bf16, or with ``theta`` near ``pi``: ``cos`` is clamped to
    ``[-1, 1]`` for ``acos``, ``sin(theta) = sqrt(max(1 - cos^2, 0))``, and where ``sin(theta)`` is
    exactly 0 (``|cos| = 1``) the margin derivative is taken as 0; there the embedding is parallel
    to its centre, so the gradient of ``cos`` w.r.t. the raw vectors is 0 anyway, and the target
    term contributes no gradient (the other classes still do).
    """
    spec = _combined_spec(scale, m1, m2, m3, easy_margin, theta_overflow, gradient)
    return _margin_loss(spec, embeddings, weight, target, reduction, ignore_index, impl)


def arcface_loss(embeddings: Tensor, weight: Tensor, target: Tensor, *, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, theta_overflow: str = "fallback", gradient: str = "exact",
                 reduction: str = "mean", ignore_index: int = -100, impl: str = "auto") -> Tensor:
    """ArcFace loss (Deng et al. 2019): target logit ``s cos(theta + m)``, others ``s cos``.

    :func:`combined_margin_loss` with ``m1 = 1, m2 = margin, m3 = 0``; ``margin`` in radians, in
    ``[0, pi]``. ``theta_overflow`` (``"fallback"``: where ``cos <= cos(pi - m)`` the target logit is
    ``s (cos - m sin(m))``; ``"clamp"``: ``theta + m`` clamped to ``pi``; ``"none"``: plain
    ``cos(theta + m)``), ``easy_margin`` and ``gradient`` (``"exact"``: factor
    ``sin(theta + m) / sin(theta)``, 0 at exactly ``|cos| = 1``; ``"insightface"``: factor 1) as
    documented there. Normalisation, backends and reductions as in :func:`cosface_loss`.
    """
    spec = _arcface_spec(scale, margin, easy_margin, theta_overflow, gradient)
    return _margin_loss(spec, embeddings, weight, target, reduction, ignore_index, impl)


def circle_loss(embeddings: Tensor, weight: Tensor, target: Tensor, *, gamma: float = 256.0, margin: float = 0.25,
                reduction: str = "mean", ignore_index: int = -100, impl: str = "auto") -> Tensor:
    """Class-level Circle loss (Sun et al. 2020): softmax CE over re-weighted cosine logits.

    With ``s = cos`` to the normalised class centres, ``alpha_p = [1 + m - s_p]_+`` and
    ``alpha_n = [s_n + m]_+`` (both detached: constants of the gradient), ``Delta_p = 1 - m`` and
    ``Delta_n = m``, the target logit is ``gamma alpha_p (s_p - Delta_p)`` and the others
    ``gamma alpha_n (s_n - Delta_n)``. Defaults are the face setting (``m = 0.25, gamma = 256``);
    re-ID uses ``gamma = 128``, fine-grained ``m = 0.4, gamma = 80``. Normalisation, chunking and
    reductions as in :func:`cosface_loss`. ``gamma > 0``, ``margin`` in ``[0, 1]``.
    """
    return _margin_loss(_circle_spec(gamma, margin), embeddings, weight, target, reduction, ignore_index, impl)


def pair_circle_loss(embeddings: Tensor, labels: Tensor, *, gamma: float = 80.0, margin: float = 0.4,
                     reduction: str = "mean", impl: str = "auto") -> Tensor:
    """Pair-wise Circle loss over a batch (Sun et al. 2020; pytorch-metric-learning's ``CircleLoss``).

    With ``s_ij = e_hat_i . e_hat_j`` (L2-normalised embeddings; the self-pair excluded), positives
    ``P_i = {j != i: y_j = y_i}``, negatives ``N_i = {j: y_j != y_i}`` and ``alpha`` detached as in
    :func:`circle_loss`, per anchor::

        loss_i = softplus(LSE_{j in N_i} gamma alpha_n (s_ij - m) + LSE_{j in P_i} -gamma alpha_p (s_ij - (1 - m)))

    ``reduction="mean"`` averages over the anchors that have both a positive and a negative (as
    pytorch-metric-learning does); a batch without any such anchor gives 0 (with a zero
    gradient, not NaN, so that such a batch does not break training). ``"sum"`` sums them,
    ``"none"`` returns ``(B,)`` with 0 at the other anchors. Backends: Triton (one fused kernel
    reduces the masked positive and negative log-sum-exps of each anchor; the ``B x B``
    similarities exist only as register tiles; the backward is deterministic) and the reference
    (fp32 PyTorch over row chunks of the similarities).
    """
    from .reference.margin import pair_circle

    _check_tensor("embeddings", embeddings, dtypes=_FLOAT_DTYPES, ndim=2)
    _check_tensor("labels", labels)
    if labels.is_floating_point() or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must hold class indices as int64 or int32, got {labels.dtype}")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be ({embeddings.shape[0]},)")
    if labels.device != embeddings.device:
        raise ValueError(f"labels is on {labels.device} but embeddings is on {embeddings.device}")
    _check_scalar("gamma", gamma, low=0.0, strict_low=True)
    _check_scalar("margin", margin, low=0.0, high=1.0)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if _backend.choose("pair_circle_loss", impl, embeddings.device) == "triton":
        from .ops.margin import pair_circle_forward, pair_circle_has_both

        loss, lse_n, lse_p = pair_circle_forward(embeddings, labels.long(), float(gamma), float(margin))
        both = pair_circle_has_both(lse_n, lse_p)
    else:
        with torch.autocast(embeddings.device.type, enabled=False):
            loss, both = pair_circle(embeddings, labels.long(), float(gamma), float(margin))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / both.sum().clamp_min(1)
