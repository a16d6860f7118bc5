"""Row-wise ops on explicit logits against float64 oracles (``oracle_rowwise.py``), on every backend.

``softmax``, ``log_softmax``, ``logsumexp`` (backends reference and triton), ``cross_entropy``
(reference, cpp, triton) and ``softmax_collapse``. The Triton configs run in the interpreter on
CPU (``TRITON_INTERPRET=1``, set by conftest) in fp32 and fp16; under the interpreter rows longer
than 64 take the multi-chunk (online) path, so the lengths 65, 100, 300 cover it (with few rows:
the interpreter is slow). Oracles run in float64 on the config-dtype inputs, so the rounding of
bf16/fp16 inputs is not counted as error; gradients are compared fp32/fp16/bf16 autograd vs the
oracle's float64 autograd (``gradcheck`` cannot run: the ops take no float64).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nckernels as nk
from conftest import CONFIGS
from oracle_rowwise import (
    assert_close,
    cross_entropy_oracle,
    log_softmax_oracle,
    logsumexp_oracle,
    softmax_collapse_oracle,
    softmax_oracle,
)

INF, NAN = float("inf"), float("nan")
LENGTHS = [1, 5, 64, 65, 100, 300]

# the softmax family has no C++ backend: reference (fp32, bf16) and triton (fp32, fp16 interpreted)
ROW_CFGS = [pytest.param(c, id=c.id, marks=m) for c, m in CONFIGS if c.impl != "cpp"]
ROW_CFGS_FP32 = [pytest.param(c, id=c.id, marks=m) for c, m in CONFIGS
                 if c.impl != "cpp" and c.dtype == torch.float32]
# layouts are handled before any kernel (dim moved last, made contiguous): the slow interpreter
# checks them in fp32 only
ROW_CFGS_LAYOUT = [pytest.param(c, id=c.id, marks=m) for c, m in CONFIGS
                   if c.impl != "cpp" and not (c.interpreted and c.dtype != torch.float32)]


def length_params(configs):
    """``(config, C)`` for every length; the interpreter runs the two longest in fp32 only."""
    return [pytest.param(c, C, id=f"{c.id}-{C}", marks=m) for c, m in configs for C in LENGTHS
            if not (c.interpreted and c.dtype != torch.float32 and C > 65)]


ROW_LENGTHS = length_params([(c, m) for c, m in CONFIGS if c.impl != "cpp"])
ALL_LENGTHS = length_params(CONFIGS)


def n_rows(cfg, C):
    """13 rows (not a multiple of any BLOCK_M); in the slow interpreter 2 rows of 65..128, 1 longer row."""
    if cfg.interpreted and C > 64:
        return 2 if C <= 128 else 1
    return 13


def need_cpp(cfg):
    """The ``_skip_missing_cpp`` of conftest, for configs passed under another parameter name."""
    if cfg.impl == "cpp":
        from nckernels import _ext

        if _ext.get() is None:
            pytest.skip(f"C++ extension nckernels._C unavailable: {_ext.error()}")


def pairwise_subset(combos):
    """A greedy subset of ``combos`` (dicts) in which every pair of option values that occurs in
    ``combos`` occurs at least once (deterministic)."""
    def pairs(c):
        items = sorted((k, repr(v)) for k, v in c.items())
        return set(itertools.combinations(items, 2))

    uncovered = set().union(*(pairs(c) for c in combos))
    out = []
    while uncovered:
        best = max(combos, key=lambda c: len(pairs(c) & uncovered))
        out.append(best)
        uncovered -= pairs(best)
    return out


def randn(shape, cfg, *, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(cfg.device, cfg.dtype)


def upstream(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(*shape, generator=g).to(dtype)


# ----------------------------------------------------------------------------- softmax family

OPS = {
    "softmax": (nk.softmax, softmax_oracle, torch.softmax),
    "log_softmax": (nk.log_softmax, log_softmax_oracle, torch.log_softmax),
    "logsumexp": (nk.logsumexp, logsumexp_oracle, torch.logsumexp),
}


def _gross_grad(name, xo, g, dim, keepdim=False):
    """Largest summed magnitude of the terms of the input gradient (float64): the error scale
    where terms cancel (a row of length 1, say)."""
    if xo.numel() == 0 or xo.dim() == 0:
        return 0.0
    g = g.double().abs()
    if name == "logsumexp" and not keepdim:
        g = g.unsqueeze(dim)
    p = torch.softmax(xo.detach(), dim)
    if name == "softmax":
        gross = p * (g + (g * p).sum(dim, keepdim=True))
    elif name == "log_softmax":
        gross = g + p * g.sum(dim, keepdim=True)
    else:
        gross = g * p
    gross = gross[torch.isfinite(gross)]
    return gross.max().item() if gross.numel() else 0.0


def check_rowop(name, x, cfg, *, dim=-1, tol=None, seed=0, **kw):
    """Values (dtype, shape) and input gradient of ``name`` vs its float64 oracle."""
    ours, oracle, _ = OPS[name]
    tol = tol or cfg.tol
    xi = x.detach().requires_grad_()  # detach keeps the strides: non-contiguous stays so
    y = ours(xi, dim, impl=cfg.impl, **kw)
    xo = x.detach().double().requires_grad_()
    yo = oracle(xo, dim, **kw)
    assert y.dtype == (torch.float32 if name == "logsumexp" else x.dtype), f"{name}: dtype {y.dtype}"
    assert y.device == x.device
    assert_close(y, yo, tol, f"{name} value")
    g = upstream(y.shape, seed, y.dtype)
    y.backward(g)
    yo.backward(g.double())
    assert xi.grad is not None and xi.grad.dtype == x.dtype and xi.grad.shape == x.shape
    gross = _gross_grad(name, xo, g, dim, kw.get("keepdim", False))
    scale = max(xo.grad.abs().max().item() if xo.grad.numel() else 0.0, gross)
    assert_close(xi.grad, xo.grad, tol, f"{name} d input", scale=scale)
    return y, xi.grad


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg,C", ROW_LENGTHS)
def test_rowop_lengths(rcfg, name, C):
    """Row lengths 1, a few, exactly one tile (64), just over it, and several chunks."""
    check_rowop(name, randn((n_rows(rcfg, C), C), rcfg, seed=C), rcfg)


LAYOUTS = {
    # name: (logits shape or transposed-base shape, dim, transposed)
    "dim0": ((37, 4), 0, False),
    "dim1-of-3d": ((3, 37, 2), 1, False),
    "dim-3": ((37, 2, 3), -3, False),
    "dim1-of-3d-long": ((1, 70, 2), 1, False),
    "transposed-last": ((37, 6), -1, True),  # input = base.T: (6, 37), stride (1, 6)
    "transposed-dim0": ((5, 37), 0, True),  # input (37, 5) non-contiguous, reduce over dim 0
    "3d-last": ((2, 3, 37), -1, False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg", ROW_CFGS_LAYOUT)
def test_rowop_dims_and_strides(rcfg, name, layout):
    shape, dim, transposed = LAYOUTS[layout]
    x = randn(shape, rcfg, seed=3)
    if transposed:
        x = x.T
        assert not x.is_contiguous()
    check_rowop(name, x, rcfg, dim=dim)


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("rcfg", ROW_CFGS_LAYOUT)
def test_logsumexp_keepdim(rcfg, dim, keepdim):
    x = randn((3, 9, 4), rcfg, seed=4)
    y, _ = check_rowop("logsumexp", x, rcfg, dim=dim, keepdim=keepdim)
    assert y.shape == torch.logsumexp(x.float(), dim, keepdim=keepdim).shape


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 5), (3, 0)], ids=["0rows", "0rows-3d", "0cols"])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg", ROW_CFGS)
def test_rowop_empty(rcfg, name, shape):
    """Empty inputs: shapes and values as torch (a length-0 row has logsumexp -inf)."""
    x = randn(shape, rcfg)
    y, grad = check_rowop(name, x, rcfg)
    expected = OPS[name][2](x.float(), -1)
    assert y.shape == expected.shape
    assert torch.equal(y.float(), expected)
    assert grad.shape == x.shape


@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg", ROW_CFGS_FP32)
def test_rowop_zero_dim_input(rcfg, name, dim):
    """A 0-d tensor, like torch: dim 0 and -1 are both valid (torch.softmax(torch.tensor(1.), -1) == 1)."""
    x = torch.tensor(0.7, device=rcfg.device)
    y = OPS[name][0](x, dim, impl=rcfg.impl)
    expected = OPS[name][2](x, dim)
    assert y.shape == expected.shape
    assert_close(y, expected, 1e-6, name)


def _nonfinite_rows(C, long):
    """Rows with -inf, +inf and NaN in the places that matter; ``long``: some specials in the
    second / third 32-wide chunk (multi-chunk path of the interpreter)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, C, generator=g) * 2
    a, b = (40, 66) if long else (1, 3)
    x[0] = -INF  # all -inf: softmax NaN, logsumexp -inf
    x[1, a] = -INF  # one -inf: probability exactly 0
    x[2, b] = INF  # +inf: softmax NaN, logsumexp +inf
    x[3, a] = NAN
    x[4, 0], x[4, b] = INF, INF
    x[5, 0], x[5, b] = -INF, INF
    x[6, a], x[6, b] = INF, NAN
    x[7, :a] = -INF  # -inf first (a first chunk with an infinite max), then finite
    x[8, 0], x[8, a] = 80.0, -80.0  # large finite: no overflow
    return x  # row 9 finite


@pytest.mark.parametrize("C", [5, 70], ids=["short", "multichunk"])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rcfg", ROW_CFGS_FP32)
def test_rowop_nonfinite_like_torch(rcfg, name, C):
    """-inf / +inf / NaN rows: values and input gradients equal torch's on the same fp32 rows
    (NaN and inf at the same positions, finite values within fp32 rounding)."""
    base = _nonfinite_rows(C, C > 64)
    ours, _, torch_op = OPS[name]
    xi = base.clone().requires_grad_()
    xt = base.clone().requires_grad_()
    y = ours(xi, -1, impl=rcfg.impl)
    yt = torch_op(xt, -1)
    assert_close(y, yt, 1e-5, f"{name} value")
    g = upstream(y.shape, 0)
    y.backward(g)
    yt.backward(g)
    assert_close(xi.grad, xt.grad, 1e-5, f"{name} d input")


# ----------------------------------------------------------------------------- cross-entropy helpers


def make_ce_case(cfg, shape, *, weight=False, ignore="none", seed=0, target_dtype=torch.int64, scale=2.0):
    """Logits of ``shape`` (class dim 1, or 0 for 1-D), targets, class weights, ignore_index.

    ``ignore``: ``"none"``; ``"some"`` (~30% of targets set to -100); ``"class3"`` (ignore_index=3,
    a valid class index, as PyTorch allows); ``"all"``."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * scale).to(cfg.device, cfg.dtype)
    C = shape[1] if len(shape) > 1 else shape[0]
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    t = torch.randint(0, C, tshape, generator=g)
    ignore_index = -100
    if ignore == "some":
        t[torch.rand(tshape, generator=g) < 0.3] = ignore_index
    elif ignore == "class3":
        ignore_index = 3
        t[torch.rand(tshape, generator=g) < 0.3] = min(3, C - 1)
    elif ignore == "all":
        t.fill_(ignore_index)
    w = (torch.rand(C, generator=g) * 1.8 + 0.2).to(cfg.device) if weight else None
    return dict(input=x, target=t.to(cfg.device, target_dtype), weight=w, ignore_index=ignore_index)


def check_ce(cfg, case, *, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, tol=None, seed=0,
             impl=None):
    """Loss and input gradient of ``nk.cross_entropy`` vs the float64 oracle; ignored rows get
    exactly zero gradient; inputs are not modified."""
    tol = tol or cfg.tol
    x0, t, w, ii = case["input"], case["target"], case["weight"], case["ignore_index"]
    snapshot = x0.clone()
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    xi = x0.detach().requires_grad_()
    loss = nk.cross_entropy(xi, t, w, ii, impl=impl or cfg.impl, **opts)
    xo = x0.detach().double().requires_grad_()
    loss_o = cross_entropy_oracle(xo, t, w, ii, **opts)
    assert loss.dtype == torch.float32 and loss.device == x0.device
    assert_close(loss, loss_o, tol, "cross_entropy loss")

    g = upstream(loss.shape, seed) if loss.dim() else torch.tensor(0.75)
    loss.backward(g.to(loss.device))
    loss_o.backward(g.double())
    assert xi.grad is not None and xi.grad.dtype == x0.dtype and xi.grad.shape == x0.shape
    assert bool(torch.isfinite(xi.grad).all()), "non-finite gradient"
    # error scale where terms cancel (C = 1, say): the upstream gradient per row times the class weights
    tt = t.long().reshape(-1)
    valid = tt != ii
    if w is not None:
        wy = w.double().cpu()[torch.where(valid, tt, 0).cpu()]
    else:
        wy = torch.ones(tt.shape, dtype=torch.float64)
    denom = (wy * valid).sum().item() if reduction == "mean" else 1.0
    u = g.double().abs().reshape(-1).expand(tt.shape) / (denom if denom > 0 else 1.0)
    wmax = w.max().item() if w is not None else 1.0
    rows_o = xo.detach().movedim(1 if xo.dim() > 1 else 0, -1)
    lse_max = torch.logsumexp(rows_o, -1).abs().max().item() if xo.numel() else 0.0
    floor = (u * valid).max().item() * wmax * (1 + 2 * z_loss * lse_max) if tt.numel() else 0.0
    scale = max(xo.grad.abs().max().item() if xo.grad.numel() else 0.0, floor)
    assert_close(xi.grad, xo.grad, tol, "cross_entropy d input", scale=scale)

    ignored = (t.long() == ii)
    if bool(ignored.any()):
        grad_rows = xi.grad.movedim(1, -1) if x0.dim() > 1 else xi.grad.unsqueeze(0)
        assert bool((grad_rows[ignored.reshape(grad_rows.shape[:-1])] == 0).all()), "ignored rows need zero gradient"
    assert torch.equal(x0, snapshot), "input was modified in place"
    return loss, loss_o, xi.grad


# ----------------------------------------------------------------------------- cross-entropy vs oracle

IGNORE_MODES = ["some", "class3", "none"]
CE_GRID = [
    dict(reduction=r, label_smoothing=ls, weight=w, z_loss=z, softcap=c, ignore=IGNORE_MODES[i % 3])
    for i, (r, ls, w, z, c) in enumerate(itertools.product(["mean", "sum", "none"], [0.0, 0.1], [False, True],
                                                           [0.0, 1e-2], [None, 3.0]))
]


def _ce_id(c):
    return "-".join([c["reduction"], "ls" if c["label_smoothing"] else "nols", "w" if c["weight"] else "now",
                     "z" if c["z_loss"] else "noz", "cap" if c["softcap"] else "nocap", f"ign_{c['ignore']}"])


def _run_grid(cfg, combo, shape=(13, 37), seed=11):
    case = make_ce_case(cfg, shape, weight=combo["weight"], ignore=combo["ignore"], seed=seed)
    opts = {k: combo[k] for k in ("reduction", "label_smoothing", "z_loss", "softcap")}
    loss, loss_o, grad = check_ce(cfg, case, **opts)
    if combo["z_loss"] == 0 and combo["softcap"] is None:  # also PyTorch itself, on the same fp32 logits
        xt = case["input"].detach().float().requires_grad_()
        ref = F.cross_entropy(xt, case["target"].long(), case["weight"], ignore_index=case["ignore_index"],
                              reduction=combo["reduction"], label_smoothing=combo["label_smoothing"])
        assert_close(loss, ref, max(cfg.tol, 1e-5), "cross_entropy vs F.cross_entropy")


CE_GRID_PAIRWISE = pairwise_subset(CE_GRID)
# fp32 configs of every backend: the whole grid, but only a pairwise-covering subset in the slow interpreter
CE_GRID_PARAMS = [
    pytest.param(c, combo, id=f"{c.id}-{_ce_id(combo)}", marks=m)
    for c, m in CONFIGS if c.dtype == torch.float32
    for combo in (CE_GRID_PAIRWISE if c.interpreted else CE_GRID)
]


@pytest.mark.parametrize("bcfg,combo", CE_GRID_PARAMS)
def test_cross_entropy_options(bcfg, combo):
    """reduction x label_smoothing x class weight x z_loss x softcap x ignore mode, fp32, every backend."""
    need_cpp(bcfg)
    _run_grid(bcfg, combo)


def test_pairwise_subset_covers():
    for a, b in itertools.combinations(CE_GRID[0], 2):
        assert {(c[a], c[b]) for c in CE_GRID_PAIRWISE} == {(c[a], c[b]) for c in CE_GRID}
    assert len(CE_GRID_PAIRWISE) <= len(CE_GRID) // 3


@pytest.mark.parametrize("combo", CE_GRID_PAIRWISE, ids=_ce_id)
def test_cross_entropy_options_low_precision(lowp_cfg, combo):
    _run_grid(lowp_cfg, combo)


@pytest.mark.parametrize("plain", [True, False], ids=["plain", "options"])
@pytest.mark.parametrize("ccfg,C", ALL_LENGTHS)
def test_cross_entropy_lengths(ccfg, C, plain):
    """Row lengths 1 .. 300 (one tile, the chunked path), plain and with every option on."""
    need_cpp(ccfg)
    cfg = ccfg
    case = make_ce_case(cfg, (n_rows(cfg, C), C), weight=not plain, ignore="none" if plain else "some", seed=C)
    if plain:
        check_ce(cfg, case)
    else:
        check_ce(cfg, case, label_smoothing=0.05, z_loss=1e-3, softcap=4.0, reduction="sum")


ND_SHAPES = {"N-C-d1": (4, 7, 3), "N-C-d1-d2": (2, 5, 3, 2), "unbatched-C": (7,), "N-C-d1-long": (1, 70, 2)}


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("shape", list(ND_SHAPES))
def test_cross_entropy_nd(cfg, shape, reduction):
    """(N, C, d...) and (C,) inputs with class dim 1 (0), like F.cross_entropy."""
    case = make_ce_case(cfg, ND_SHAPES[shape], weight=True, ignore="some" if shape != "unbatched-C" else "none",
                        seed=2)
    loss, _, grad = check_ce(cfg, case, reduction=reduction, label_smoothing=0.1)
    xt = case["input"].detach().double().requires_grad_()
    ref = F.cross_entropy(xt, case["target"].long(), case["weight"].double(), ignore_index=case["ignore_index"],
                          reduction=reduction, label_smoothing=0.1)
    assert loss.shape == ref.shape
    assert_close(loss, ref, cfg.tol, "cross_entropy vs F.cross_entropy (float64)")


def test_cross_entropy_noncontiguous(cfg):
    """Transposed (N, C) logits and a permuted (N, C, d) view: same loss and gradient as contiguous."""
    g = torch.Generator().manual_seed(9)
    base = (torch.randn(37, 11, generator=g) * 2).to(cfg.device, cfg.dtype)
    x = base.T
    assert not x.is_contiguous()
    t = torch.randint(0, 37, (11,), generator=g).to(cfg.device)
    _, _, grad = check_ce(cfg, dict(input=x, target=t, weight=None, ignore_index=-100), label_smoothing=0.1)
    _, _, grad_c = check_ce(cfg, dict(input=x.contiguous(), target=t, weight=None, ignore_index=-100),
                            label_smoothing=0.1)
    torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)
    x3 = (torch.randn(3, 2, 9, generator=g) * 2).to(cfg.device, cfg.dtype).permute(0, 2, 1)  # (3, 9, 2) strided
    t3 = torch.randint(0, 9, (3, 2), generator=g).to(cfg.device)
    check_ce(cfg, dict(input=x3, target=t3, weight=None, ignore_index=-100), reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_int32_targets(cfg, reduction):
    """int32 and int64 targets give the same loss and gradient."""
    c64 = make_ce_case(cfg, (13, 37), weight=True, ignore="some", seed=4)
    c32 = dict(c64, target=c64["target"].to(torch.int32))
    l64, _, g64 = check_ce(cfg, c64, reduction=reduction, label_smoothing=0.1)
    l32, _, g32 = check_ce(cfg, c32, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(l32, l64, rtol=0, atol=0)
    torch.testing.assert_close(g32, g64, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored(cfg, reduction):
    """All targets ignored: mean NaN (like PyTorch), sum 0, none zeros; the gradient exactly 0."""
    case = make_ce_case(cfg, (6, 11), weight=True, ignore="all", seed=5)
    xi = case["input"].detach().requires_grad_()
    loss = nk.cross_entropy(xi, case["target"], case["weight"], case["ignore_index"], reduction=reduction,
                            label_smoothing=0.1, z_loss=1e-2, impl=cfg.impl)
    ref = F.cross_entropy(case["input"].float(), case["target"].long(), case["weight"], reduction=reduction,
                          label_smoothing=0.1)
    assert_close(loss, ref, 0.0, "all-ignored loss")
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert bool((loss == 0).all())
    loss.backward(torch.ones_like(loss))
    assert bool((xi.grad == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_empty(cfg, reduction):
    """0 rows: like F.cross_entropy (mean NaN, sum 0, none an empty vector); an empty gradient."""
    xi = torch.empty(0, 7, device=cfg.device, dtype=cfg.dtype).requires_grad_()
    t = torch.empty(0, dtype=torch.long, device=cfg.device)
    loss = nk.cross_entropy(xi, t, reduction=reduction, impl=cfg.impl)
    ref = F.cross_entropy(xi.detach().float(), t, reduction=reduction)
    assert loss.shape == ref.shape
    assert_close(loss, ref, 0.0, "empty loss")
    loss.sum().backward()
    assert xi.grad.shape == (0, 7)


def _ce_nonfinite_case(C, long):
    x = _nonfinite_rows(C, long)
    a, b = (40, 66) if long else (1, 3)
    t = torch.tensor([0, a, 1, 2, b, b, 0, a + 1, a, 2])  # row 1 targets its -inf logit: loss +inf
    return x, t


@pytest.mark.parametrize("C", [5, 70], ids=["short", "multichunk"])
def test_cross_entropy_nonfinite_like_torch(backend, C):
    """-inf / +inf / NaN rows: the unreduced loss equals F.cross_entropy on the same fp32 rows
    (NaN where torch has NaN, +inf for a -inf target logit, finite rows within rounding)."""
    x, t = _ce_nonfinite_case(C, C > 64)
    loss = nk.cross_entropy(x, t, reduction="none", impl=backend.impl)
    ref = F.cross_entropy(x, t, reduction="none")
    assert_close(loss, ref, 1e-5, "cross_entropy loss with non-finite logits")
    for reduction in ("mean", "sum"):
        assert_close(nk.cross_entropy(x, t, reduction=reduction, impl=backend.impl),
                     F.cross_entropy(x, t, reduction=reduction), 1e-5, reduction)


@pytest.mark.parametrize("C", [5, 70], ids=["short", "multichunk"])
def test_cross_entropy_nonfinite_grad_like_torch(backend, C):
    """The gradient of those rows, too: NaN where torch's is NaN (a row whose loss is NaN has an
    all-NaN gradient in PyTorch), equal elsewhere."""
    x, t = _ce_nonfinite_case(C, C > 64)
    xi, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = upstream((x.shape[0],), 0)
    nk.cross_entropy(xi, t, reduction="none", impl=backend.impl).backward(g)
    F.cross_entropy(xt, t, reduction="none").backward(g)
    finite_rows = torch.isfinite(xt.grad).all(1)
    # the rows that torch leaves finite must match in any case (no NaN leaks across rows)
    assert_close(xi.grad[finite_rows], xt.grad[finite_rows], 1e-5, "d input, rows finite in torch")
    assert_close(xi.grad, xt.grad, 1e-5, "d input, all rows")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("shape", [(9, 7), (3, 7, 2)], ids=["2d", "3d"])
def test_cross_entropy_probability_targets(reduction, label_smoothing, weight, shape):
    """Float targets shaped like the input go through PyTorch: same loss and grads as F.cross_entropy (float64)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(*shape, generator=g) * 2
    p = torch.softmax(torch.randn(*shape, generator=g), 1)
    w = torch.rand(7, generator=g) + 0.2 if weight else None
    xi, xo = x.clone().requires_grad_(), x.double().requires_grad_()
    loss = nk.cross_entropy(xi, p, w, reduction=reduction, label_smoothing=label_smoothing, impl="reference")
    ref = F.cross_entropy(xo, p.double(), w.double() if weight else None, reduction=reduction,
                          label_smoothing=label_smoothing)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, 1e-5, "probability-target loss")
    gr = upstream(loss.shape, 1) if loss.dim() else torch.tensor(0.5)
    loss.backward(gr)
    ref.backward(gr.double())
    assert_close(xi.grad, xo.grad, 1e-5, "probability-target d input")


def test_cross_entropy_probability_targets_reject_extras():
    x, p = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1)
    with pytest.raises(ValueError, match="z_loss"):
        nk.cross_entropy(x, p, z_loss=1e-3, impl="reference")
    with pytest.raises(ValueError, match="softcap"):
        nk.cross_entropy(x, p, softcap=5.0, impl="reference")


def test_cross_entropy_extreme_logits(backend):
    """Large finite logits (|z| ~ 1e4): no overflow, exact against the oracle."""
    case = make_ce_case(backend, (13, 37), weight=True, ignore="some", seed=21, scale=3e3)
    check_ce(backend, case, label_smoothing=0.1)


# ----------------------------------------------------------------------------- oracle self-checks


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.3), dict(weight=True), dict(ignore=True),
                                  dict(label_smoothing=0.2, weight=True, ignore=True)],
                         ids=["plain", "ls", "w", "ign", "all"])
def test_oracle_matches_torch(reduction, opts):
    """The float64 oracles equal torch's float64 ops (values and grads), so they cannot be wrong silently."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 9, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, 9, (6, 2), generator=g)
    if opts.get("ignore"):
        t[0, 1] = t[3, 0] = -7
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.1 if opts.get("weight") else None
    ls = opts.get("label_smoothing", 0.0)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = cross_entropy_oracle(a, t, w, -7, reduction, ls)
    theirs = F.cross_entropy(b, t, w, ignore_index=-7, reduction=reduction, label_smoothing=ls)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    gw = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    (ours * gw).sum().backward()
    (theirs * gw).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    for dim in (0, 1, -1):
        torch.testing.assert_close(softmax_oracle(x, dim), torch.softmax(x, dim))
        torch.testing.assert_close(log_softmax_oracle(x, dim), torch.log_softmax(x, dim))


def test_oracle_z_loss_softcap_by_hand():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64) * 3
    t = torch.tensor([0, 5, 2, -100, 1])
    loss = cross_entropy_oracle(x, t, reduction="none", z_loss=0.1, softcap=2.0)
    for i in range(5):
        if t[i] < 0:
            assert loss[i] == 0
            continue
        z = 2.0 * torch.tanh(x[i] / 2.0)
        lse = torch.logsumexp(z, 0)
        torch.testing.assert_close(loss[i], lse - z[t[i]] + 0.1 * lse ** 2)


# ----------------------------------------------------------------------------- random (hypothesis)


def test_cross_entropy_random(backend):
    """Random shapes (including 0 rows and class counts across the tile size), options and targets."""
    n_examples = 8 if backend.interpreted else 20

    @settings(max_examples=n_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def inner(data):
        C = data.draw(st.integers(1, 70), label="C")
        R = data.draw(st.integers(0, 3 if C > 64 and backend.interpreted else 12), label="R")
        d1 = data.draw(st.sampled_from([None, 1, 2]), label="d1")
        shape = (R, C) if d1 is None else (R, C, d1)
        case = make_ce_case(
            backend, shape,
            weight=data.draw(st.booleans(), label="weight"),
            ignore=data.draw(st.sampled_from(["none", "some", "class3", "all"]), label="ignore"),
            target_dtype=data.draw(st.sampled_from([torch.int64, torch.int32]), label="target_dtype"),
            seed=data.draw(st.integers(0, 2**16), label="seed"),
            scale=data.draw(st.sampled_from([0.1, 2.0, 30.0]), label="scale"),
        )
        check_ce(
            backend, case,
            reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
            label_smoothing=data.draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0), label="ls"),
            z_loss=data.draw(st.sampled_from([0.0]) | st.floats(0.0, 0.1), label="z_loss"),
            softcap=data.draw(st.none() | st.floats(0.5, 30.0), label="softcap"),
        )

    inner()


# ----------------------------------------------------------------------------- softmax_collapse

COLLAPSE_CFGS = ROW_CFGS  # reference fp32 / bf16, triton fp32 / fp16


def _collapse_case(cfg, C, seed=0):
    """Rows whose Softmax-Collapse status is known by construction, far from the rounding edges.

    Kinds: 0 collapsed in every dtype (all others 50 below the max), target = argmax (zero loss);
    1 collapsed, target elsewhere (loss 50); 2 not collapsed (random, spread 2); 3 target = argmax and
    one other class adding ``extra`` to the sum: 1/8 of half an ulp of 1 in fp16/bf16 (collapsed,
    yet its loss log(1 + extra) is not 0 in that dtype), 8 half-ulps in fp32 (not collapsed);
    4 ignored rows that have collapsed."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.tensor([0, 2, 1, 0, 3, 2, 4, 0, 3, 2, 1, 4, 0, 2])
    R = kinds.numel()
    half_ulp = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[cfg.dtype]
    lowp = cfg.dtype != torch.float32
    extra = half_ulp / 8 if lowp else half_ulp * 8  # kind 3: collapsed in fp16/bf16; in fp32 just not
    x = torch.empty(R, C)
    t = torch.empty(R, dtype=torch.long)
    for i, k in enumerate(kinds.tolist()):
        top = int(torch.randint(0, C, (1,), generator=g))
        m = float(torch.randint(-8, 8, (1,), generator=g))  # exact in every dtype, and so is m - 50
        if k == 2:
            x[i] = m - torch.rand(C, generator=g) * 2 - 0.5
        else:
            x[i] = m - 50.0
        if k == 3 and C > 1:  # all of the extra mass in one other class: no sum of sub-ulp terms
            x[i, (top + 1) % C] = m + math.log(extra)
        x[i, top] = m
        t[i] = top if k != 1 else (top + 1) % C
        if k == 4:
            t[i] = -100
    return x.to(cfg.device, cfg.dtype), t.to(cfg.device), kinds


@pytest.mark.parametrize("C", [16, 70], ids=["C16", "C70-multichunk"])
@pytest.mark.parametrize("rcfg", COLLAPSE_CFGS)
def test_softmax_collapse(rcfg, C):
    """SC fraction and zero-loss fraction vs a direct float64 computation and the known construction;
    ignored rows excluded from the zero-loss fraction."""
    x, t, kinds = _collapse_case(rcfg, C)
    if rcfg.interpreted and C > 64:
        x, t, kinds = x[:6], t[:6], kinds[:6]
    out = nk.softmax_collapse(x, t, impl=rcfg.impl)
    sc_o, zero_o = softmax_collapse_oracle(x, t)
    R = x.shape[0]
    lowp = rcfg.dtype != torch.float32
    collapsed = (kinds != 2) if lowp else ((kinds != 2) & (kinds != 3))  # kind 3: see _collapse_case
    zero_rows = kinds == 0
    valid = kinds != 4
    assert out.rows == R
    assert out.sc_fraction.dtype == torch.float32 and out.sc_fraction.dim() == 0
    assert out.sc_fraction.item() == pytest.approx(sc_o, abs=1e-6)
    assert sc_o == pytest.approx(collapsed.float().mean().item(), abs=1e-6), "test construction"
    assert out.zero_loss_fraction.item() == pytest.approx(zero_o, abs=1e-6)
    assert zero_o == pytest.approx((zero_rows & valid).sum().item() / valid.sum().item(), abs=1e-6), "construction"


@pytest.mark.parametrize("rcfg", COLLAPSE_CFGS)
def test_softmax_collapse_no_target_and_3d(rcfg):
    x, t, _ = _collapse_case(rcfg, 16, seed=1)
    out = nk.softmax_collapse(x, impl=rcfg.impl)
    assert out.zero_loss_fraction is None
    assert out.sc_fraction.item() == pytest.approx(softmax_collapse_oracle(x)[0], abs=1e-6)
    x3, t3 = x[:12].reshape(3, 4, 16), t[:12].reshape(3, 4)  # (B, T, C) logits, classes last
    out3 = nk.softmax_collapse(x3, t3, impl=rcfg.impl)
    sc_o, zero_o = softmax_collapse_oracle(x3, t3)
    assert out3.rows == 12
    assert out3.sc_fraction.item() == pytest.approx(sc_o, abs=1e-6)
    assert out3.zero_loss_fraction.item() == pytest.approx(zero_o, abs=1e-6)


def test_softmax_collapse_all_ignored_and_custom_ignore_index():
    x, t, _ = _collapse_case(CONFIGS[0][0], 16, seed=2)
    out = nk.softmax_collapse(x, torch.full_like(t, -100), impl="reference")
    assert torch.isnan(out.zero_loss_fraction)
    empty = nk.softmax_collapse(torch.empty(0, 5), torch.empty(0, dtype=torch.long), impl="reference")
    assert empty.rows == 0 and torch.isnan(empty.sc_fraction) and torch.isnan(empty.zero_loss_fraction)
    t2 = torch.where(t == -100, 5, t)  # ignore_index 5, a valid class index
    out2 = nk.softmax_collapse(x, t2, ignore_index=5, impl="reference")
    assert out2.zero_loss_fraction.item() == pytest.approx(softmax_collapse_oracle(x, t2, 5)[1], abs=1e-6)


def test_softmax_collapse_bad_target():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="target"):
        nk.softmax_collapse(x, torch.tensor([0, 1, 6, 2]), impl="reference")
    with pytest.raises(ValueError, match="target"):
        nk.softmax_collapse(x, torch.tensor([0, 1, -3, 2]), impl="reference")
    with pytest.raises(ValueError, match="target"):
        nk.softmax_collapse(x, torch.zeros(4), impl="reference")
    with pytest.raises(ValueError, match="target"):
        nk.softmax_collapse(x, torch.zeros(3, dtype=torch.long), impl="reference")
    with pytest.raises(TypeError, match="logits"):
        nk.softmax_collapse(x.long(), impl="reference")


# ----------------------------------------------------------------------------- bad inputs

X = torch.randn(4, 5)
T = torch.tensor([0, 1, 4, 2])

BAD_CE = {
    "float-target-wrong-shape": (lambda: dict(input=X, target=torch.zeros(4)), TypeError, "target"),
    "bool-target": (lambda: dict(input=X, target=torch.zeros(4, dtype=torch.bool)), TypeError, "target"),
    "target-shape": (lambda: dict(input=X, target=torch.zeros(4, 1, dtype=torch.long)), ValueError, "target"),
    "target-too-large": (lambda: dict(input=X, target=torch.tensor([0, 1, 5, 2])), ValueError, "target"),
    "target-negative": (lambda: dict(input=X, target=torch.tensor([0, -1, 3, 2])), ValueError, "target"),
    "reduction": (lambda: dict(input=X, target=T, reduction="avg"), ValueError, "reduction"),
    "label_smoothing>1": (lambda: dict(input=X, target=T, label_smoothing=1.5), ValueError, "label_smoothing"),
    "label_smoothing<0": (lambda: dict(input=X, target=T, label_smoothing=-0.1), ValueError, "label_smoothing"),
    "label_smoothing-nan": (lambda: dict(input=X, target=T, label_smoothing=NAN), ValueError, "label_smoothing"),
    "z_loss<0": (lambda: dict(input=X, target=T, z_loss=-1e-3), ValueError, "z_loss"),
    "softcap<0": (lambda: dict(input=X, target=T, softcap=-1.0), ValueError, "softcap"),
    "softcap=0": (lambda: dict(input=X, target=T, softcap=0.0), ValueError, "softcap"),
    "weight-shape": (lambda: dict(input=X, target=T, weight=torch.ones(4)), ValueError, "weight"),
    "weight-2d": (lambda: dict(input=X, target=T, weight=torch.ones(1, 5)), ValueError, "weight"),
    "int-input": (lambda: dict(input=X.long(), target=T), TypeError, "input"),
    "float64-input": (lambda: dict(input=X.double(), target=T), TypeError, "input"),
    "0d-input": (lambda: dict(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "input"),
    "ignore_index-float": (lambda: dict(input=X, target=T, ignore_index=-1.0), TypeError, "ignore_index"),
}


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("case", list(BAD_CE))
def test_cross_entropy_bad_input_raises(case, impl):
    make, exc, match = BAD_CE[case]
    with pytest.raises(exc, match=match):
        nk.cross_entropy(**make(), impl=impl)


BAD_ROWOP = {
    "dim-too-large": (lambda: dict(input=X, dim=2), ValueError, "dim"),
    "dim-too-small": (lambda: dict(input=X, dim=-3), ValueError, "dim"),
    "int-input": (lambda: dict(input=X.long()), TypeError, "input"),
    "float64-input": (lambda: dict(input=X.double()), TypeError, "input"),
    "list-input": (lambda: dict(input=[1.0, 2.0]), TypeError, "input"),
}


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("case", list(BAD_ROWOP))
def test_rowop_bad_input_raises(case, name, impl):
    make, exc, match = BAD_ROWOP[case]
    with pytest.raises(exc, match=match):
        OPS[name][0](**make(), impl=impl)


def test_rowop_no_cpp_backend():
    with pytest.raises(ValueError, match="impl"):
        nk.softmax(X, impl="cpp")
    with pytest.raises(ValueError, match="impl"):
        nk.logsumexp(X, impl="nope")
