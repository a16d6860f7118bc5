"""``nckernels::margin_ce_forward`` / ``margin_ce_backward``: the normalised-linear margin losses.

One pair of custom ops serves CosFace, ArcFace, the combined margin and class-level Circle
(``kind`` and the floats ``s, m1, m2, m3`` select the logit transforms; see
``reference/margin.py`` for the math). The forward returns the per-row loss, the log-sum-exp
over the non-target classes ``lse^o`` and the target logit ``z_y`` (fp32, zeros at ignored
rows); the backward recomputes the cosines from them. Argument checks live in ``functional.py``.

Both ops are built on :func:`shard_forward` / :func:`shard_backward`, which see one slice of
the classes (all of them here; one rank's shard in ``nckernels.distributed``): the target
column is handled per row in PyTorch (``O(B D)``), the other columns by the backend
(``reference``: class chunks; ``triton``: the fused linear-reduce kernels with the cosine
logit transform, ``kernels/linear_reduce.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import margin as ref


def _others(backend: str):
    """``(others_lse, others_backward)`` of the backend (signatures of ``reference.margin``)."""
    if backend == "triton":
        from ..kernels import linear_reduce

        return linear_reduce.margin_others_lse, linear_reduce.margin_others_backward
    return ref.others_lse, ref.others_backward


def _compute_rows(e_hat: Tensor, e: Tensor, backend: str) -> Tensor:
    """The normalised rows as the backend's products read them: the reference computes in fp32; the
    Triton kernels multiply in the embeddings' dtype (fp32 rows: fp32 products; bf16 rows: bf16 tensor
    cores, the precision autocast would pick) and accumulate in fp32."""
    return e_hat.to(e.dtype) if backend == "triton" else e_hat


def shard_forward(e: Tensor, w: Tensor, tgt: Tensor, kind: str, s: float, m1: float, m2: float, m3: float,
                  easy_margin: bool, overflow: str, backend: str) -> tuple[Tensor, Tensor]:
    """``(lse^o, z_t)`` (fp32 ``(n,)``) of rows ``e (n, D)`` (all valid) against the centres ``w (C, D)``;
    ``tgt (n,)`` indexes ``w``, or is ``-1`` where the row's target is not among these classes.
    ``lse^o``: log-sum-exp of the non-target transformed logits (``-inf`` if none); ``z_t``: the
    transformed target logit (0 where ``tgt = -1``). The loss of a row is
    ``softplus(lse^o - z_t)`` once both are combined over all class shards."""
    e_hat, _ = ref.normalize(e)
    terms = ref.target_terms(e_hat, w, tgt, kind, s, m1, m2, m3, easy_margin, overflow, "exact")
    z_t = torch.zeros(e.shape[0], dtype=torch.float32, device=e.device)
    z_t[terms.rows] = terms.z
    return _others(backend)[0](_compute_rows(e_hat, e, backend), w, tgt, kind, s, m2), z_t


def shard_backward(e: Tensor, w: Tensor, tgt: Tensor, lse_o: Tensor, z_t: Tensor, grad: Tensor, kind: str, s: float,
                   m1: float, m2: float, m3: float, easy_margin: bool, overflow: str, gradient: str,
                   backend: str) -> tuple[Tensor, Tensor]:
    """``(de (n, D), dw (C, D))`` (fp32) of ``sum_i grad_i softplus(lse^o_i - z_t_i)`` through this
    shard's logits, where ``lse^o`` and ``z_t`` are the combined (global) statistics."""
    e_hat, e_norm = ref.normalize(e)
    grad = grad.float()
    lse = torch.logaddexp(lse_o, z_t)
    de_hat, dw = _others(backend)[1](_compute_rows(e_hat, e, backend), w, tgt, lse, grad, kind, s, m2)
    terms = ref.target_terms(e_hat, w, tgt, kind, s, m1, m2, m3, easy_margin, overflow, gradient)
    ref.target_backward(e_hat, de_hat, dw, tgt, terms, lse_o, z_t, grad)
    return ref.normalize_backward(e_hat, e_norm, de_hat), dw


def _valid_rows(target: Tensor, ignore_index: int, num_classes: int) -> tuple[Tensor, Tensor]:
    rows = (target != ignore_index).nonzero().squeeze(1)
    tgt = target[rows]
    bad = (tgt < 0) | (tgt >= num_classes)
    if tgt.numel() and bool(bad.any()):
        raise ValueError(f"target contains class index {tgt[bad][0].item()} outside [0, {num_classes}) "
                         f"(weight has {num_classes} rows; ignore_index={ignore_index})")
    return rows, tgt


@torch.library.custom_op("nckernels::margin_ce_forward", mutates_args=())
def margin_ce_forward(
    embeddings: Tensor, weight: Tensor, target: Tensor, kind: str, s: float, m1: float, m2: float, m3: float,
    easy_margin: bool, overflow: str, gradient: str, ignore_index: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    B, C = target.shape[0], weight.shape[0]
    loss, lse_o, z_t = (torch.zeros(B, dtype=torch.float32, device=embeddings.device) for _ in range(3))
    rows, tgt = _valid_rows(target, ignore_index, C)
    if rows.numel() == 0:
        return loss, lse_o, z_t
    with torch.autocast(embeddings.device.type, enabled=False):
        lse_v, z_v = shard_forward(embeddings[rows], weight, tgt, kind, s, m1, m2, m3, easy_margin, overflow,
                                   backend)
    loss[rows] = torch.nn.functional.softplus(lse_v - z_v)
    lse_o[rows] = lse_v
    z_t[rows] = z_v
    return loss, lse_o, z_t


@margin_ce_forward.register_fake
def _(embeddings, weight, target, kind, s, m1, m2, m3, easy_margin, overflow, gradient, ignore_index, backend):
    B = target.shape[0]
    return tuple(embeddings.new_empty(B, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("nckernels::margin_ce_backward", mutates_args=())
def margin_ce_backward(
    embeddings: Tensor, weight: Tensor, target: Tensor, lse_o: Tensor, z_t: Tensor, grad_loss: Tensor, kind: str,
    s: float, m1: float, m2: float, m3: float, easy_margin: bool, overflow: str, gradient: str, ignore_index: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Gradients ``(d embeddings, d weight)`` of ``sum_i grad_loss_i loss_i``, in the inputs' dtypes."""
    rows, tgt = _valid_rows(target, ignore_index, weight.shape[0])
    de = torch.zeros_like(embeddings)
    if rows.numel() == 0:
        return de, torch.zeros_like(weight)
    with torch.autocast(embeddings.device.type, enabled=False):
        de_v, dw = shard_backward(embeddings[rows], weight, tgt, lse_o[rows], z_t[rows], grad_loss[rows], kind, s,
                                  m1, m2, m3, easy_margin, overflow, gradient, backend)
    de[rows] = de_v.to(de.dtype)
    return de, dw.to(weight.dtype)


@margin_ce_backward.register_fake
def _(embeddings, weight, target, lse_o, z_t, grad_loss, kind, s, m1, m2, m3, easy_margin, overflow, gradient,
      ignore_index, backend):
    return torch.empty_like(embeddings), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    embeddings, weight, target, *options = inputs
    ctx.options = options
    ctx.save_for_backward(embeddings, weight, target, output[1], output[2])


def _backward(ctx, grad_loss, grad_lse, grad_z):
    embeddings, weight, target, lse_o, z_t = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse_o)
    de, dw = margin_ce_backward(embeddings, weight, target, lse_o, z_t, grad_loss.contiguous(), *ctx.options)
    return (de, dw) + (None,) * 11


torch.library.register_autograd("nckernels::margin_ce_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- pair-wise Circle (fused kernel)
# The reference path is differentiable PyTorch (reference.margin.pair_circle); these ops serve the
# Triton kernels, which keep the B x B similarities in registers.


def pair_circle_has_both(lse_n: Tensor, lse_p: Tensor) -> Tensor:
    """The anchors with a positive and a negative (both log-sum-exps finite-or-above ``-inf``)."""
    return (lse_n > float("-inf")) & (lse_p > float("-inf"))


def _pair_circle_terms(lse_n: Tensor, lse_p: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, has_both)``: ``x = lse_n + lse_p`` (0 elsewhere) and :func:`pair_circle_has_both`."""
    has_both = pair_circle_has_both(lse_n, lse_p)
    return torch.where(has_both, lse_n + lse_p, 0.0), has_both


@torch.library.custom_op("nckernels::pair_circle_forward", mutates_args=())
def pair_circle_forward(embeddings: Tensor, labels: Tensor, gamma: float, margin: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor ``(loss, lse_n, lse_p)`` (fp32): ``loss = softplus(lse_n + lse_p)``, 0 for anchors
    without both a positive and a negative."""
    from ..kernels import linear_reduce

    e_hat, _ = ref.normalize(embeddings)
    with torch.autocast(embeddings.device.type, enabled=False):
        lse_n, lse_p = linear_reduce.pair_circle_forward(e_hat.to(embeddings.dtype), labels, gamma, margin)
    x, has_both = _pair_circle_terms(lse_n, lse_p)
    return torch.where(has_both, torch.nn.functional.softplus(x), 0.0), lse_n, lse_p


@pair_circle_forward.register_fake
def _(embeddings, labels, gamma, margin):
    return tuple(embeddings.new_empty(embeddings.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("nckernels::pair_circle_backward", mutates_args=())
def pair_circle_backward(embeddings: Tensor, labels: Tensor, lse_n: Tensor, lse_p: Tensor, grad_loss: Tensor,
                         gamma: float, margin: float) -> Tensor:
    """``d embeddings`` of ``sum_i grad_i loss_i``: ``dloss_i/dx_i = sigmoid(x_i)``."""
    from ..kernels import linear_reduce

    e_hat, e_norm = ref.normalize(embeddings)
    x, has_both = _pair_circle_terms(lse_n, lse_p)
    coef = torch.where(has_both, grad_loss.float() * torch.sigmoid(x), 0.0)
    inf = torch.full_like(lse_n, float("inf"))
    with torch.autocast(embeddings.device.type, enabled=False):
        de_hat = linear_reduce.pair_circle_backward(e_hat.to(embeddings.dtype), labels, torch.where(has_both, lse_n, inf),
                                                    torch.where(has_both, lse_p, inf), coef, gamma, margin)
    return ref.normalize_backward(e_hat, e_norm, de_hat).to(embeddings.dtype)


@pair_circle_backward.register_fake
def _(embeddings, labels, lse_n, lse_p, grad_loss, gamma, margin):
    return torch.empty_like(embeddings)


def _pair_setup(ctx, inputs, output):
    embeddings, labels, ctx.gamma, ctx.margin = inputs
    ctx.save_for_backward(embeddings, labels, output[1], output[2])


def _pair_backward(ctx, grad_loss, *_):
    embeddings, labels, lse_n, lse_p = ctx.saved_tensors
    grad_loss = torch.zeros_like(lse_n) if grad_loss is None else grad_loss.contiguous()
    return pair_circle_backward(embeddings, labels, lse_n, lse_p, grad_loss, ctx.gamma, ctx.margin), None, None, None


torch.library.register_autograd("nckernels::pair_circle_forward", _pair_backward, setup_context=_pair_setup)
