"""OrthoGrad (⊥Grad) against float64 hand computations, and its optimizer plumbing."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from nckernels.optim import OrthoGrad

F64 = torch.float64


# ----------------------------------------------------------------------------- float64 oracles

def ortho64(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """⊥Grad by hand in float64: ``g - (w.g)/(w.w) w`` rescaled to ``||g||`` (shape of ``g``)."""
    wf, gf = w.detach().to(F64).reshape(-1), g.detach().to(F64).reshape(-1)
    g_perp = gf - (wf @ gf) / (wf @ wf) * wf
    return (g_perp * (gf.norm() / g_perp.norm())).view(g.shape)


class Quadratic:
    """``L(w) = 0.5 ||A vec(w) - c||^2`` for a parameter of ``shape``: gradients by autograd (fp32, for
    the optimizer) and by hand (``A^T (A w - c)`` in float64, for the oracle)."""

    def __init__(self, shape, seed):
        gen = torch.Generator().manual_seed(seed)
        n = math.prod(shape)
        self.A = torch.randn(n + 3, n, generator=gen, dtype=F64) / math.sqrt(n)
        self.c = torch.randn(n + 3, generator=gen, dtype=F64)

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        r = self.A.to(w.dtype) @ w.reshape(-1) - self.c.to(w.dtype)
        return 0.5 * (r * r).sum()

    def grad64(self, w64: torch.Tensor) -> torch.Tensor:
        return (self.A.T @ (self.A @ w64.reshape(-1) - self.c)).view(w64.shape)


def make_param(shape=(4, 5), seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(scale * torch.randn(shape, generator=gen))


def backward(opt, problems, params):
    opt.zero_grad()
    sum(pb.loss(p) for pb, p in zip(problems, params)).backward()


def close(actual: torch.Tensor, expected64: torch.Tensor, rtol=2e-5):
    torch.testing.assert_close(actual.detach().to(F64), expected64, rtol=rtol, atol=rtol * expected64.abs().max().item())


# ----------------------------------------------------------------------------- the projection

def test_projection_matches_float64_and_is_orthogonal():
    w = make_param((7, 9), seed=1)
    g = torch.randn(7, 9, generator=torch.Generator().manual_seed(2))
    w.grad = g.clone()
    OrthoGrad.orthogonalize_(w)
    close(w.grad, ortho64(w, g), rtol=1e-6)
    wf, gf = w.detach().to(F64).reshape(-1), w.grad.to(F64).reshape(-1)
    assert abs(wf @ gf) <= 1e-6 * wf.norm() * gf.norm()
    assert math.isclose(gf.norm().item(), g.to(F64).norm().item(), rel_tol=1e-6)  # norm preserved
    assert w.grad.dtype == torch.float32 and w.grad.shape == (7, 9)


def test_already_orthogonal_gradient_is_unchanged():
    # disjoint supports: w . g == 0 exactly -> the gradient must come back bit for bit
    w = torch.nn.Parameter(torch.cat([torch.randn(10), torch.zeros(10)]))
    g = torch.cat([torch.zeros(10), torch.randn(10)])
    w.grad = g.clone()
    OrthoGrad.orthogonalize_(w)
    assert torch.equal(w.grad, g)
    # a generic orthogonal direction (orthogonal in float64, rounded to fp32): unchanged to rounding
    w = make_param((6, 6), seed=3)
    r = torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    w64 = w.detach().to(F64)
    g = (r - (w64 * r).sum() / (w64 * w64).sum() * w64).float()
    w.grad = g.clone()
    OrthoGrad.orthogonalize_(w)
    torch.testing.assert_close(w.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [-2.0, 0.3, 1 / 3, -7.77, 1e-30, 1e20])
def test_parallel_gradient_gives_zero_update(factor):
    w = make_param((40, 25), seed=5)
    w0 = w.detach().clone()
    opt = OrthoGrad([w], torch.optim.SGD, lr=0.5)
    # parallel to w up to the fp32 rounding of each entry: the perpendicular part is ~1e-8 ||g||, which
    # must not be blown up to ||g|| (what the bare formula does), and nothing may become NaN
    w.grad = (factor * w.detach().to(F64)).float()
    opt.step()
    assert torch.isfinite(w.grad).all() and torch.isfinite(w).all()
    assert torch.equal(w.grad, torch.zeros_like(w.grad))
    assert torch.equal(w.detach(), w0)


def test_nearly_parallel_gradient_keeps_its_perpendicular_part():
    # 1e-4 of perpendicular component is information, not noise: projected and rescaled as usual
    w = make_param((40, 25), seed=14)
    r = torch.randn(40, 25, generator=torch.Generator().manual_seed(15), dtype=F64)
    w64 = w.detach().to(F64)
    perp = r - (w64 * r).sum() / (w64 * w64).sum() * w64
    g = (0.5 * w64 + 1e-4 * perp * (w64.norm() / perp.norm())).float()
    w.grad = g.clone()
    OrthoGrad.orthogonalize_(w)
    close(w.grad, ortho64(w, g), rtol=1e-3)  # ~1e-8 rounding of g, amplified 1e4 by the rescale


@pytest.mark.parametrize("w_scale,g_scale", [(1.0, 1e-30), (1.0, 1e30), (1e-25, 1.0), (1e25, 1e-3)])
def test_projection_at_extreme_scales(w_scale, g_scale):
    # squares of these would under/overflow fp32: the projection must still be the float64 one
    w = make_param((6, 5), seed=12, scale=w_scale)
    g = g_scale * torch.randn(6, 5, generator=torch.Generator().manual_seed(13))
    w.grad = g.clone()
    OrthoGrad.orthogonalize_(w)
    assert torch.isfinite(w.grad).all()
    close(w.grad, ortho64(w, g), rtol=1e-5)


def test_zero_gradient_stays_zero():
    w = make_param((3, 3), seed=6)
    w.grad = torch.zeros(3, 3)
    OrthoGrad.orthogonalize_(w)
    assert torch.equal(w.grad, torch.zeros(3, 3))


def test_zero_parameter_leaves_gradient_unchanged():
    w = torch.nn.Parameter(torch.zeros(4, 6))
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    opt = OrthoGrad([w], torch.optim.SGD, lr=0.1)
    w.grad = g.clone()
    opt.step()
    assert torch.equal(w.grad, g)  # nothing to project out, and no NaN from 0 / 0
    torch.testing.assert_close(w.detach(), -0.1 * g, rtol=0, atol=0)


def test_params_without_grad_are_skipped():
    a, b = make_param((3,), seed=8), make_param((3,), seed=9)
    opt = OrthoGrad([a, b], torch.optim.SGD, lr=0.1)
    b0 = b.detach().clone()
    a.grad = torch.ones(3)
    opt.step()
    assert b.grad is None and torch.equal(b.detach(), b0)


def test_low_precision_parameter_projected_in_fp32():
    w = make_param((16, 16), seed=10).to(torch.bfloat16).detach().requires_grad_()
    g = torch.randn(16, 16, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    w.grad = g.clone()
    OrthoGrad.orthogonalize_(w)
    assert w.grad.dtype == torch.bfloat16
    close(w.grad, ortho64(w, g), rtol=1e-2)  # bf16 output rounding
    wf, gf = w.detach().to(F64).reshape(-1), w.grad.to(F64).reshape(-1)
    assert abs(wf @ gf) <= 1e-2 * wf.norm() * gf.norm()


def test_complex_parameter_uses_real_view():
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    g = torch.randn(4, 3, dtype=torch.complex64)
    w.grad = g.clone()
    OrthoGrad.orthogonalize_(w)
    close(torch.view_as_real(w.grad), ortho64(torch.view_as_real(w), torch.view_as_real(g)), rtol=1e-6)


def test_sparse_gradient_rejected():
    w = torch.nn.Parameter(torch.randn(5, 2))
    w.grad = torch.randn(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        OrthoGrad([w]).step()


# ----------------------------------------------------------------------------- steps against float64 hand optimizers

def test_sgd_steps_match_float64_hand_computation():
    lr, momentum, wd, steps = 0.05, 0.7, 0.1, 4
    shapes = [(4, 5), (6,)]
    params = [make_param(s, seed=20 + i) for i, s in enumerate(shapes)]
    problems = [Quadratic(s, seed=30 + i) for i, s in enumerate(shapes)]
    opt = OrthoGrad(params, torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=wd)

    w64 = [p.detach().to(F64).clone() for p in params]
    buf = [None] * len(params)
    for _ in range(steps):
        backward(opt, problems, params)
        opt.step()
        for i, pb in enumerate(problems):  # torch.optim.SGD, written out: d = g + wd w; buf = mu buf + d
            d = ortho64(w64[i], pb.grad64(w64[i])) + wd * w64[i]
            buf[i] = d if buf[i] is None else momentum * buf[i] + d
            w64[i] = w64[i] - lr * buf[i]
    for p, e in zip(params, w64):
        close(p, e)


def hand_adamw(w64, lr, betas, eps, wd, steps, problem):
    b1, b2 = betas
    m = torch.zeros_like(w64)
    v = torch.zeros_like(w64)
    for t in range(1, steps + 1):
        g = ortho64(w64, problem.grad64(w64))
        w64 = w64 * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        w64 = w64 - lr * m_hat / (v_hat.sqrt() + eps)
    return w64


def run_orthograd_adamw(steps, **kwargs):
    w = make_param((5, 7), seed=40)
    pb = Quadratic((5, 7), seed=41)
    opt = OrthoGrad([w], torch.optim.AdamW, **kwargs)
    for _ in range(steps):
        backward(opt, [pb], [w])
        opt.step()
    return w.detach().clone(), opt, pb


def test_adamw_honours_betas_and_eps():
    lr, betas, eps, wd, steps = 0.05, (0.5, 0.6), 1e-3, 0.05, 5
    w, opt, pb = run_orthograd_adamw(steps, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    group = opt.base_optimizer.param_groups[0]
    assert group["betas"] == betas and group["eps"] == eps and group["weight_decay"] == wd
    expected = hand_adamw(make_param((5, 7), seed=40).detach().to(F64), lr, betas, eps, wd, steps, pb)
    close(w, expected)
    # the same run with AdamW's defaults (betas=(0.9, 0.999), eps=1e-8) is a different trajectory
    w_default, _, _ = run_orthograd_adamw(steps, lr=lr, weight_decay=wd)
    default64 = hand_adamw(make_param((5, 7), seed=40).detach().to(F64), lr, (0.9, 0.999), 1e-8, wd, steps, pb)
    close(w_default, default64)
    assert (w - w_default).abs().max() > 100 * 2e-5 * w.abs().max()


def test_unknown_keyword_is_not_dropped():
    with pytest.raises(TypeError):
        OrthoGrad([make_param()], torch.optim.SGD, lr=0.1, betas=(0.9, 0.99))  # SGD has no betas


def test_param_groups_with_different_lr():
    a, b = make_param((3, 4), seed=50), make_param((5,), seed=51)
    pa, pbm = Quadratic((3, 4), seed=52), Quadratic((5,), seed=53)
    opt = OrthoGrad([{"params": [a]}, {"params": [b], "lr": 0.001, "momentum": 0.0}], torch.optim.SGD, lr=0.1,
                    momentum=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.001]
    a64, b64 = a.detach().to(F64), b.detach().to(F64)
    buf = None
    for _ in range(3):
        backward(opt, [pa, pbm], [a, b])
        opt.step()
        d = ortho64(a64, pa.grad64(a64))
        buf = d if buf is None else 0.5 * buf + d
        a64 = a64 - 0.1 * buf
        b64 = b64 - 0.001 * ortho64(b64, pbm.grad64(b64))
    close(a, a64)
    close(b, b64)


# ----------------------------------------------------------------------------- optimizer plumbing

def test_shares_param_groups_state_and_defaults_with_base():
    w = make_param()
    opt = OrthoGrad([w], torch.optim.Adam, lr=1e-3, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    assert opt.defaults is opt.base_optimizer.defaults and opt.defaults["betas"] == (0.8, 0.9)
    assert "Adam" in repr(opt) and "OrthoGrad" in repr(opt)


def test_state_dict_round_trip_gives_identical_steps():
    def setup():
        w = make_param((4, 6), seed=60)
        return w, OrthoGrad([w], torch.optim.AdamW, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01)

    pb = Quadratic((4, 6), seed=61)
    w1, opt1 = setup()
    for _ in range(3):
        backward(opt1, [pb], [w1])
        opt1.step()
    sd = copy.deepcopy(opt1.state_dict())
    base_sd = opt1.base_optimizer.state_dict()  # the wrapper's state dict is the base optimizer's
    assert sd["param_groups"] == base_sd["param_groups"] and sd["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(sd["state"]) == {0} and set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert all(torch.equal(sd["state"][0][k], base_sd["state"][0][k]) for k in sd["state"][0])

    w2, opt2 = setup()
    with torch.no_grad():
        w2.copy_(w1)
    opt2.load_state_dict(sd)
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    for _ in range(3):
        backward(opt1, [pb], [w1])
        opt1.step()
        backward(opt2, [pb], [w2])
        opt2.step()
    assert torch.equal(w1.detach(), w2.detach())
    s1, s2 = opt1.state[w1], opt2.state[w2]
    assert all(torch.equal(s1[k], s2[k]) for k in ("step", "exp_avg", "exp_avg_sq"))

    # the format is the base optimizer's: a plain AdamW loads it and continues identically
    w3 = torch.nn.Parameter(w1.detach().clone())
    plain = torch.optim.AdamW([w3], lr=0.02)
    plain.load_state_dict(opt1.state_dict())
    assert plain.param_groups[0]["betas"] == (0.8, 0.95)


def test_lr_scheduler_drives_base_optimizer():
    w = make_param((3, 5), seed=70)
    pb = Quadratic((3, 5), seed=71)
    opt = OrthoGrad([w], torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    for expected_lr in (1.0, 0.1, 0.01):
        assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)
        backward(opt, [pb], [w])
        w_before = w.detach().to(F64).clone()
        g_expected = ortho64(w_before, pb.grad64(w_before))
        opt.step()
        close(w.detach().to(F64) - w_before, -expected_lr * g_expected, rtol=1e-4)
        sched.step()
    # schedulers that read momentum/betas from optimizer.defaults work too
    opt = OrthoGrad([make_param()], torch.optim.AdamW, lr=1e-3)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    lr0 = opt.base_optimizer.param_groups[0]["lr"]
    opt.step()
    one_cycle.step()
    assert opt.base_optimizer.param_groups[0]["lr"] > lr0


def test_closure_gradients_are_projected():
    w = make_param((4, 4), seed=80)
    pb = Quadratic((4, 4), seed=81)
    opt = OrthoGrad([w], torch.optim.SGD, lr=0.1)
    w64 = w.detach().to(F64)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = pb.loss(w)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and loss.item() == pytest.approx(pb.loss(w64).item(), rel=1e-5)
    close(w, w64 - 0.1 * ortho64(w64, pb.grad64(w64)))
    # an optimizer that evaluates the closure several times per step
    lb = OrthoGrad([w], torch.optim.LBFGS, lr=0.5, max_iter=3)
    evaluations = []

    def lbfgs_closure():
        lb.zero_grad()
        loss = pb.loss(w)
        loss.backward()
        evaluations.append(w.detach().clone())
        return loss

    before = w.detach().clone()
    lb.step(lbfgs_closure)
    assert len(evaluations) >= 2 and torch.isfinite(w).all() and not torch.equal(before, w.detach())


def test_zero_grad_and_add_param_group():
    a, b = make_param((3,), seed=90), make_param((2, 2), seed=91)
    opt = OrthoGrad([a], torch.optim.SGD, lr=0.1)
    a.grad = torch.ones(3)
    opt.zero_grad()
    assert a.grad is None
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["momentum"] == 0  # base defaults filled in
    g = torch.randn(2, 2, generator=torch.Generator().manual_seed(92))
    b.grad = g.clone()
    b64 = b.detach().to(F64)
    opt.step()
    close(b, b64 - 0.5 * ortho64(b64, g))
    assert len(opt.state_dict()["param_groups"]) == 2
    with pytest.raises(ValueError):  # the base optimizer's own validation: a parameter in two groups
        opt.add_param_group({"params": [a]})


def test_hooks_and_deepcopy():
    w = make_param((3, 3), seed=93)
    opt = OrthoGrad([w], torch.optim.Adam, lr=0.01)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("step"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load"))
    w.grad = torch.randn(3, 3)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert seen == ["step", "sd", "load"]
    clone = copy.deepcopy(opt)
    assert clone.param_groups is clone.base_optimizer.param_groups and clone.state is clone.base_optimizer.state
    assert clone.param_groups[0]["params"][0] is not w


@pytest.mark.parametrize("bad", [torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), torch.nn.Linear,
                                 "SGD", lambda params, **kw: None, 3])
def test_bad_base_optimizer_cls_raises_type_error(bad):
    with pytest.raises(TypeError, match="base_optimizer_cls"):
        OrthoGrad([make_param()], bad, lr=0.1)
