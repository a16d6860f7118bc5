"""The C++ StableMax epilogues of ``csrc/stablemax_cpu.cpp`` against float64, and ``impl="cpp"`` end to end.

``stablemax_rows_forward`` / ``stablemax_rows_backward_`` are checked directly against a float64
computation of the same quantities (``stablemax_rows_forward`` / ``stablemax_rows_backward_`` of
``nckernels/reference/rowwise.py`` are their spec), on fresh random inputs, for every instruction
set the CPU supports. The module skips when the extension is unavailable.
"""
from __future__ import annotations

import pytest
import torch

import nckernels
from nckernels import _ext

_mod = _ext.get()
pytestmark = pytest.mark.skipif(_mod is None, reason=f"C++ extension unavailable: {_ext.error()}")


def _isas():
    return _mod.supported_cpu_isas() if _mod is not None else ["generic"]


@pytest.fixture(params=_isas())
def C(request):
    _mod.set_cpu_isa(request.param)
    yield _mod
    _mod.set_cpu_isa("auto")


def _s64(z):
    z = z.double()
    return torch.where(z >= 0, z + 1, 1 / (1 - z.clamp(max=0)))


def _forward64(z, t):
    s = _s64(z)
    s_t = s.gather(1, t[:, None]).squeeze(1)
    return s_t, s.scatter(1, t[:, None], 0.0).sum(-1)


def _backward64(z, t, norm, a, b):
    z64 = z.double()
    g = a.double()[:, None] * _s64(z64) / norm.double()[:, None]
    g = g.scatter_add(1, t[:, None], -b.double()[:, None])
    return g / (1 + z64.abs())


def _logits(n, V, scale, gen, special=True):
    z = torch.randn(n, V, generator=gen) * scale
    if special and V > 3:
        z[:, 0] = 1.0  # exact 1.0: no inf / NaN
        z[:, 1] = -scale * 1e3  # large negative
        z[:, 2] = 0.0
    return z


def _close(got, want, rtol):
    want = want.float().double()
    got = got.double()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN pattern differs"
    same = got == want  # also +-inf
    err = torch.where(same, 0.0, (got - want).abs())[~nan]
    tol = rtol * (want.abs()[~nan] + 1e-30)
    assert bool((err <= tol).all()), f"max rel err {(err / (want.abs()[~nan] + 1e-30)).max().item():.3g}"


SHAPES = [(1, 1), (1, 7), (3, 1), (5, 33), (4, 257), (2, 1000), (16, 4099)]
SCALES = [1.0, 30.0, 1e8]


@pytest.mark.parametrize("n,V", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_forward_matches_float64(C, n, V, scale):
    gen = torch.Generator().manual_seed(n * 1009 + V + int(scale) % 97)
    z = _logits(n, V, scale, gen)
    t = torch.randint(0, V, (n,), generator=gen)
    z0 = z.clone()
    s_t, s_o = C.stablemax_rows_forward(z, t)
    assert torch.equal(z, z0), "forward modified z"
    assert s_t.dtype == torch.float32 and s_o.dtype == torch.float32 and s_t.shape == (n,)
    w_t, w_o = _forward64(z, t)
    _close(s_t, w_t, 1e-6)
    _close(s_o, w_o, 2e-6)


@pytest.mark.parametrize("n,V", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_backward_matches_float64(C, n, V, scale):
    gen = torch.Generator().manual_seed(n * 7 + V + int(scale) % 89)
    z = _logits(n, V, scale, gen)
    t = torch.randint(0, V, (n,), generator=gen)
    s_t, s_o = _forward64(z, t)
    norm = (s_t + s_o).float()
    a = torch.rand(n, generator=gen) + 0.5
    b = torch.rand(n, generator=gen) + 0.5
    want = _backward64(z, t, norm, a, b)
    zc = z.clone()
    out = C.stablemax_rows_backward_(zc, t, norm, a, b)
    assert out.data_ptr() == zc.data_ptr(), "backward is not in place"
    want32 = want.float().double()
    err = (out.double() - want32).abs()
    # relative to the row's gradient scale (the target entry is a difference of two terms)
    scale_row = want32.abs().amax(1, keepdim=True) + a.double()[:, None] / norm.double()[:, None]
    assert bool((err <= 1e-6 * scale_row + 4e-6 * want32.abs()).all()), err.max()


def test_target_is_excluded_and_special_values(C):
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[1.0, -1.0, 0.0, 2.5],
                      [nan, 1.0, 2.0, -3.0],  # NaN at the target only: s_other finite
                      [1.0, nan, 0.0, 0.0],  # NaN elsewhere: s_other NaN
                      [-inf, 1e8, -1e8, 1.0],
                      [inf, 0.0, 0.0, 0.0]])
    t = torch.tensor([0, 0, 0, 0, 0])
    s_t, s_o = C.stablemax_rows_forward(z, t)
    w_t, w_o = _forward64(z, t)
    _close(s_t, w_t, 1e-6)
    _close(s_o, w_o, 1e-6)
    assert s_t[0] == 2.0 and s_o[0] == pytest.approx(0.5 + 1.0 + 3.5)
    assert s_t[1].isnan() and s_o[1].isfinite()
    assert s_o[2].isnan()
    assert s_t[3] == 0.0 and s_t[4] == inf
    # backward: NaN propagates to its own entry; z = 1 gives a finite gradient
    norm = torch.tensor([6.0, 9.0, 3.0, 1e8, 4.0])
    ones = torch.ones(5)
    g = C.stablemax_rows_backward_(z.clone(), t, norm, ones, ones)
    ref = nckernels.reference.rowwise.stablemax_rows_backward_(z.clone(), t, None, norm, None, ones, ones)
    assert torch.equal(g.isnan(), ref.isnan())
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-12, equal_nan=True)
    assert torch.isfinite(g[0]).all() and g[0, 0] == pytest.approx((2.0 / 6.0 - 1.0) / 2.0)


@pytest.mark.parametrize("n,V", [(3, 37), (8, 300)])
def test_matches_reference_epilogues(C, n, V):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(n, V, generator=gen) * 4
    t = torch.randint(0, V, (n,), generator=gen)
    from nckernels.reference import rowwise as ref

    got = C.stablemax_rows_forward(z, t)
    want = ref.stablemax_rows_forward(z.clone(), t)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=0)
    norm, a, b = want[0] + want[1], torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    torch.testing.assert_close(C.stablemax_rows_backward_(z.clone(), t, norm, a, b),
                               ref.stablemax_rows_backward_(z.clone(), t, None, norm, None, a, b), rtol=2e-6, atol=1e-9)


def test_empty_rows():
    s_t, s_o = _mod.stablemax_rows_forward(torch.empty(0, 5), torch.empty(0, dtype=torch.long))
    assert s_t.shape == (0,) and s_o.shape == (0,)


def test_bad_inputs():
    C = _mod
    z, t = torch.randn(3, 5), torch.tensor([0, 4, 2])
    v = torch.ones(3)
    with pytest.raises(TypeError, match="z must be float32"):
        C.stablemax_rows_forward(z.double(), t)
    with pytest.raises(TypeError, match="target must be Long"):
        C.stablemax_rows_forward(z, t.int())
    with pytest.raises(ValueError, match="2-D"):
        C.stablemax_rows_forward(z[0], t)
    with pytest.raises(ValueError, match="contiguous"):
        C.stablemax_rows_forward(torch.randn(5, 3).t(), t)
    with pytest.raises(ValueError, match="shape"):
        C.stablemax_rows_forward(z, t[:2])
    with pytest.raises(ValueError, match="at least one column"):
        C.stablemax_rows_forward(torch.empty(3, 0), t)
    with pytest.raises(IndexError, match="outside"):
        C.stablemax_rows_forward(z, torch.tensor([0, 5, 1]))
    with pytest.raises(IndexError, match="outside"):
        C.stablemax_rows_backward_(z, torch.tensor([0, -1, 1]), v, v, v)
    with pytest.raises(TypeError, match="norm"):
        C.stablemax_rows_backward_(z, t, v.double(), v, v)
    with pytest.raises(ValueError, match="coef_p"):
        C.stablemax_rows_backward_(z, t, v, torch.ones(4), v)
    with pytest.raises(ValueError, match="coef_t"):
        C.stablemax_rows_backward_(z, t, v, v, torch.ones(3, 2)[:, 0])


def _grads(fn, *args):
    args = [a.clone().requires_grad_(True) if a.is_floating_point() else a for a in args]
    loss = fn(*args)
    loss.backward()
    return loss.detach(), [a.grad for a in args if a.is_floating_point()]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_stablemax_cross_entropy_cpp_matches_reference(reduction):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 45, generator=gen) * 3
    x[0, 3] = 1.0
    t = torch.randint(0, 45, (6,), generator=gen)
    t[2] = -100
    res = {}
    for impl in ("cpp", "reference"):
        res[impl] = _grads(lambda x: nckernels.stablemax_cross_entropy(x, t, reduction=reduction, impl=impl), x)
    torch.testing.assert_close(res["cpp"][0], res["reference"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["cpp"][1][0], res["reference"][1][0], rtol=1e-5, atol=1e-7)
    assert torch.all(res["cpp"][1][0][2] == 0)


def test_linear_stablemax_cross_entropy_cpp_matches_reference():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(7, 16, generator=gen)
    w = torch.randn(37, 16, generator=gen) * 0.5
    t = torch.randint(0, 37, (7,), generator=gen)
    t[4] = -100
    res = {}
    for impl in ("cpp", "reference"):
        res[impl] = _grads(lambda x, w: nckernels.linear_stablemax_cross_entropy(x, w, t, impl=impl), x, w)
    torch.testing.assert_close(res["cpp"][0], res["reference"][0], rtol=1e-5, atol=1e-6)
    for g, r in zip(res["cpp"][1], res["reference"][1]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
