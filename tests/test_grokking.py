"""Softmax Collapse end to end (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability").

A 2-layer ReLU MLP (no biases, as in the paper's MLP) memorises modular addition ``(a + b) mod p``
from one-hot ``(a, b)`` with full-batch AdamW, no weight decay, in float32. After memorisation
the only way left to lower the cross-entropy is to scale the logits up (naive loss
minimisation); with softmax this drives most training rows into Softmax Collapse (SC) within a
few hundred steps: ``sum_j exp(z_j - max z)`` rounds to exactly 1, the loss and the target
logit's gradient of those rows become exactly 0. The same run with StableMax cross-entropy
(``s(x) = x + 1`` / ``1 / (1 - x)``, rational instead of exponential) grows its logits even
further, yet keeps a non-zero loss and gradient on every row.

The settings are the paper's MLP recipe (AdamW, lr 1e-2, no weight decay, full batch, ~half of
the pairs for training) at a small modulus, with ``beta2 = 0.9``: Adam then limits the growth of
the margins to about ``-ln(beta2) / 2`` per step, so SC arrives after ~300 steps instead of
several thousand (``beta2 = 0.99``: ~2000 steps). Observed with seeds 0-5: SC fraction > 0.5
first at step 300 for every seed, staying within 0.53-0.69 up to step 1000.

The softmax run trains with PyTorch's float32 ``F.cross_entropy`` (a log-softmax), as the paper
does, not with ``nckernels.cross_entropy``: the latter's loss ``lse - z_y`` absorbs ``log(sumexp)``
into a large ``lse`` (see ``test_nckernels_cross_entropy_keeps_small_losses_at_large_logits``), so
its target-logit gradient vanishes before SC; trained with it, this run peaks at SC 0.24 (step
400), then the logits drift to |z| ~ 500 with margins ~12: SC 0, ``zero_loss_fraction`` ~0.7, while
``F.cross_entropy`` on the same logits has no zero row. Every nckernels call uses ``impl="reference"`` (the Triton
interpreter would be far too slow for a training loop).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nckernels

P = 23  # modulus: 23 * 23 = 529 pairs
HIDDEN = 128
TRAIN_FRACTION = 0.5
SEED = 0
ADAMW = dict(lr=1e-2, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)
CHECK_EVERY = 25
SOFTMAX_MAX_STEPS = 600  # SC > 0.5 is reached at step 300 with these settings
STABLEMAX_STEPS = 400
SC_THRESHOLD = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is fastest


def modular_addition_train_set(p: int, fraction: float, seed: int):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    keep = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))[: int(fraction * p * p)]
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
    return x[keep], ((a + b) % p)[keep]


def train(loss_fn, steps: int, stop_at_sc: float | None = None):
    """Full-batch AdamW on the training set; ``softmax_collapse`` of the training logits every
    ``CHECK_EVERY`` steps. Returns ``(model, x, y, history, losses)`` with ``history`` a list of
    ``(step, sc_fraction, zero_loss_fraction)``; stops early once ``sc_fraction > stop_at_sc``."""
    x, y = modular_addition_train_set(P, TRAIN_FRACTION, SEED)
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(torch.nn.Linear(2 * P, HIDDEN, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, P, bias=False))
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    history, losses = [], []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % CHECK_EVERY == 0:
            with torch.no_grad():
                sc = nckernels.softmax_collapse(model(x), y, impl="reference")
            history.append((step, sc.sc_fraction.item(), sc.zero_loss_fraction.item()))
            if stop_at_sc is not None and history[-1][1] > stop_at_sc:
                break
    return model, x, y, history, losses


def torch_sc_rows(z: torch.Tensor) -> torch.Tensor:
    """Softmax Collapse by definition, in plain torch: ``sum_j exp(z_j - max z) == 1`` in fp32."""
    assert z.dtype == torch.float32
    return torch.exp(z - z.amax(dim=-1, keepdim=True)).sum(dim=-1) == 1


def test_softmax_cross_entropy_reaches_softmax_collapse():
    model, x, y, history, _ = train(lambda z, t: F.cross_entropy(z, t), SOFTMAX_MAX_STEPS, stop_at_sc=SC_THRESHOLD)
    steps_run, sc_fraction, zero_loss_fraction = history[-1]
    assert history[0][1] == 0.0, f"no collapse expected right after initialisation, got {history[0]}"
    assert sc_fraction > SC_THRESHOLD, (
        f"softmax run did not reach Softmax Collapse > {SC_THRESHOLD} within {SOFTMAX_MAX_STEPS} steps: {history}")
    with torch.no_grad():
        z = model(x)
    assert z.dtype == torch.float32
    assert bool((z.argmax(dim=1) == y).all()), "the training set should be memorised"

    stats = nckernels.softmax_collapse(z, y, impl="reference")
    assert stats.rows == y.numel()
    assert stats.sc_fraction.item() == pytest.approx(sc_fraction)
    assert stats.zero_loss_fraction.item() > SC_THRESHOLD
    assert stats.zero_loss_fraction.item() >= stats.sc_fraction.item()  # a collapsed row has loss 0

    # the nckernels measure agrees with the definition computed directly in torch (up to one row,
    # should the kernel ever sum in another order than torch.sum)
    collapsed = torch_sc_rows(z)
    assert abs(collapsed.float().mean().item() - stats.sc_fraction.item()) <= 1 / y.numel() + 1e-7

    # what collapse means for training: on those rows PyTorch's float32 loss, log(sumexp), and the
    # target logit's gradient, p_y - 1, are nothing but rounding noise (0, or one ulp of 1 where
    # torch's vectorised approximate exp rounds exp(0) up), while float64 still has a positive loss
    # and a negative gradient that pulls the target logit up: that signal is what float32 lost
    zz = z.clone().requires_grad_()
    row_loss = F.cross_entropy(zz, y, reduction="none")
    (grad,) = torch.autograd.grad(row_loss.sum(), zz)
    row_loss64 = F.cross_entropy(zz.double(), y, reduction="none")
    (grad64,) = torch.autograd.grad(row_loss64.sum(), zz)
    noise = 2.0**-23
    assert bool((row_loss[collapsed].abs() <= noise).all())
    assert bool((grad[collapsed, y[collapsed]].abs() <= noise).all())
    assert bool((row_loss64[collapsed] > 0).all()) and bool((grad64[collapsed, y[collapsed]] < 0).all())


def test_stablemax_cross_entropy_does_not_collapse():
    model, x, y, history, losses = train(
        lambda z, t: nckernels.stablemax_cross_entropy(z, t, impl="reference"), STABLEMAX_STEPS)
    with torch.no_grad():
        z = model(x)
    assert bool((z.argmax(dim=1) == y).all()), "the training set should be memorised"
    # the logits are no smaller than the softmax run's: under softmax they would be collapsed ...
    assert nckernels.softmax_collapse(z, y, impl="reference").sc_fraction.item() > SC_THRESHOLD
    assert torch_sc_rows(z).float().mean().item() > SC_THRESHOLD

    # ... but StableMax's loss and gradient stay non-zero on every row
    zz = z.clone().requires_grad_()
    row_loss = nckernels.stablemax_cross_entropy(zz, y, reduction="none", impl="reference")
    (grad,) = torch.autograd.grad(row_loss.sum(), zz)
    zero_loss_fraction = (row_loss == 0).float().mean().item()
    assert zero_loss_fraction < 0.05, f"StableMax CE is exactly 0 on {zero_loss_fraction:.1%} of the rows"
    assert bool((row_loss > 0).all())
    assert bool((grad.norm(dim=1) > 0).all()) and bool((grad.gather(1, y[:, None]) < 0).all())

    # StableMax's analogue of SC: the target probability s(z_y) / sum_j s(z_j) rounds to exactly 1
    p_target = nckernels.stablemax(z, impl="reference").gather(1, y[:, None]).squeeze(1)
    s = torch.where(z >= 0, z + 1, 1 / (1 - z.clamp(max=0)))
    p_target_torch = (s / s.sum(dim=1, keepdim=True)).gather(1, y[:, None]).squeeze(1)
    assert (p_target == 1).float().mean().item() < 0.05
    assert (p_target_torch == 1).float().mean().item() < 0.05

    # and it is still learning: the parameters get a gradient and the loss keeps falling
    model.zero_grad()
    nckernels.stablemax_cross_entropy(model(x), y, impl="reference").backward()
    assert sum(p.grad.norm() ** 2 for p in model.parameters()).sqrt().item() > 0
    assert losses[-1] < 0.9 * losses[-101], (losses[-101], losses[-1])


def test_nckernels_cross_entropy_keeps_small_losses_at_large_logits():
    z = torch.tensor([[30.0, 14.0], [3000.0, 2990.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    assert not torch_sc_rows(z.detach()).any()  # neither row is collapsed
    # lse = max + log(sumexp) rounded to fp32 would absorb log(sumexp) < ulp(max) / 2 and give loss 0 and a
    # zero target gradient; the loss must be (max - z_y) + log(sumexp), as F.cross_entropy computes it.
    # (In fp32, 1 + 1.1e-7 itself rounds to 1 + 1.19e-7: F.cross_entropy's fp32 value is the bar.)
    expected = F.cross_entropy(z.detach(), y, reduction="none")  # 1.19e-7, 4.54e-5
    (expected_grad,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    for impl in ("reference", "triton"):
        ours = nckernels.cross_entropy(z, y, reduction="none", impl=impl)
        (grad,) = torch.autograd.grad(ours.sum(), z)
        assert (ours > 0).all() and (grad[:, 0] < 0).all(), (impl, ours, grad)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad[:, 0], expected_grad[:, 0], rtol=0.6, atol=0)  # p_y within 1 ulp of 1
