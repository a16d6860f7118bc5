"""The StableMax family against float64 oracles (``oracle_rowwise.py``), on every backend.

``stablemax`` / ``log_stablemax`` (reference, triton), ``stablemax_cross_entropy`` and
``linear_stablemax_cross_entropy`` (reference, cpp, triton). StableMax (Prieto et al. 2025):
``s(x) = x + 1`` (x >= 0), ``1 / (1 - x)`` (x < 0); the loss is computed as
``log1p(S_other / s_y)``, exact in fp32 on confident rows where ``-log(s_y / S)`` is not, and its
gradient is ``(p_j - [j = y]) / (1 + |x_j|)``. The Triton configs run in the interpreter (fp32,
fp16); the cpp configs need ``stablemax_rows_forward`` / ``stablemax_rows_backward_`` in the
C++ extension.
"""
from __future__ import annotations

import pytest
import torch

import nckernels as nk
from conftest import CONFIGS
from oracle_rowwise import (
    assert_close,
    linear_stablemax_cross_entropy_oracle,
    log_stablemax_oracle,
    stablemax_cross_entropy_grad_formula,
    stablemax_cross_entropy_oracle,
    stablemax_oracle,
    stablemax_s_oracle,
)
from test_rowwise import (ALL_LENGTHS, LAYOUTS, ROW_CFGS, ROW_CFGS_FP32, ROW_CFGS_LAYOUT, ROW_LENGTHS, check_ce,
                          make_ce_case, n_rows, need_cpp, pairwise_subset, upstream)

OPS = {
    "stablemax": (nk.stablemax, stablemax_oracle),
    "log_stablemax": (nk.log_stablemax, log_stablemax_oracle),
}


def stable_logits(shape, cfg, *, seed=0, scale=3.0):
    """Random logits with exact 1.0, 0.0 and -1.0 entries sprinkled in (the branch points of s)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    flat = x.view(-1)
    if flat.numel():
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 8),), generator=g)
        flat[idx] = torch.tensor([1.0, 0.0, -1.0]).repeat(idx.numel())[: idx.numel()]
    return x.to(cfg.device, cfg.dtype)


def check_stableop(name, x, cfg, *, dim=-1, tol=None, seed=0):
    ours, oracle = OPS[name]
    tol = tol or cfg.tol
    xi = x.detach().requires_grad_()
    y = ours(xi, dim, impl=cfg.impl)
    xo = x.detach().double().requires_grad_()
    yo = oracle(xo, dim)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, yo, tol, f"{name} value")
    g = upstream(y.shape, seed, y.dtype)
    y.backward(g)
    yo.backward(g.double())
    assert xi.grad is not None and xi.grad.dtype == x.dtype and xi.grad.shape == x.shape
    assert bool(torch.isfinite(xi.grad).all()), f"{name}: non-finite gradient"
    # gross magnitude of the gradient terms (error scale where they cancel, e.g. rows of length 1)
    scale = 0.0
    if x.numel():
        p = stablemax_oracle(xo.detach(), dim)
        ga = g.double().abs()
        if name == "stablemax":
            gross = p * (ga + (ga * p).sum(dim, keepdim=True))
        else:
            gross = ga + p * ga.sum(dim, keepdim=True)
        scale = max(xo.grad.abs().max().item(), gross.max().item())
    assert_close(xi.grad, xo.grad, tol, f"{name} d input", scale=scale)
    return y, xi.grad


# ----------------------------------------------------------------------------- stablemax / log_stablemax


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg,C", ROW_LENGTHS)
def test_stablemax_lengths(rcfg, name, C):
    check_stableop(name, stable_logits((n_rows(rcfg, C), C), rcfg, seed=C), rcfg)


@pytest.mark.parametrize("layout", ["dim0", "dim1-of-3d", "dim1-of-3d-long", "transposed-last", "transposed-dim0"])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg", ROW_CFGS_LAYOUT)
def test_stablemax_dims_and_strides(rcfg, name, layout):
    shape, dim, transposed = LAYOUTS[layout]
    x = stable_logits(shape, rcfg, seed=3)
    if transposed:
        x = x.T
        assert not x.is_contiguous()
    check_stableop(name, x, rcfg, dim=dim)


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 5)], ids=["0rows", "0rows-3d"])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg", ROW_CFGS)
def test_stablemax_empty(rcfg, name, shape):
    y, grad = check_stableop(name, stable_logits(shape, rcfg), rcfg)
    assert y.shape == shape and grad.shape == shape


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg", ROW_CFGS_FP32)
def test_stablemax_at_one_and_large(rcfg, name):
    """x = 1.0 exactly (where 1 / (1 - x) would divide by 0), 0, -1, and magnitudes up to 1e8:
    finite values and gradients, equal to the oracle."""
    x = torch.tensor([
        [1.0, 1.0, 1.0, 1.0, 1.0],
        [1.0, -1.0, 0.0, 2.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [1e8, 1.0, -1.0, 0.5, -1e8],
        [-3e4, 1.0, 7e5, -0.25, 1.0],
    ], device=rcfg.device)
    y, grad = check_stableop(name, x, rcfg)
    assert bool(torch.isfinite(y).all())
    if name == "stablemax":
        torch.testing.assert_close(y[0], torch.full((5,), 0.2), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- stablemax_cross_entropy


def check_smce(cfg, case, *, reduction="mean", tol=None, seed=0):
    """Loss and input gradient of ``stablemax_cross_entropy`` vs the float64 oracle."""
    tol = tol or cfg.tol
    x0, t, w, ii = case["input"], case["target"], case["weight"], case["ignore_index"]
    snapshot = x0.clone()
    xi = x0.detach().requires_grad_()
    loss = nk.stablemax_cross_entropy(xi, t, w, ii, reduction, impl=cfg.impl)
    xo = x0.detach().double().requires_grad_()
    loss_o = stablemax_cross_entropy_oracle(xo, t, w, ii, reduction)
    assert loss.dtype == torch.float32 and loss.shape == loss_o.shape
    assert_close(loss, loss_o, tol, "stablemax_cross_entropy loss")
    g = upstream(loss.shape, seed) if loss.dim() else torch.tensor(0.75)
    loss.backward(g)
    loss_o.backward(g.double())
    assert xi.grad is not None and xi.grad.dtype == x0.dtype and xi.grad.shape == x0.shape
    assert bool(torch.isfinite(xi.grad).all()), "non-finite gradient"
    # dL/dx_j = g w_y (p_j - [j = y]) / (1 + |x_j|): its terms are of size |g| w_y, even where they cancel
    # (C = 1 gives exactly 0), so that is the scale of the rounding error
    terms = float(g.abs().max()) * (float(w.max()) if w is not None else 1.0)
    assert_close(xi.grad, xo.grad, tol, "stablemax_cross_entropy d input",
                 scale=max(terms, float(xo.grad.abs().max())))
    ignored = t.long() == ii
    if bool(ignored.any()):
        rows = xi.grad.movedim(1, -1) if x0.dim() > 1 else xi.grad.unsqueeze(0)
        assert bool((rows[ignored.reshape(rows.shape[:-1])] == 0).all()), "ignored rows need zero gradient"
    assert torch.equal(x0, snapshot), "input was modified in place"
    return loss, xi.grad


SMCE_GRID = [dict(reduction=r, weight=w, ignore=i) for r in ["mean", "sum", "none"] for w in [False, True]
             for i in ["none", "some", "class3"]]
# every config: the whole grid, but a pairwise-covering subset in the slow interpreter
SMCE_PARAMS = [
    pytest.param(c, o, id=f"{c.id}-{o['reduction']}-{'w' if o['weight'] else 'now'}-ign_{o['ignore']}", marks=m)
    for c, m in CONFIGS for o in (pairwise_subset(SMCE_GRID) if c.interpreted else SMCE_GRID)
]


@pytest.mark.parametrize("ccfg,opts", SMCE_PARAMS)
def test_stablemax_ce_options(ccfg, opts):
    need_cpp(ccfg)
    case = make_ce_case(ccfg, (13, 37), weight=opts["weight"], ignore=opts["ignore"], seed=1, scale=3.0)
    check_smce(ccfg, case, reduction=opts["reduction"])


@pytest.mark.parametrize("ccfg,C", ALL_LENGTHS)
def test_stablemax_ce_lengths(ccfg, C):
    need_cpp(ccfg)
    cfg = ccfg
    case = make_ce_case(cfg, (n_rows(cfg, C), C), weight=True, ignore="some" if C > 1 else "none", seed=C,
                        scale=3.0)
    check_smce(cfg, case, reduction="sum")


REFERENCE_FP32 = next(c for c, _ in CONFIGS if c.impl == "reference" and c.dtype == torch.float32)


@pytest.mark.parametrize("loss", ["cross_entropy", "stablemax_cross_entropy"])
def test_reference_in_row_chunks(monkeypatch, loss):
    """The reference's row statistics and gradient in chunks of 2 rows (budget of 1 KiB) equal the oracle."""
    monkeypatch.setenv("NCKERNELS_REFERENCE_CHUNK_MB", str(1 / 1024))
    case = make_ce_case(REFERENCE_FP32, (13, 37), weight=True, ignore="some", seed=4, scale=3.0)
    if loss == "cross_entropy":
        check_ce(REFERENCE_FP32, case, reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    else:
        check_smce(REFERENCE_FP32, case, reduction="none")


CONFIDENT = [1e2, 1e4, 1e6, 1e8]


def _confident_rows(seed=0, per=3, C=16):
    """``per`` rows for each target logit in CONFIDENT, the other logits ~N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    R = per * len(CONFIDENT)
    x = torch.randn(R, C, generator=g)
    t = torch.randint(0, C, (R,), generator=g)
    big = torch.tensor(CONFIDENT).repeat_interleave(per)
    x[torch.arange(R), t] = big
    return x, t, big


def test_stablemax_ce_confident_rows_exact(backend):
    """Target logits of 1e2 .. 1e8: the fp32 loss (down to ~1e-7) keeps a small relative error
    against float64, while the naive fp32 ``-log(s_y / S)`` loses percents -- the log1p form matters."""
    x, t, big = _confident_rows()
    loss = nk.stablemax_cross_entropy(x, t, reduction="none", impl=backend.impl)
    exact = stablemax_cross_entropy_oracle(x, t, reduction="none")
    rel = ((loss.double() - exact) / exact).abs()
    assert bool((rel <= 1e-6).all()), f"relative errors {rel.tolist()}"

    s = torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))  # fp32, what a naive implementation does
    naive = -torch.log(s.gather(1, t[:, None]).squeeze(1) / s.sum(-1))
    rel_naive = ((naive.double() - exact) / exact).abs()
    assert rel_naive[big == 1e8].max() > 1e-2, f"naive errors {rel_naive.tolist()}"
    assert rel_naive[big == 1e6].max() > 1e-4, f"naive errors {rel_naive.tolist()}"
    assert rel_naive.max() > 1e3 * rel.max()


def test_stablemax_ce_confident_rows_gradient(backend):
    """The gradient on those rows vs the float64 hand formula, per row relative to its largest entry."""
    x, t, _ = _confident_rows(seed=1)
    xi = x.clone().requires_grad_()
    nk.stablemax_cross_entropy(xi, t, reduction="sum", impl=backend.impl).backward()
    formula = stablemax_cross_entropy_grad_formula(x, t)
    err = (xi.grad.double() - formula).abs().amax(1) / formula.abs().amax(1)
    assert bool((err <= 1e-5).all()), f"per-row relative gradient errors {err.tolist()}"


@pytest.mark.parametrize("C", [5, 70], ids=["short", "multichunk"])
def test_stablemax_ce_gradient_formula(backend, C):
    """fp32 autograd == (p_j - [j = y]) / (1 + |x_j|) (float64 hand formula), rows with x = 1 exactly included."""
    R = 4 if backend.interpreted and C > 64 else 12
    x = stable_logits((R, C), backend, seed=7)
    t = torch.randint(0, C, (R,), generator=torch.Generator().manual_seed(8))
    x[0, t[0]] = 1.0  # the target logit exactly at 1
    x[1] = 1.0  # a whole row of ones
    xi = x.clone().requires_grad_()
    nk.stablemax_cross_entropy(xi, t, reduction="sum", impl=backend.impl).backward()
    assert_close(xi.grad, stablemax_cross_entropy_grad_formula(x, t), 1e-5, "d input vs hand formula")


def test_oracle_gradient_is_the_formula():
    """The float64 oracle's autograd gradient equals the hand formula (both are independent of nckernels)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(20, 11, generator=g, dtype=torch.float64) * 4
    x[0, :3] = 1.0
    x[1] = 0.0
    t = torch.randint(0, 11, (20,), generator=g)
    xo = x.clone().requires_grad_()
    stablemax_cross_entropy_oracle(xo, t, reduction="sum").backward()
    torch.testing.assert_close(xo.grad, stablemax_cross_entropy_grad_formula(x, t), rtol=1e-12, atol=1e-14)
    # and the loss is -log of the StableMax probability of the target
    p = stablemax_oracle(x)
    torch.testing.assert_close(stablemax_cross_entropy_oracle(x, t, reduction="none"),
                               -torch.log(p[torch.arange(20), t]), rtol=1e-12, atol=0)
    s = stablemax_s_oracle(torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0]))
    torch.testing.assert_close(s, torch.tensor([1 / 3, 1 / 1.5, 1.0, 1.5, 2.0, 4.0], dtype=torch.float64))


def test_stablemax_ce_no_nan_at_one(backend):
    """Logits exactly 1.0 (target and others), fp32: finite loss and gradient, equal to the oracle."""
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 2.0], [3.0, 1.0, 1.0, -5.0], [1.0, 1.0, 0.0, 0.0]])
    t = torch.tensor([2, 0, 1, 3])
    loss, grad = check_smce(backend, dict(input=x, target=t, weight=None, ignore_index=-100), reduction="none")
    assert bool(torch.isfinite(loss).all())
    assert loss[0].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_stablemax_ce_all_ignored(cfg, reduction):
    """All ignored: mean NaN (like F.cross_entropy), sum 0, none zeros; zero gradient."""
    case = make_ce_case(cfg, (6, 11), weight=True, ignore="all", seed=5)
    xi = case["input"].detach().requires_grad_()
    loss = nk.stablemax_cross_entropy(xi, case["target"], case["weight"], reduction=reduction, impl=cfg.impl)
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert bool((loss == 0).all()) and loss.shape == ((6,) if reduction == "none" else ())
    loss.backward(torch.ones_like(loss))
    assert bool((xi.grad == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_stablemax_ce_empty(cfg, reduction):
    xi = torch.empty(0, 7, device=cfg.device, dtype=cfg.dtype).requires_grad_()
    t = torch.empty(0, dtype=torch.long, device=cfg.device)
    loss = nk.stablemax_cross_entropy(xi, t, reduction=reduction, impl=cfg.impl)
    if reduction == "mean":
        assert torch.isnan(loss)
    elif reduction == "sum":
        assert loss.item() == 0
    else:
        assert loss.shape == (0,)
    loss.sum().backward()
    assert xi.grad.shape == (0, 7)


@pytest.mark.parametrize("shape", [(4, 7, 3), (7,), (1, 70, 2)], ids=["N-C-d1", "unbatched", "N-C-d1-long"])
def test_stablemax_ce_nd(cfg, shape):
    case = make_ce_case(cfg, shape, weight=True, ignore="some" if len(shape) > 1 else "none", seed=6)
    loss, _ = check_smce(cfg, case, reduction="none")
    assert loss.shape == case["target"].shape


def test_stablemax_ce_int32_and_noncontiguous(cfg):
    case = make_ce_case(cfg, (11, 37), weight=True, ignore="some", seed=7)
    l64, g64 = check_smce(cfg, case, reduction="none")
    l32, g32 = check_smce(cfg, dict(case, target=case["target"].int()), reduction="none")
    torch.testing.assert_close(l32, l64, rtol=0, atol=0)
    torch.testing.assert_close(g32, g64, rtol=0, atol=0)
    xt = case["input"].T.contiguous().T  # same values, column-major strides
    assert not xt.is_contiguous()
    lt, gt = check_smce(cfg, dict(case, input=xt), reduction="none")
    torch.testing.assert_close(lt, l64, rtol=0, atol=0)
    torch.testing.assert_close(gt, g64, rtol=0, atol=0)


X = torch.randn(4, 5)
T = torch.tensor([0, 1, 4, 2])
BAD_SMCE = {
    "float-target": (lambda: dict(input=X, target=torch.zeros(4)), TypeError, "target"),
    "float-target-like-input": (lambda: dict(input=X, target=torch.zeros(4, 5)), TypeError, "target"),
    "target-shape": (lambda: dict(input=X, target=torch.zeros(5, dtype=torch.long)), ValueError, "target"),
    "target-too-large": (lambda: dict(input=X, target=torch.tensor([0, 5, 1, 1])), ValueError, "target"),
    "target-negative": (lambda: dict(input=X, target=torch.tensor([0, -2, 1, 1])), ValueError, "target"),
    "reduction": (lambda: dict(input=X, target=T, reduction="batchmean"), ValueError, "reduction"),
    "weight-shape": (lambda: dict(input=X, target=T, weight=torch.ones(6)), ValueError, "weight"),
    "int-input": (lambda: dict(input=X.int(), target=T), TypeError, "input"),
}


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("case", list(BAD_SMCE))
def test_stablemax_ce_bad_input_raises(case, impl):
    make, exc, match = BAD_SMCE[case]
    with pytest.raises(exc, match=match):
        nk.stablemax_cross_entropy(**make(), impl=impl)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("name", list(OPS))
def test_stablemax_bad_input_raises(name, impl):
    with pytest.raises(ValueError, match="dim"):
        OPS[name][0](X, 2, impl=impl)
    with pytest.raises(TypeError, match="input"):
        OPS[name][0](X.long(), impl=impl)


# ----------------------------------------------------------------------------- linear_stablemax_cross_entropy


def make_linear_case(cfg, lead, V, D, *, bias=True, weight=False, ignore_frac=0.0, seed=0, target_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=g)
    w = torch.randn(V, D, generator=g) * (3.0 / D ** 0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    t = torch.randint(0, V, lead, generator=g)
    if ignore_frac:
        t[torch.rand(lead, generator=g) < ignore_frac] = -100
    cw = torch.rand(V, generator=g) * 1.8 + 0.2 if weight else None
    dev, dt = cfg.device, cfg.dtype
    return dict(input=x.to(dev, dt), linear_weight=w.to(dev, dt), target=t.to(dev, target_dtype),
                linear_bias=b.to(dev, dt) if b is not None else None, weight=cw.to(dev) if cw is not None else None)


def _linear_gross(case, reduction, shift, g):
    """Largest summed magnitude of the terms of each gradient (float64): with
    ``|dz_ij| <= u_i w_y (p_ij + [j = y_i]) / (1 + |z_ij|)``, ``|dx| <= |dz| |W|``, ``|dW| <= |dz|^T |x|``,
    ``|db| <= sum_i |dz_i|``: the error scale where terms cancel (V = 1: the gradient is exactly 0)."""
    x, W = case["input"].double(), case["linear_weight"].double()
    t = case["target"].long()
    if shift:
        x, t = x[..., :-1, :], t[..., 1:]
    x, t = x.reshape(-1, W.shape[1]), t.reshape(-1)
    if t.numel() == 0:
        return dict(input=0.0, linear_weight=0.0, linear_bias=0.0)
    z = x @ W.T + (case["linear_bias"].double() if case["linear_bias"] is not None else 0.0)
    valid = t != -100
    ts = torch.where(valid, t, 0)
    wy = (case["weight"].double()[ts] if case["weight"] is not None else torch.ones(t.shape, dtype=torch.float64))
    wy = wy * valid
    denom = wy.sum().item() if reduction == "mean" else 1.0
    u = g.double().abs().reshape(-1).expand(t.shape) / (denom if denom > 0 else 1.0)
    p = stablemax_oracle(z)
    p[torch.arange(len(ts)), ts] += 1
    dz = (u * wy)[:, None] * p / (1 + z.abs())
    return dict(input=(dz @ W.abs()).max().item(), linear_weight=(dz.T @ x.abs()).max().item(),
                linear_bias=dz.sum(0).max().item())


def check_linear(cfg, case, *, reduction="mean", shift=False, tol=None, seed=0):
    """Loss and the gradients of input, linear_weight, linear_bias vs the explicit float64 oracle."""
    tol = tol or cfg.tol
    leaves = {k: case[k].detach().requires_grad_() for k in ("input", "linear_weight", "linear_bias")
              if case[k] is not None}
    loss = nk.linear_stablemax_cross_entropy(leaves["input"], leaves["linear_weight"], case["target"],
                                             linear_bias=leaves.get("linear_bias"), weight=case["weight"],
                                             reduction=reduction, shift=shift, impl=cfg.impl)
    leaves_o = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    loss_o = linear_stablemax_cross_entropy_oracle(leaves_o["input"], leaves_o["linear_weight"], case["target"],
                                                   linear_bias=leaves_o.get("linear_bias"), weight=case["weight"],
                                                   reduction=reduction, shift=shift)
    assert loss.dtype == torch.float32 and loss.shape == loss_o.shape
    assert_close(loss, loss_o, tol, "linear_stablemax_cross_entropy loss")
    g = upstream(loss.shape, seed) if loss.dim() else torch.tensor(0.75)
    loss.backward(g)
    loss_o.backward(g.double())
    gross = _linear_gross(case, reduction, shift, g)
    for k, leaf in leaves.items():
        ref = leaves_o[k].grad
        if ref is None:
            ref = torch.zeros_like(leaves_o[k])
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"d {k}"
        assert bool(torch.isfinite(leaf.grad).all()), f"d {k}: non-finite"
        scale = max(ref.abs().max().item() if ref.numel() else 0.0, gross[k])
        assert_close(leaf.grad, ref, tol, f"d {k}", scale=scale)
    return loss, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_stablemax(cfg, reduction, shift):
    case = make_linear_case(cfg, (2, 7), 37, 8, weight=reduction != "sum", ignore_frac=0.25, seed=2)
    check_linear(cfg, case, reduction=reduction, shift=shift)


@pytest.mark.parametrize("lead,V,D,bias", [((13,), 100, 16, True), ((5,), 1, 4, False), ((), 37, 8, True)],
                         ids=["V100", "V1", "unbatched"])
def test_linear_stablemax_shapes(backend, lead, V, D, bias):
    check_linear(backend, make_linear_case(backend, lead, V, D, bias=bias, ignore_frac=0.2 if lead else 0, seed=3))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_stablemax_all_ignored(cfg, reduction):
    case = make_linear_case(cfg, (2, 5), 37, 8, ignore_frac=1.0, seed=4)
    leaves = [case[k].detach().requires_grad_() for k in ("input", "linear_weight", "linear_bias")]
    loss = nk.linear_stablemax_cross_entropy(leaves[0], leaves[1], case["target"], linear_bias=leaves[2],
                                             reduction=reduction, impl=cfg.impl)
    assert torch.isnan(loss) if reduction == "mean" else loss.item() == 0
    loss.backward()
    for leaf in leaves:
        assert bool((leaf.grad == 0).all())


def test_linear_stablemax_int32_targets(cfg):
    case = make_linear_case(cfg, (9,), 37, 8, ignore_frac=0.3, seed=5)
    l64, g64 = check_linear(cfg, case, reduction="none")
    l32, g32 = check_linear(cfg, dict(case, target=case["target"].int()), reduction="none")
    torch.testing.assert_close(l32, l64, rtol=0, atol=0)
    for k in g64:
        torch.testing.assert_close(g32[k], g64[k], rtol=0, atol=0)


def test_linear_stablemax_equals_explicit(backend):
    """The fused op equals stablemax_cross_entropy on the explicit logits x W^T + b (same backend, fp32)."""
    case = make_linear_case(backend, (11,), 37, 8, ignore_frac=0.3, seed=6)
    fused = nk.linear_stablemax_cross_entropy(case["input"], case["linear_weight"], case["target"],
                                              linear_bias=case["linear_bias"], reduction="none", impl=backend.impl)
    z = case["input"] @ case["linear_weight"].T + case["linear_bias"]
    explicit = nk.stablemax_cross_entropy(z, case["target"], reduction="none", impl=backend.impl)
    assert_close(fused, explicit, 1e-5, "fused vs explicit")


BAD_LINEAR = {
    "float-target": (lambda: dict(target=torch.zeros(6)), TypeError, "target"),
    "target-shape": (lambda: dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target"),
    "target-too-large": (lambda: dict(target=torch.tensor([0, 1, 2, 9, 0, 1])), ValueError, "target"),
    "reduction": (lambda: dict(target=torch.zeros(6, dtype=torch.long), reduction="avg"), ValueError, "reduction"),
    "weight-shape": (lambda: dict(target=torch.zeros(6, dtype=torch.long), weight=torch.ones(3)), ValueError,
                     "weight"),
}


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("case", list(BAD_LINEAR))
def test_linear_stablemax_bad_input_raises(case, impl):
    make, exc, match = BAD_LINEAR[case]
    with pytest.raises(exc, match=match):
        nk.linear_stablemax_cross_entropy(torch.randn(6, 4), torch.randn(9, 4), **make(), impl=impl)
