"""``nckernels.linear_cross_entropy`` against the float64 oracle, on every backend.

Each backend config (``cfg``, see conftest.py) gets the same random inputs; the oracle runs in
float64 on the config-dtype inputs (so bf16/fp16 rounding of the inputs is not counted as
error), and gradients of input, linear_weight and linear_bias come from autograd on it.
Tolerances are relative to the largest magnitude of each oracle tensor, or to the summed
magnitude of the terms behind a value where those cancel (``assert_close``).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nckernels
from nckernels import CutCrossEntropyLoss
from oracle import linear_cross_entropy_oracle

CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- helpers


def make_case(cfg, lead, V, D, *, bias=False, class_weight=False, ignore_frac=0.0, ignore_index=-100,
              target_dtype=torch.int64, seed=0, logit_scale=2.0):
    """Random inputs on ``cfg``'s device and dtype: logits have std ``~logit_scale``."""
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead)
    x = torch.randn(*lead, D, generator=g)
    w = torch.randn(V, D, generator=g) * (logit_scale / math.sqrt(max(D, 1)))
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    tgt = torch.randint(0, V, lead, generator=g)
    if ignore_frac > 0:
        tgt[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    cw = torch.rand(V, generator=g) * 1.8 + 0.2 if class_weight else None
    dev, dt = cfg.device, cfg.dtype
    return dict(
        input=x.to(dev, dt),
        linear_weight=w.to(dev, dt),
        target=tgt.to(dev, target_dtype),
        linear_bias=b.to(dev, dt) if b is not None else None,
        weight=cw.to(dev) if cw is not None else None,
    )


def assert_close(actual, expected, tol, what, gross=None):
    """``|actual - expected| <= tol * max(max|expected|, gross)`` elementwise; NaN where the oracle is NaN.

    ``gross`` (optional, elementwise) is the sum of the magnitudes of the terms that make up
    each value (see :func:`gross_magnitudes`): where terms cancel (``V = 1``, say) rounding
    errors scale with it, not with the result. With an all-zero oracle tensor and no
    ``gross`` this demands exact zeros."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    finite = torch.isfinite(e)
    scale = e[finite].abs().max().item() if bool(finite.any()) else 0.0
    atol = torch.full_like(e, tol * scale)
    if gross is not None:
        atol = torch.maximum(atol, tol * gross.detach().double().cpu())
    nan_ok = torch.isnan(e) & torch.isnan(a)
    ok = ((a - e).abs() <= atol + tol * e.abs()) | nan_ok
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist() if a.dim() else []
        idx = tuple(bad)
        raise AssertionError(
            f"{what} (tol {tol}, scale {scale:.3g}): {int((~ok).sum())}/{ok.numel()} mismatched; "
            f"first at {idx}: got {a[idx].item()!r}, expected {e[idx].item()!r}, allowed {atol[idx].item():.3g}; "
            f"max abs diff {(a - e).abs().nan_to_num(float('inf')).max().item():.3g}"
        )


def gross_magnitudes(case, opts, g_loss, g_lse):
    """Float64 elementwise bounds of the summed term magnitudes of the loss, lse and the three gradients.

    With ``dL/dz'_ij = a_i p_ij - b_i [j = y_i] - c_i w_j`` the gross logit gradient is
    ``|a_i| p_ij + |b_i| [j = y_i] + |c_i| w_j`` (times the softcap derivative), and
    ``|dx| <= |dz| |W|``, ``|dW| <= |dz|^T |x|``, ``|db| <= sum_i |dz_i|``."""
    x = case["input"].detach().double()
    W = case["linear_weight"].detach().double()
    t = case["target"].long()
    if opts.get("shift"):
        x, t = x[..., :-1, :], t[..., 1:]
    out_shape = t.shape
    V, D = W.shape
    x, t = x.reshape(-1, D), t.reshape(-1)
    z = x @ W.T
    if case["linear_bias"] is not None:
        z = z + case["linear_bias"].double()
    dcap = torch.ones_like(z)
    cap = opts.get("softcap")
    if cap is not None:
        th = torch.tanh(z / cap)
        z, dcap = cap * th, 1 - th * th
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    valid = t != opts.get("ignore_index", -100)
    ts = torch.where(valid, t, 0)
    w = case["weight"].double().to(z.device) if case["weight"] is not None else torch.ones(V, dtype=torch.float64, device=z.device)
    wy = w[ts] * valid
    eps, zl = opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0)
    red = opts.get("reduction", "mean")
    g_loss = g_loss.double().to(z.device)
    if red == "none":
        u = g_loss.reshape(-1).abs()
    else:
        denom = wy.sum() if red == "mean" else torch.tensor(1.0, dtype=torch.float64)
        u = (g_loss.abs() / denom if denom > 0 else torch.zeros((), dtype=torch.float64)).expand(t.shape)
    u = u.to(z.device) * valid
    v = g_lse.double().reshape(-1).abs().to(z.device) * valid if g_lse is not None else torch.zeros_like(u)
    b = u * (1 - eps) * wy
    c = u * eps / V
    a = b + c * w.sum() + v + 2 * zl * u * wy * lse.abs()
    dz = a[:, None] * p + c[:, None] * w[None, :]
    dz[torch.arange(len(ts), device=dz.device), ts] += b
    dz = dz * dcap
    zmax = z.abs().amax(-1) if V else torch.zeros_like(lse)
    loss_tok = ((1 - eps) * wy + eps / V * w.sum() * valid) * (lse.abs() + zmax) + zl * wy * lse * lse
    if red == "none":
        gl = loss_tok.reshape(out_shape)
    else:
        gl = loss_tok.sum() / (wy.sum() if red == "mean" and wy.sum() > 0 else 1.0)
    return dict(
        loss=gl,
        lse=(torch.maximum(lse.abs(), zmax) * valid).reshape(out_shape),
        dx=_scatter_rows(dz @ W.abs(), case, opts),
        dw=dz.T @ x.abs(),
        db=dz.sum(0),
    )


def _scatter_rows(dx_rows, case, opts):
    """Rows of the (shifted, flattened) token grid back into ``input``'s shape, zeros elsewhere."""
    full = torch.zeros(case["input"].shape, dtype=torch.float64, device=dx_rows.device)
    if opts.get("shift"):
        full[..., :-1, :] = dx_rows.reshape(full[..., :-1, :].shape)
    else:
        full.copy_(dx_rows.reshape(full.shape))
    return full


def effective_ignored(target, ignore_index, shift):
    """Mask over the rows of ``input`` (shape ``input.shape[:-1]``) whose logits get no gradient."""
    t = target.long()
    if shift:  # row t predicts target t + 1; the last row of each sequence predicts nothing
        shifted = torch.full_like(t, ignore_index)
        shifted[..., :-1] = t[..., 1:]
        t = shifted
    return t == ignore_index


def run_ours(cfg, case, opts, *, return_lse=False, impl=None, **extra):
    # detach() keeps the strides and storage (clone() would make strided views contiguous)
    x = case["input"].detach().requires_grad_()
    w = case["linear_weight"].detach().requires_grad_()
    b = case["linear_bias"].detach().requires_grad_() if case["linear_bias"] is not None else None
    assert x.stride() == case["input"].stride() and w.stride() == case["linear_weight"].stride()
    out = nckernels.linear_cross_entropy(x, w, case["target"], linear_bias=b, weight=case["weight"],
                                         return_lse=return_lse, impl=impl or cfg.impl, **opts, **extra)
    loss, lse = out if return_lse else (out, None)
    return (x, w, b), loss, lse


def run_oracle(case, opts):
    x = case["input"].detach().double().requires_grad_()
    w = case["linear_weight"].detach().double().requires_grad_()
    b = case["linear_bias"].detach().double().requires_grad_() if case["linear_bias"] is not None else None
    loss, lse = linear_cross_entropy_oracle(x, w, case["target"], linear_bias=b, weight=case["weight"], **opts)
    return (x, w, b), loss, lse


def check_against_oracle(cfg, case, *, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                         shift=False, ignore_index=-100, return_lse=False, tol=None, seed=0):
    """Loss (and LSE) values and the gradients of input / linear_weight / linear_bias vs the oracle,
    plus poison checks: dtypes, no NaN gradients, exact zero gradient of ignored rows,
    inputs not modified."""
    tol = tol or cfg.tol
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                shift=shift, ignore_index=ignore_index)
    snapshot = {k: v.clone() for k, v in case.items() if v is not None}

    (x, w, b), loss, lse = run_ours(cfg, case, opts, return_lse=return_lse)
    (xd, wd, bd), loss_o, lse_o = run_oracle(case, opts)

    # a random upstream gradient (per token for reduction="none") for the backward
    g = torch.Generator().manual_seed(seed + 1)
    g_loss = torch.randn(loss.shape, generator=g) if loss.dim() else torch.tensor(0.75)
    g_lse = torch.randn(lse.shape, generator=g) if return_lse else None
    gross = gross_magnitudes(case, opts, g_loss, g_lse)

    assert loss.dtype == torch.float32
    assert loss.device == x.device
    assert_close(loss, loss_o, tol, "loss", gross["loss"])
    if return_lse:
        assert lse.dtype == torch.float32
        assert_close(lse, lse_o, tol, "lse", gross["lse"])

    objective = (loss * g_loss.to(loss.device)).sum()
    objective_o = (loss_o * g_loss.double().to(loss_o.device)).sum()
    if return_lse:
        objective = objective + (lse * g_lse.to(lse.device)).sum()
        objective_o = objective_o + (lse_o * g_lse.double().to(lse_o.device)).sum()
    objective.backward()
    objective_o.backward()

    for name, key, ours, ref, leaf in (
        ("d input", "dx", x.grad, xd.grad, x),
        ("d linear_weight", "dw", w.grad, wd.grad, w),
        ("d linear_bias", "db", b.grad if b is not None else None, bd.grad if bd is not None else None, b),
    ):
        if leaf is None:
            continue
        if ref is None:  # the oracle's objective did not depend on it (e.g. an empty batch)
            ref = torch.zeros_like(leaf, dtype=torch.float64)
        assert ours is not None, f"{name}: no gradient"
        assert ours.dtype == leaf.dtype, f"{name}: dtype {ours.dtype} != {leaf.dtype}"
        assert bool(torch.isfinite(ours).all()), f"{name}: non-finite gradient"
        assert_close(ours, ref, tol, name, gross[key])

    ignored = effective_ignored(case["target"], ignore_index, shift)
    if bool(ignored.any()):
        assert bool((x.grad[ignored] == 0).all()), "ignored rows must get exactly zero input gradient"
    for k, v in snapshot.items():
        assert torch.equal(case[k], v), f"{k} was modified in place"
    return loss, lse, (x.grad, w.grad, b.grad if b is not None else None)


# ----------------------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("class_weight", [False, True])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
def test_oracle_matches_torch_cross_entropy(reduction, label_smoothing, class_weight, ignore_frac):
    """The oracle (z_loss=0, no softcap) equals F.cross_entropy on explicit float64 logits,
    loss and gradients, so that it cannot be wrong silently."""
    g = torch.Generator().manual_seed(7)
    N, V, D = 23, 11, 5
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_frac] = -7
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.1 if class_weight else None

    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    ours, _ = linear_cross_entropy_oracle(*leaves[:2], t, linear_bias=leaves[2], weight=cw, reduction=reduction,
                                          ignore_index=-7, label_smoothing=label_smoothing)
    leaves_t = [v.clone().requires_grad_() for v in (x, w, b)]
    theirs = F.cross_entropy(F.linear(leaves_t[0], leaves_t[1], leaves_t[2]), t, weight=cw, reduction=reduction,
                             ignore_index=-7, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, equal_nan=True)
    gw = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    (ours * gw).sum().backward()
    (theirs * gw).sum().backward()
    for a, e in zip(leaves, leaves_t):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-10, atol=1e-12)


def test_oracle_z_loss_softcap_shift_by_hand():
    """z-loss, softcap, shift and lse against a direct per-token loop."""
    g = torch.Generator().manual_seed(3)
    B, T, D, V = 2, 5, 4, 6
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 2] = -100
    loss, lse = linear_cross_entropy_oracle(x, w, t, reduction="none", z_loss=0.1, softcap=1.5, shift=True)
    assert loss.shape == lse.shape == (B, T - 1)
    for i in range(B):
        for s in range(T - 1):
            y = int(t[i, s + 1])
            if y == -100:
                assert loss[i, s] == 0 and lse[i, s] == 0
                continue
            z = 1.5 * torch.tanh((w @ x[i, s]) / 1.5)
            l = torch.logsumexp(z, 0)
            torch.testing.assert_close(lse[i, s], l)
            torch.testing.assert_close(loss[i, s], l - z[y] + 0.1 * l * l)
    mean, _ = linear_cross_entropy_oracle(x, w, t, reduction="mean", z_loss=0.1, softcap=1.5, shift=True)
    torch.testing.assert_close(mean, loss.sum() / (t[:, 1:] != -100).sum())


# ----------------------------------------------------------------------------- option grid

GRID = dict(
    reduction=["mean", "sum", "none"],
    label_smoothing=[0.0, 0.1],
    class_weight=[False, True],
    z_loss=[0.0, 1e-2],
    softcap=[None, 3.0],
    bias=[False, True],
    shift=[False, True],
)


def _grid_id(combo):
    short = dict(label_smoothing="ls", class_weight="cw", z_loss="z", softcap="cap", bias="bias", shift="shift")
    parts = [combo["reduction"]]
    for k, tag in short.items():
        parts.append(tag if combo[k] not in (None, False, 0.0) else f"no{tag}")
    return "-".join(parts)


def covering_array(factors, strength=3, also=()):
    """Greedy strength-``t`` covering array: every ``t``-way combination of option values occurs in
    at least one returned combo, and so does every combination over each group of names in
    ``also`` (deterministic)."""
    names = list(factors)
    sizes = [len(factors[n]) for n in names]
    col_sets = list(itertools.combinations(range(len(names)), strength))
    col_sets += [tuple(names.index(n) for n in group) for group in also]
    uncovered = {(cols, vals) for cols in col_sets for vals in itertools.product(*(range(sizes[c]) for c in cols))}
    candidates = list(itertools.product(*(range(n) for n in sizes)))
    rows = []
    while uncovered:
        best = max(candidates, key=lambda r: sum((cols, tuple(r[c] for c in cols)) in uncovered for cols in col_sets))
        rows.append(best)
        uncovered -= {(cols, tuple(best[c] for c in cols)) for cols in col_sets}
    return [{n: factors[n][v] for n, v in zip(names, r)} for r in rows]


# The options that select Triton kernel variants (constexpr flags); the others (reduction,
# z_loss, shift) only change per-token coefficients and which rows count.
KERNEL_FLAGS = ("label_smoothing", "class_weight", "softcap", "bias")
FULL_GRID = [dict(zip(GRID, vals)) for vals in itertools.product(*GRID.values())]
COVERING_GRID = covering_array(GRID, strength=3)
INTERPRETER_GRID = covering_array(GRID, strength=3, also=[KERNEL_FLAGS])


def _check_grid(cfg, combo):
    case = make_case(cfg, (2, 9), 37, 19, bias=combo["bias"], class_weight=combo["class_weight"], ignore_frac=0.2,
                     seed=11)
    check_against_oracle(cfg, case, reduction=combo["reduction"], label_smoothing=combo["label_smoothing"],
                         z_loss=combo["z_loss"], softcap=combo["softcap"], shift=combo["shift"])


@pytest.mark.parametrize("combo", FULL_GRID, ids=_grid_id)
def test_options_grid(backend, combo):
    """Every combination of reduction x label_smoothing x class weight x z_loss x softcap x bias x
    shift, on the fp32 config of every backend (the Triton interpreter: see the next test)."""
    if backend.interpreted and combo not in INTERPRETER_GRID:
        pytest.skip("Triton interpreter: covered by the strength-3 + kernel-flag covering subset")
    _check_grid(backend, combo)


@pytest.mark.parametrize("combo", COVERING_GRID, ids=_grid_id)
def test_options_grid_low_precision(lowp_cfg, combo):
    """fp16 / bf16: a strength-3 covering subset of the grid (every 3 options' values meet once)."""
    _check_grid(lowp_cfg, combo)


def test_covering_arrays_cover():
    for rows in (COVERING_GRID, INTERPRETER_GRID):
        for a, b, c in itertools.combinations(GRID, 3):
            seen = {(r[a], r[b], r[c]) for r in rows}
            assert len(seen) == len(GRID[a]) * len(GRID[b]) * len(GRID[c])
        assert len(rows) < len(FULL_GRID) / 4
    assert len({tuple(r[k] for k in KERNEL_FLAGS) for r in INTERPRETER_GRID}) == 2 ** len(KERNEL_FLAGS)


# ----------------------------------------------------------------------------- shapes and edge cases

SHAPES = [
    pytest.param((1,), 37, 19, id="N1"),
    pytest.param((13,), 1, 8, id="V1"),
    pytest.param((7,), 37, 1, id="D1"),
    pytest.param((5,), 16, 32, id="aligned"),
    pytest.param((33,), 129, 17, id="N33-V129-D17"),
    pytest.param((64,), 200, 48, id="N64-V200-D48"),
    pytest.param((2, 3), 37, 19, id="lead2x3"),
    pytest.param((), 37, 19, id="unbatched"),
]


@pytest.mark.parametrize("lead,V,D", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shapes(cfg, lead, V, D, reduction):
    case = make_case(cfg, lead, V, D, bias=True, class_weight=True, ignore_frac=0.25 if lead else 0.0, seed=5)
    check_against_oracle(cfg, case, reduction=reduction, label_smoothing=0.05, z_loss=1e-3)


@pytest.mark.parametrize("lead,V,D", [pytest.param((33,), 129, 17, id="N33"), pytest.param((2, 3), 37, 19, id="lead")])
def test_shapes_plain(cfg, lead, V, D):
    """No options at all: the fast path of every backend."""
    check_against_oracle(cfg, make_case(cfg, lead, V, D, seed=6))


@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(cfg, reduction, shift):
    """All targets ignored: mean is NaN (like PyTorch), sum 0, none zeros; every gradient exactly 0."""
    case = make_case(cfg, (2, 6), 37, 19, bias=True, class_weight=True, ignore_frac=1.0, seed=8)
    loss, lse, grads = check_against_oracle(cfg, case, reduction=reduction, label_smoothing=0.1, z_loss=1e-2,
                                            shift=shift, return_lse=True)
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert bool((loss == 0).all())
    assert bool((lse == 0).all())
    for gr in grads:
        assert bool((gr == 0).all())


def test_all_ignored_matches_pytorch(backend):
    case = make_case(backend, (9,), 37, 19, ignore_frac=1.0)
    for red in ("mean", "sum", "none"):
        ours = nckernels.linear_cross_entropy(case["input"], case["linear_weight"], case["target"], reduction=red,
                                              impl=backend.impl)
        theirs = F.linear_cross_entropy(case["input"], case["linear_weight"], case["target"], reduction=red)
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("lead,shift", [((0,), False), ((2, 0), False), ((0, 5), True), ((2, 1), True), ((2, 0), True)],
                         ids=["N0", "B2T0", "B0T5-shift", "T1-shift", "T0-shift"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty(cfg, lead, shift, reduction):
    """No tokens: mean NaN, sum 0, none empty; zero gradients, no crash."""
    case = make_case(cfg, lead, 37, 19, bias=True, seed=9)
    loss, lse, grads = check_against_oracle(cfg, case, reduction=reduction, shift=shift, return_lse=True)
    if reduction == "mean":
        assert torch.isnan(loss)
    elif reduction == "sum":
        assert loss.item() == 0
    else:
        assert loss.numel() == 0
    assert lse.numel() == 0
    for gr in grads:
        assert bool((gr == 0).all())


@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
def test_int32_targets(cfg, shift):
    case = make_case(cfg, (3, 8), 37, 19, bias=True, ignore_frac=0.2, target_dtype=torch.int32, seed=10)
    check_against_oracle(cfg, case, reduction="mean", label_smoothing=0.1, shift=shift)
    case64 = dict(case, target=case["target"].long())
    a = nckernels.linear_cross_entropy(**case, impl=cfg.impl, shift=shift, reduction="none")
    b = nckernels.linear_cross_entropy(**case64, impl=cfg.impl, shift=shift, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


_ALL_OPTS = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)


@pytest.mark.parametrize("reduction,shift,opts", [
    pytest.param("mean", False, {}, id="mean-plain"),
    pytest.param("mean", True, _ALL_OPTS, id="mean-shift-all"),
    pytest.param("sum", False, _ALL_OPTS, id="sum-all"),
    pytest.param("sum", True, {}, id="sum-shift-plain"),
    pytest.param("none", False, _ALL_OPTS, id="none-all"),
    pytest.param("none", True, {}, id="none-shift-plain"),
])
def test_return_lse(cfg, reduction, shift, opts):
    """The LSE values, and gradients of ``loss`` and ``lse`` together (random upstream on each)."""
    case = make_case(cfg, (2, 7), 37, 19, bias=True, class_weight=True, ignore_frac=0.2, seed=12)
    loss, lse, _ = check_against_oracle(cfg, case, reduction=reduction, shift=shift, return_lse=True, **opts)
    assert lse.shape == ((2, 6) if shift else (2, 7))


def test_lse_only_gradient(cfg):
    """Backprop through ``lse.sum()`` alone (loss unused): grad_loss is None in the backward."""
    case = make_case(cfg, (17,), 37, 19, bias=True, ignore_frac=0.2, seed=13)
    (x, w, b), _, lse = run_ours(cfg, case, dict(), return_lse=True)
    (xd, wd, bd), _, lse_o = run_oracle(case, dict())
    lse.sum().backward()
    lse_o.sum().backward()
    for ours, ref, name in ((x.grad, xd.grad, "dx"), (w.grad, wd.grad, "dw"), (b.grad, bd.grad, "db")):
        assert_close(ours, ref, cfg.tol, name)


@pytest.mark.parametrize("ignore_index,shift", [(-1, False), (5, False), (5, True), (0, True)],
                         ids=["m1", "5", "5-shift", "0-shift"])
def test_custom_ignore_index(cfg, ignore_index, shift):
    """An ignore_index inside [0, V) too: targets equal to it are ignored, -100 then is out of range."""
    case = make_case(cfg, (3, 8), 37, 19, class_weight=True, ignore_frac=0.3, ignore_index=ignore_index, seed=14)
    check_against_oracle(cfg, case, reduction="mean", label_smoothing=0.1, shift=shift, ignore_index=ignore_index)


def test_extreme_logits(cfg):
    """Large logits (|z| ~ 60): the online LSE must not overflow (fp16 inputs stay representable)."""
    case = make_case(cfg, (16,), 37, 19, bias=True, ignore_frac=0.1, seed=15, logit_scale=30.0)
    check_against_oracle(cfg, case, reduction="mean", z_loss=1e-4)


@pytest.mark.parametrize("reduction", ["none", "sum"])  # the forward + backward ops; the fused CPU pass
@pytest.mark.parametrize("top", [20.0, 1e3, 1e5])
def test_confident_tokens_resolved_below_ulp_of_lse(backend, top, reduction):
    """Target logit ``top``, the others ~``top - 7``: losses near 0.04, far below ``ulp(lse)`` at 1e5. The
    loss ``(lse - z_y) + lse_lo`` and ``dL/dx = p - onehot`` (``linear_weight = I``) match float64 to 2e-5
    relative; ``fl(lse) - z_y`` alone is off by up to ``ulp(lse) / 2`` (1e-3 relative at 1e3, 11% at 1e5)."""
    N, V = 11, 40
    g = torch.Generator().manual_seed(int(top))
    x = top - 7.0 + 0.5 * torch.randn(N, V, generator=g)
    target = torch.randint(0, V, (N,), generator=g)
    x[torch.arange(N), target] = top
    w = torch.eye(V)  # z = x exactly, in every backend's fp32 matmul
    z = x.double()
    want_loss = torch.logsumexp(z, 1) - z[torch.arange(N), target]
    want_dx = torch.softmax(z, 1) - F.one_hot(target, V).double()
    xin = x.to(backend.device).requires_grad_()
    loss = nckernels.linear_cross_entropy(xin, w.to(backend.device), target.to(backend.device), reduction=reduction,
                                          impl=backend.impl)
    loss.sum().backward()
    if reduction == "none":
        torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=2e-5, atol=0.0)
    else:
        torch.testing.assert_close(loss.double().cpu(), want_loss.sum(), rtol=2e-5, atol=0.0)
    torch.testing.assert_close(xin.grad.double().cpu(), want_dx, rtol=2e-5, atol=1e-9)


def test_noncontiguous_inputs(cfg):
    """Strided input rows and a transposed-storage linear_weight give the same as contiguous ones."""
    case = make_case(cfg, (12,), 37, 19, bias=True, ignore_frac=0.2, seed=16)
    x_big = torch.zeros(24, 40, dtype=cfg.dtype, device=cfg.device)
    x_big[::2, 3:22] = case["input"]
    w_t = case["linear_weight"].t().contiguous().t()  # (V, D) with strides (1, V)
    nc = dict(case, input=x_big[::2, 3:22], linear_weight=w_t)
    assert not nc["input"].is_contiguous() and not nc["linear_weight"].is_contiguous()
    check_against_oracle(cfg, nc, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("lead,V,D", [pytest.param((12,), 37, 19, id="N12-V37-D19"),
                                      pytest.param((2, 5), 33, 16, id="lead-V33-D16")])
def test_nan_padded_views(cfg, lead, V, D):
    """Inputs are views into NaN-filled buffers (padding after each row, after the last row and
    after the bias): a load that strays outside its mask poisons the result."""
    case = make_case(cfg, lead, V, D, bias=True, class_weight=True, ignore_frac=0.2, seed=23)
    nan = float("nan")
    xb = torch.full((*lead[:-1], lead[-1] + 3, D + 5), nan, dtype=cfg.dtype, device=cfg.device)
    xb[..., : lead[-1], :D] = case["input"]
    wb = torch.full((V + 7, D + 5), nan, dtype=cfg.dtype, device=cfg.device)
    wb[:V, :D] = case["linear_weight"]
    bb = torch.full((V + 7,), nan, dtype=cfg.dtype, device=cfg.device)
    bb[:V] = case["linear_bias"]
    cwb = torch.full((V + 7,), nan, dtype=case["weight"].dtype, device=cfg.device)
    cwb[:V] = case["weight"]
    padded = dict(case, input=xb[..., : lead[-1], :D], linear_weight=wb[:V, :D], linear_bias=bb[:V], weight=cwb[:V])
    check_against_oracle(cfg, padded, reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                         return_lse=True)


# ----------------------------------------------------------------------------- random (hypothesis)


def test_random_against_oracle(cfg):
    n_examples = 8 if cfg.interpreted else 30

    @settings(max_examples=n_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def inner(data):
        two_d = data.draw(st.booleans(), label="two_d")
        if two_d:
            lead = (data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 10), label="T"))
        else:
            lead = (data.draw(st.integers(0, 40), label="N"),)
        V = data.draw(st.integers(1, 80), label="V")
        D = data.draw(st.integers(1, 40), label="D")
        ignore_index = data.draw(st.sampled_from([-100, -1, 0, V - 1]), label="ignore_index")
        opts = dict(
            reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
            label_smoothing=data.draw(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0.0, 1.0), label="ls"),
            z_loss=data.draw(st.sampled_from([0.0, 1e-4]) | st.floats(0.0, 0.1), label="z_loss"),
            softcap=data.draw(st.none() | st.floats(0.5, 30.0), label="softcap"),
            shift=two_d and data.draw(st.booleans(), label="shift"),
            return_lse=data.draw(st.booleans(), label="return_lse"),
            ignore_index=ignore_index,
        )
        case = make_case(
            cfg, lead, V, D,
            bias=data.draw(st.booleans(), label="bias"),
            class_weight=data.draw(st.booleans(), label="class_weight"),
            ignore_frac=data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="ignore_frac"),
            ignore_index=ignore_index,
            target_dtype=data.draw(st.sampled_from([torch.int64, torch.int32]), label="target_dtype"),
            seed=data.draw(st.integers(0, 2**16), label="seed"),
        )
        check_against_oracle(cfg, case, **opts)

    inner()


# ----------------------------------------------------------------------------- drop-in for PyTorch

DROP_IN = [
    pytest.param((16,), dict(), id="default"),
    pytest.param((16,), dict(bias=True), id="bias"),
    pytest.param((16,), dict(class_weight=True, label_smoothing=0.2, ignore_frac=0.3), id="weight-ls-ignore"),
    pytest.param((16,), dict(reduction="none", ignore_frac=0.3), id="none"),
    pytest.param((16,), dict(reduction="sum", ignore_index=3, ignore_frac=0.3), id="sum-ignore3"),
    pytest.param((), dict(bias=True), id="unbatched"),
]


@pytest.mark.parametrize("lead,spec", DROP_IN)
def test_drop_in_torch_linear_cross_entropy(backend, lead, spec):
    """Same call, same arguments as torch.nn.functional.linear_cross_entropy: same loss and grads."""
    spec = dict(spec)
    bias = spec.pop("bias", False)
    cw = spec.pop("class_weight", False)
    frac = spec.pop("ignore_frac", 0.0)
    ii = spec.get("ignore_index", -100)
    case = make_case(backend, lead, 37, 19, bias=bias, class_weight=cw, ignore_frac=frac, ignore_index=ii, seed=17)
    results = []
    for fn in (nckernels.linear_cross_entropy, F.linear_cross_entropy):
        x = case["input"].clone().requires_grad_()
        w = case["linear_weight"].clone().requires_grad_()
        b = case["linear_bias"].clone().requires_grad_() if bias else None
        kw = dict(impl=backend.impl) if fn is nckernels.linear_cross_entropy else {}
        loss = fn(x, w, case["target"], linear_bias=b, weight=case["weight"], **spec, **kw)
        loss.sum().backward()
        results.append((loss, x.grad, w.grad, b.grad if bias else None))
    for ours, theirs in zip(*results):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["input-nan", "weight-nan", "weight-inf", "bias-inf"])
def test_nan_inf_propagate(backend, where):
    """NaN / Inf in the inputs propagate per token exactly as in PyTorch (never silently dropped,
    e.g. by a max that ignores NaN)."""
    case = make_case(backend, (6,), 37, 19, bias=True, seed=24)
    x, w, b = case["input"].clone(), case["linear_weight"].clone(), case["linear_bias"].clone()
    if where == "input-nan":
        x[2, 3] = float("nan")
    elif where == "weight-nan":
        w[5, 0] = float("nan")
    elif where == "weight-inf":
        w[5, 0] = float("inf")
    else:
        b[7] = float("inf")
    ours, lse = nckernels.linear_cross_entropy(x, w, case["target"], linear_bias=b, reduction="none",
                                               return_lse=True, impl=backend.impl)
    theirs = F.linear_cross_entropy(x, w, case["target"], linear_bias=b, reduction="none")
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs)), f"NaN pattern {ours} vs {theirs}"
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), f"Inf pattern {ours} vs {theirs}"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, equal_nan=True)
    if where == "input-nan":
        assert torch.isnan(lse[2]) and bool(torch.isfinite(lse[[0, 1, 3, 4, 5]]).all())


# ----------------------------------------------------------------------------- module form


def test_module_matches_function(backend):
    case = make_case(backend, (2, 9), 37, 19, bias=True, class_weight=True, ignore_frac=0.2, seed=18)
    opts = dict(reduction="sum", ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, shift=True,
                return_lse=True, impl=backend.impl)
    mod = CutCrossEntropyLoss(case["weight"], **opts)
    outs = []
    for call in (lambda x, w, b: mod(x, w, case["target"], b),
                 lambda x, w, b: nckernels.linear_cross_entropy(x, w, case["target"], linear_bias=b,
                                                                weight=case["weight"], **opts)):
        x = case["input"].clone().requires_grad_()
        w = case["linear_weight"].clone().requires_grad_()
        b = case["linear_bias"].clone().requires_grad_()
        loss, lse = call(x, w, b)
        (loss + lse.sum()).backward()
        outs.append((loss, lse, x.grad, w.grad, b.grad))
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert "shift=True" in repr(mod)


# ----------------------------------------------------------------------------- bad input


def _meta(key):
    return lambda case: {key: case[key].to("meta")}


CLASS_WEIGHT = r"(?<!linear_)weight"  # the class-weight argument, not linear_weight

BAD = [
    pytest.param("target", lambda c: {"target": torch.where(c["target"] == 2, -5, c["target"])}, id="target-negative"),
    pytest.param("target", lambda c: {"target": torch.where(c["target"] == 2, 37, c["target"])}, id="target-eq-V"),
    pytest.param("target", lambda c: {"target": torch.where(c["target"] == 2, 1000, c["target"])}, id="target-gt-V"),
    pytest.param("target", lambda c: {"target": c["target"].float()}, id="target-float"),
    pytest.param("target", lambda c: {"target": c["target"].to(torch.int16)}, id="target-int16"),
    pytest.param("target", lambda c: {"target": c["target"][:-1]}, id="target-shape"),
    pytest.param("features|linear_weight|input", lambda c: {"linear_weight": c["linear_weight"][:, :-1]}, id="D-mismatch"),
    pytest.param("linear_weight", lambda c: {"linear_weight": c["linear_weight"][None]}, id="weight-3d"),
    pytest.param("linear_weight", lambda c: {"linear_weight": c["linear_weight"].double()}, id="weight-dtype"),
    pytest.param("input", lambda c: {"input": c["input"].long()}, id="input-int"),
    pytest.param("linear_bias", lambda c: {"linear_bias": c["linear_bias"][:-1]}, id="bias-shape"),
    pytest.param(CLASS_WEIGHT, lambda c: {"weight": c["weight"][:-1]}, id="class-weight-shape"),
    pytest.param(CLASS_WEIGHT, lambda c: {"weight": torch.ones(37, dtype=torch.long)}, id="class-weight-int"),
    pytest.param("linear_weight", _meta("linear_weight"), id="weight-meta"),
    pytest.param("target", _meta("target"), id="target-meta"),
    pytest.param("linear_bias", _meta("linear_bias"), id="bias-meta"),
    pytest.param(CLASS_WEIGHT, _meta("weight"), id="class-weight-meta"),
    pytest.param("reduction", lambda c: {"reduction": "avg"}, id="reduction"),
    pytest.param("reduction", lambda c: {"reduction": None}, id="reduction-none-obj"),
    pytest.param("label_smoothing", lambda c: {"label_smoothing": -0.1}, id="ls-neg"),
    pytest.param("label_smoothing", lambda c: {"label_smoothing": 1.5}, id="ls-gt1"),
    pytest.param("label_smoothing", lambda c: {"label_smoothing": float("nan")}, id="ls-nan"),
    pytest.param("softcap", lambda c: {"softcap": -1.0}, id="softcap-neg"),
    pytest.param("softcap", lambda c: {"softcap": 0.0}, id="softcap-zero"),
    pytest.param("softcap", lambda c: {"softcap": float("inf")}, id="softcap-inf"),
    pytest.param("softcap", lambda c: {"softcap": float("nan")}, id="softcap-nan"),
    pytest.param("z_loss", lambda c: {"z_loss": -1e-4}, id="zloss-neg"),
    pytest.param("z_loss", lambda c: {"z_loss": float("inf")}, id="zloss-inf"),
    pytest.param("z_loss", lambda c: {"z_loss": float("nan")}, id="zloss-nan"),
    pytest.param("ignore_index", lambda c: {"ignore_index": 1.5}, id="ignore-index-float"),
    pytest.param("impl", lambda c: {"impl": "cuda-magic"}, id="impl"),
    pytest.param("grad_filter", lambda c: {"grad_filter": 1e-3, "impl": "reference"}, id="grad-filter-reference"),
    pytest.param("grad_filter", lambda c: {"grad_filter": -1.0}, id="grad-filter-neg"),
    pytest.param("shift", lambda c: {"input": c["input"][0], "target": c["target"][0], "shift": True}, id="shift-1d"),
]


@pytest.mark.parametrize("name,change", BAD)
def test_bad_input_raises(backend, name, change):
    case = make_case(backend, (8,), 37, 19, bias=True, class_weight=True, ignore_frac=0.2, seed=19)
    case["target"][0] = 2  # make sure the value the target-range cases rewrite is present
    kwargs = dict(case, impl=backend.impl)
    kwargs.update(change(case))
    with pytest.raises((ValueError, TypeError), match=name):
        nckernels.linear_cross_entropy(**kwargs)


def test_grad_filter_needs_triton_under_auto_on_cpu(monkeypatch):
    monkeypatch.delenv("NCKERNELS_IMPL", raising=False)
    case = make_case(type("C", (), dict(device="cpu", dtype=torch.float32))(), (4,), 37, 19)
    with pytest.raises(ValueError, match="grad_filter"):
        nckernels.linear_cross_entropy(**case, grad_filter=1e-3, impl="auto")


# ----------------------------------------------------------------------------- Triton-only behaviour


def _triton_case(cfg):
    # 2 row tiles x 4 vocabulary tiles x 2 K steps of the interpreter's 32 x 32 x 16 blocks
    return make_case(cfg, (40,), 100, 24, bias=True, class_weight=True, ignore_frac=0.2, seed=20)


def _run_grads(cfg, case, **extra):
    (x, w, b), loss, lse = run_ours(cfg, case, dict(label_smoothing=0.1, z_loss=1e-3), return_lse=True, **extra)
    (loss + lse.sum()).backward()
    return loss.detach(), lse.detach(), x.grad, w.grad, b.grad


def test_deterministic_gradients(triton_cfg, deterministic):
    """Under torch.use_deterministic_algorithms(True) two runs give bitwise-identical results."""
    case = _triton_case(triton_cfg)
    first = _run_grads(triton_cfg, case)
    second = _run_grads(triton_cfg, case)
    for name, a, b in zip(("loss", "lse", "dx", "dw", "db"), first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


def test_grad_filter(triton_cfg):
    """A tiny threshold skips nothing (equal to exact); a large one changes only the gradients."""
    case = _triton_case(triton_cfg)
    exact = _run_grads(triton_cfg, case)
    tiny = _run_grads(triton_cfg, case, grad_filter=1e-30)
    for name, a, b in zip(("loss", "lse"), exact, tiny):
        assert torch.equal(a, b), f"grad_filter=1e-30: {name} differs from the exact result"
    for name, a, b in zip(("dx", "dw", "db"), exact[2:], tiny[2:]):
        if triton_cfg.interpreted:  # sequential atomics: bitwise
            assert torch.equal(a, b), f"grad_filter=1e-30: {name} differs from the exact result"
        else:  # fp32 atomics in another order
            assert_close(a, b.double(), 1e-5 if triton_cfg.dtype == torch.float32 else 1e-2, name)
    # |dL/dz| <= ~2 max(omega) / sum(omega) + |dlse| < 1e3 everywhere: every tile is filtered
    big = _run_grads(triton_cfg, case, grad_filter=1e3)
    assert torch.equal(exact[0], big[0]) and torch.equal(exact[1], big[1]), "grad_filter must not change the forward"
    assert any(not torch.equal(a, b) for a, b in zip(exact[2:], big[2:])), "a large grad_filter changed no gradient"
    for gr in big[2:]:
        assert bool(torch.isfinite(gr).all())


def test_grad_filter_under_deterministic_algorithms(triton_cfg, deterministic):
    """With deterministic algorithms on, grad_filter must either take effect or refuse with an
    error naming it; it must not be dropped silently."""
    case = _triton_case(triton_cfg)
    exact = _run_grads(triton_cfg, case)
    try:
        big = _run_grads(triton_cfg, case, grad_filter=1e3)
    except (ValueError, RuntimeError) as exc:
        assert "grad_filter" in str(exc)
        return
    assert any(not torch.equal(a, b) for a, b in zip(exact[2:], big[2:])), (
        "grad_filter=1e3 is silently ignored under torch.use_deterministic_algorithms(True)")


# ----------------------------------------------------------------------------- GPU: large shapes

GPU_SHAPES = [
    pytest.param(4096, 512, 32000, torch.float32, 0.0, dict(), id="N4096-D512-V32000-fp32"),
    pytest.param(4096, 512, 32000, torch.bfloat16, 0.0, dict(), id="N4096-D512-V32000-bf16"),
    pytest.param(4096, 512, 32000, torch.bfloat16, 0.1, dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
                 id="N4096-D512-V32000-bf16-options"),
    pytest.param(1000, 4096, 50257, torch.bfloat16, 0.3, dict(), id="N1000-D4096-V50257-bf16-ignore"),
    pytest.param(1000, 4096, 50257, torch.float16, 0.3, dict(reduction="sum"), id="N1000-D4096-V50257-fp16-ignore"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,D,V,dtype,ignore_frac,opts", GPU_SHAPES)
def test_gpu_large(N, D, V, dtype, ignore_frac, opts):
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    cfg = type("C", (), dict(impl="triton", device="cuda", dtype=dtype, tol=tol))()
    case = make_case(cfg, (N,), V, D, bias=False, ignore_frac=ignore_frac, seed=21)
    check_against_oracle(cfg, case, **opts)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_auto_picks_triton_and_matches_reference():
    cfg = type("C", (), dict(impl="auto", device="cuda", dtype=torch.bfloat16, tol=2e-2))()
    case = make_case(cfg, (2, 513), 1000, 256, bias=True, ignore_frac=0.1, seed=22)
    a = nckernels.linear_cross_entropy(**case, shift=True)
    b = nckernels.linear_cross_entropy(**case, shift=True, impl="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = nckernels.linear_cross_entropy(**case, shift=True, impl="reference")
    torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-3)
