"""What the margin-loss benchmarks (CPU and GPU) share: settings, inputs, nckernels and dense eager losses.

Class-level losses take ``(embeddings (B, D), weight (C, D), target (B,))``; the pair-wise Circle
loss takes ``(embeddings (B, D), labels (B,))``. The dense versions are what one writes in plain
PyTorch: the ``B x C`` (or ``B x B``) fp32 cosine matrix, its transformed logits and
``F.cross_entropy`` (``softplus`` of two masked log-sum-exps for the pair loss), differentiated
by autograd; given float64 inputs they compute in float64 throughout (an oracle).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import nckernels

SCALE = 64.0                # CosFace / ArcFace s
COSFACE_MARGIN = 0.35
ARCFACE_MARGIN = 0.5        # radians (pytorch-metric-learning takes degrees)
CIRCLE_GAMMA, CIRCLE_MARGIN = 256.0, 0.25   # class-level Circle: the face setting (nckernels' defaults)
PAIR_GAMMA, PAIR_MARGIN = 80.0, 0.4         # pair-wise Circle: pytorch-metric-learning's defaults
SAMPLES_PER_CLASS = 4       # pair-wise batches are P classes x K = 4 samples (every anchor has a positive)

CLASS_LOSSES = ("cosface", "arcface", "circle")
LOSSES = CLASS_LOSSES + ("pair_circle",)


def make_inputs(loss, B, D, C, *, device="cpu", dtype=torch.float32, seed=0):
    """``(leaves, labels)``: the tensors to differentiate and the labels of one case.

    Embeddings sit near their class centre (``e = w_y + 1.5 noise``, target cosine ~0.55), as in
    training, so that the margin transforms see realistic angles. ``C`` is ignored by ``pair_circle``."""
    g = torch.Generator(device=device).manual_seed(seed)
    if loss == "pair_circle":
        labels = torch.randperm(B, generator=g, device=device) // SAMPLES_PER_CLASS
        centres = torch.randn(B // SAMPLES_PER_CLASS + 1, D, generator=g, device=device)
    else:
        labels = torch.randint(0, C, (B,), generator=g, device=device)
        centres = torch.randn(C, D, generator=g, device=device)
    x = centres[labels] + 1.5 * torch.randn(B, D, generator=g, device=device)
    x = x.to(dtype).requires_grad_()
    if loss == "pair_circle":
        return (x,), labels
    return (x, centres.requires_grad_()), labels


def nckernels_loss(loss, impl="auto"):
    """The nckernels function of ``loss`` with the benchmark's settings."""
    return {
        "cosface": lambda x, w, y: nckernels.cosface_loss(x, w, y, scale=SCALE, margin=COSFACE_MARGIN, impl=impl),
        "arcface": lambda x, w, y: nckernels.arcface_loss(x, w, y, scale=SCALE, margin=ARCFACE_MARGIN, impl=impl),
        "circle": lambda x, w, y: nckernels.circle_loss(x, w, y, gamma=CIRCLE_GAMMA, margin=CIRCLE_MARGIN,
                                                        impl=impl),
        "pair_circle": lambda x, y: nckernels.pair_circle_loss(x, y, gamma=PAIR_GAMMA, margin=PAIR_MARGIN,
                                                               impl=impl),
    }[loss]


# ----------------------------------------------------------------------------- dense eager PyTorch


def _cosines(a, b):
    """``a_hat @ b_hat.T``: rows L2-normalised in fp32 (fp64 for fp64 input), the matmul in ``a``'s dtype
    (as under autocast), the result in fp32 (fp64)."""
    wide = torch.promote_types(a.dtype, torch.float32)
    a_hat, b_hat = (F.normalize(t.to(wide), dim=1).to(a.dtype) for t in (a, b))
    return (a_hat @ b_hat.T).to(wide)


def _dense_class_loss(x, w, y, target_logit, other_logit):
    """Softmax CE over the full ``B x C`` fp32 logits: ``other_logit(cos)`` with the target column
    ``target_logit(cos_y)``. The cosine matmul runs in the embeddings' dtype."""
    cos = _cosines(x, w)
    target = y[:, None]
    logits = other_logit(cos).scatter(1, target, target_logit(cos.gather(1, target)))
    return F.cross_entropy(logits, y)


def dense_cosface(x, w, y):
    return _dense_class_loss(x, w, y, lambda c: SCALE * (c - COSFACE_MARGIN), lambda c: SCALE * c)


def dense_arcface(x, w, y):
    """``s cos(theta + m)`` on the target where ``theta + m <= pi``, else ``s (cos - m sin m)`` (insightface's rule)."""
    m = ARCFACE_MARGIN

    def target(c):
        theta = torch.acos(c.clamp(-1.0, 1.0))
        return SCALE * torch.where(theta <= math.pi - m, torch.cos(theta + m), c - m * math.sin(m))

    return _dense_class_loss(x, w, y, target, lambda c: SCALE * c)


def dense_circle(x, w, y):
    """Class-level Circle: ``g [1 + m - c]_+ (c - (1 - m))`` on the target, ``g [c + m]_+ (c - m)`` elsewhere."""
    g, m = CIRCLE_GAMMA, CIRCLE_MARGIN
    return _dense_class_loss(x, w, y, lambda c: g * (1 + m - c).detach().clamp_min(0) * (c - (1 - m)),
                             lambda c: g * (c + m).detach().clamp_min(0) * (c - m))


def dense_pair_circle(x, y):
    """Pair-wise Circle over the ``B x B`` similarities, mean over anchors (each needs a positive and a negative)."""
    g, m = PAIR_GAMMA, PAIR_MARGIN
    sim = _cosines(x, x)
    same = y[:, None] == y[None, :]
    positive = same & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    logit_p = (-g * (1 + m - sim).detach().clamp_min(0) * (sim - (1 - m))).masked_fill(~positive, -math.inf)
    logit_n = (g * (sim + m).detach().clamp_min(0) * (sim - m)).masked_fill(same, -math.inf)
    return F.softplus(torch.logsumexp(logit_p, 1) + torch.logsumexp(logit_n, 1)).mean()


DENSE = {"cosface": dense_cosface, "arcface": dense_arcface, "circle": dense_circle, "pair_circle": dense_pair_circle}


def step(fn, leaves, labels):
    """One forward + backward: ``(loss, grads of leaves)``."""
    loss = fn(*leaves, labels)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def rel_err(a, b):
    """``||a - b|| / ||b||`` in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
