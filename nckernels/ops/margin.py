"""``nckernels::margin_ce_forward`` / ``margin_ce_backward``: the normalised-linear margin losses.

One pair of custom ops serves CosFace, ArcFace, the combined margin and class-level Circle
(``kind`` and the floats ``s, m1, m2, m3`` select the logit transforms; see
``reference/margin.py`` for the math). The forward returns the per-row loss and the
log-sum-exp over the non-target classes ``lse^o`` (fp32, zeros at ignored rows); the backward
recomputes the cosines chunk by chunk from ``lse^o``. Argument checks live in ``functional.py``.
Only the reference backend exists so far (the Triton logit transforms are a later step).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import margin as ref


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
) -> tuple[Tensor, Tensor]:
    B, C = target.shape[0], weight.shape[0]
    loss = torch.zeros(B, dtype=torch.float32, device=embeddings.device)
    lse_o = torch.zeros(B, dtype=torch.float32, device=embeddings.device)
    rows, tgt = _valid_rows(target, ignore_index, C)
    if rows.numel() == 0:
        return loss, lse_o
    with torch.autocast(embeddings.device.type, enabled=False):
        loss_v, lse_v = ref.forward(embeddings[rows], weight, tgt, kind, s, m1, m2, m3, easy_margin, overflow)
    loss[rows] = loss_v
    lse_o[rows] = lse_v
    return loss, lse_o


@margin_ce_forward.register_fake
def _(embeddings, weight, target, kind, s, m1, m2, m3, easy_margin, overflow, gradient, ignore_index, backend):
    B = target.shape[0]
    return embeddings.new_empty(B, dtype=torch.float32), embeddings.new_empty(B, dtype=torch.float32)


@torch.library.custom_op("nckernels::margin_ce_backward", mutates_args=())
def margin_ce_backward(
    embeddings: Tensor, weight: Tensor, target: Tensor, lse_o: Tensor, grad_loss: Tensor, kind: str, s: float,
    m1: float, m2: float, m3: float, easy_margin: bool, overflow: str, gradient: str, ignore_index: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Gradients ``(d embeddings, d weight)`` of ``sum_i grad_loss_i loss_i``, in the inputs' dtypes."""
    rows, tgt = _valid_rows(target, ignore_index, weight.shape[0])
    de = torch.zeros_like(embeddings)
    if rows.numel() == 0:
        return de, torch.zeros_like(weight)
    with torch.autocast(embeddings.device.type, enabled=False):
        de_v, dw = ref.backward(embeddings[rows], weight, tgt, lse_o[rows], grad_loss[rows], kind, s, m1, m2, m3,
                                easy_margin, overflow, gradient)
    de[rows] = de_v.to(de.dtype)
    return de, dw.to(weight.dtype)


@margin_ce_backward.register_fake
def _(embeddings, weight, target, lse_o, grad_loss, kind, s, m1, m2, m3, easy_margin, overflow, gradient,
      ignore_index, backend):
    return torch.empty_like(embeddings), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    embeddings, weight, target, *options = inputs
    ctx.options = options
    ctx.save_for_backward(embeddings, weight, target, output[1])


def _backward(ctx, grad_loss, grad_lse):
    embeddings, weight, target, lse_o = ctx.saved_tensors
    kind, s, m1, m2, m3, easy_margin, overflow, gradient, ignore_index, backend = ctx.options
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse_o)
    de, dw = margin_ce_backward(embeddings, weight, target, lse_o, grad_loss.contiguous(), kind, s, m1, m2, m3,
                                easy_margin, overflow, gradient, ignore_index, backend)
    return (de, dw) + (None,) * 11


torch.library.register_autograd("nckernels::margin_ce_forward", _backward, setup_context=_setup_context)
