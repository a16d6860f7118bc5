"""The C++ CPU kernels of ``csrc/linear_ce_cpu.cpp`` against float64, and ``impl="cpp"`` end to end.

``ce_rows_forward`` / ``ce_rows_backward_`` are checked directly against a float64 computation
of the same quantities (``rows_forward`` / ``rows_backward_`` of the reference are their spec),
on fresh random inputs, for every instruction set the CPU supports. Tests that need the
extension skip when it is unavailable; the last tests check the package without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nckernels
from nckernels import _ext


@pytest.fixture(scope="module")
def ext():
    mod = _ext.get()
    if mod is None:
        pytest.skip(f"C++ extension unavailable: {_ext.error()}")
    return mod


def _isas():
    mod = _ext.get()
    return mod.supported_cpu_isas() if mod is not None else ["generic"]


@pytest.fixture(params=_isas())
def isa(request, ext):
    ext.set_cpu_isa(request.param)
    yield request.param
    ext.set_cpu_isa("auto")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- float64 oracle

def oracle_forward(z, target, class_weight, label_smoothing, softcap):
    zp = z.double()
    if softcap > 0:
        zp = softcap * torch.tanh(zp / softcap)
    lse = torch.logsumexp(zp, dim=1)
    z_target = zp.gather(1, target[:, None])[:, 0]
    if label_smoothing > 0:
        z_smooth = zp @ class_weight.double() if class_weight is not None else zp.sum(1)
    else:
        z_smooth = torch.zeros_like(lse)
    return lse, z_target, z_smooth


def oracle_backward(z, target, class_weight, lse, lse_lo, a, b, c, softcap):
    zp = z.double()
    if softcap > 0:
        th = torch.tanh(zp / softcap)
        zp = softcap * th
    omega = class_weight.double() if class_weight is not None else torch.ones(z.shape[1], dtype=torch.float64)
    lse = lse.double() + lse_lo.double()
    g = a.double()[:, None] * torch.exp(zp - lse[:, None]) - c.double()[:, None] * omega
    g[torch.arange(z.shape[0]), target] -= b.double()
    if softcap > 0:
        g = g * (1 - th * th)
    return g


def _close(actual, expected, atol, rtol=1e-5):
    """|actual - expected| <= atol + rtol |expected| elementwise (atol may broadcast, e.g. per row);
    NaN where and only where expected is NaN; infinities equal."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"NaN pattern differs:\n{actual}\n{expected}"
    inf = expected.isinf()
    assert torch.equal(actual[inf], expected[inf]), "infinities differ"
    finite = ~nan & ~inf
    err = (actual - expected).abs()
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(expected) + rtol * expected.abs()
    bad = finite & ~(err <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())} of {expected.numel()} elements off; worst excess "
        f"{float((err - bound)[bad].max()):.3g} at {bad.nonzero()[0].tolist()}"
    )


def _inputs(n, V, seed, scale=3.0, weighted=False):
    g = _gen(seed)
    z = torch.randn(n, V, generator=g) * scale
    target = torch.randint(0, V, (n,), generator=g)
    if n > 1:
        target[0], target[-1] = 0, V - 1  # both ends of a row
    w = (torch.rand(V, generator=g) + 0.5) if weighted else None
    a = torch.rand(n, generator=g) + 0.5
    b = torch.randn(n, generator=g)
    c = torch.randn(n, generator=g) * 0.1
    return z, target, w, a, b, c


def _check_rows(ext, z, target, w, eps, cap, a, b, c):
    """Forward and backward of the kernel against float64 on the same inputs."""
    z_before = z.clone()
    lse, lse_lo, zt, zs = ext.ce_rows_forward(z, target, w, eps, cap)
    assert torch.equal(z, z_before), "ce_rows_forward modified z"
    assert all(t.dtype == torch.float32 and t.shape == (z.shape[0],) for t in (lse, lse_lo, zt, zs))
    r_lse, r_zt, r_zs = oracle_forward(z, target, w, eps, cap)
    _close(lse, r_lse, atol=2e-6 * max(1.0, cap))
    # the pair resolves the LSE below ulp(lse): only the ~1e-7 relative error of the exp approximation is left
    assert (lse_lo.abs() <= lse.abs() * 2**-24).all(), "lse_lo must be the rounding residual of lse"
    _close(lse.double() + lse_lo.double(), r_lse, atol=5e-7 * max(1.0, cap), rtol=0.0)
    _close(zt, r_zt, atol=2e-6 * max(1.0, cap))
    zp = z.double() if cap == 0 else cap * torch.tanh(z.double() / cap)
    magnitude = zp.abs() @ w.double() if w is not None else zp.abs().sum(1)  # sum_j |omega_j z'_j|
    _close(zs, r_zs, atol=1e-5 + 2e-6 * magnitude)

    dz = ext.ce_rows_backward_(z, target, w, lse, lse_lo, a, b, c, cap)
    assert dz.data_ptr() == z.data_ptr(), "ce_rows_backward_ must work in place"
    ref = oracle_backward(z_before, target, w, lse, lse_lo, a, b, c, cap)
    wmax = float(w.abs().max()) if w is not None else 1.0
    scale = (a.abs() + b.abs() + c.abs() * wmax).double()[:, None]
    _close(dz, ref, atol=1e-5 * scale)
    return lse, lse_lo, zt, zs, dz


# ---------------------------------------------------------------- kernel vs float64

SHAPES = [(1, 1), (1, 7), (3, 1), (5, 33), (17, 257), (4, 1000), (2, 4099)]


@pytest.mark.parametrize("n,V", SHAPES, ids=[f"n{n}-V{V}" for n, V in SHAPES])
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["nocap", "cap5"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["nosmooth", "smooth"])
def test_rows_match_float64(ext, isa, n, V, softcap, weighted, eps):
    z, target, w, a, b, c = _inputs(n, V, seed=n * 7919 + V, weighted=weighted)
    _check_rows(ext, z, target, w, eps, softcap, a, b, c)


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_rising_rows_rescale_online(ext, isa, softcap):
    """The max sits in the last block: the running sum is rescaled block after block."""
    n, V = 3, 2000
    z = torch.linspace(-60.0, 60.0, V).repeat(n, 1)
    z[1] = z[1].flip(0)
    z[2, ::2] *= -1
    target = torch.tensor([0, V - 1, 999])
    _, _, w, a, b, c = _inputs(n, V, seed=1, weighted=True)
    _check_rows(ext, z, target, w, 0.1, softcap, a, b, c)


@pytest.mark.parametrize("big", [1e4, 3e38, -3e38])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_huge_logit(ext, isa, big, softcap):
    z, target, w, a, b, c = _inputs(4, 300, seed=2)
    z[0, 17] = big
    z[1, 299] = big
    target[2] = 0
    z[2, 0] = big
    lse, *_ = _check_rows(ext, z, target, w, 0.1, softcap, a, b, c)
    assert torch.isfinite(lse).all()


def test_nonfinite_like_logsumexp(ext, isa):
    """-inf, +inf and NaN logits give torch.logsumexp's answers (no NaN from inf - inf)."""
    V = 40
    z = torch.randn(7, V, generator=_gen(3))
    z[0] = float("-inf")                      # all -inf -> lse = -inf
    z[1, ::3] = float("-inf")                 # some -inf -> finite
    z[2, 5] = float("inf")                    # +inf -> +inf
    z[3, 5], z[3, 9] = float("inf"), float("-inf")
    z[4, 30] = float("nan")                   # NaN -> NaN
    z[5, 2], z[5, 30] = float("inf"), float("nan")
    z[6, :] = float("inf")
    target = torch.full((7,), 1)
    lse, lse_lo, zt, zs = ext.ce_rows_forward(z, target, None, 0.0, 0.0)
    assert torch.equal(lse_lo[~lse.isfinite()], torch.zeros(int((~lse.isfinite()).sum())))
    expected = torch.logsumexp(z.double(), dim=1)
    _close(lse, expected, atol=1e-6)
    assert lse[0] == float("-inf") and lse[2] == float("inf") and lse[3] == float("inf")
    assert lse[4].isnan() and lse[5].isnan() and torch.isfinite(lse[1])
    # smoothing sums see the NaN / infinities too
    *_, zs = ext.ce_rows_forward(z, target, None, 0.1, 0.0)
    _close(zs, z.double().sum(1), atol=1e-4)
    assert zs[4].isnan() and zs[0] == float("-inf")
    # soft-capping maps +-inf to +-cap; NaN stays NaN
    lse_c, _, _, zs_c = ext.ce_rows_forward(z, target, None, 0.1, 4.0)
    r_lse, _, r_zs = oracle_forward(z, target, None, 0.1, 4.0)
    _close(lse_c, r_lse, atol=1e-5)
    _close(zs_c, r_zs, atol=1e-4)
    assert lse_c[4].isnan() and torch.isfinite(lse_c[[0, 1, 2, 3, 6]]).all()


def test_nonfinite_backward(ext, isa):
    V = 50
    z, target, w, a, b, c = _inputs(4, V, seed=4, weighted=True)
    z[0, 3] = float("nan")   # only that element's gradient is NaN
    z[1, 4] = float("-inf")  # p = 0 there
    z[2, 7] = float("inf")   # with lse = inf: exp(inf - inf) = NaN, like the reference
    for cap in (0.0, 5.0):
        lse, lse_lo, *_ = ext.ce_rows_forward(z, target, w, 0.0, cap)
        assert lse[0].isnan() and lse[1].isfinite() and (lse[2] == float("inf")) == (cap == 0)
        lse[0] = 3.0  # any finite value: the NaN must then stay in its own element
        zc = z.clone()
        dz = ext.ce_rows_backward_(zc, target, w, lse, lse_lo, a, b, c, cap)
        ref = oracle_backward(z, target, w, lse, lse_lo, a, b, c, cap)
        _close(dz, ref, atol=1e-5 * float((a.abs() + b.abs() + c.abs() * 2).max()))
        assert dz[0, 3].isnan() and torch.isfinite(dz[0, torch.arange(V) != 3]).all()
        # reference epilogue (the spec) gives the same NaN pattern
        from nckernels.reference.linear_cross_entropy import rows_backward_

        spec = rows_backward_(z.clone(), target, w, lse, lse_lo, a, b, c, cap)
        assert torch.equal(spec.isnan(), dz.isnan())


@pytest.mark.parametrize("top", [20.0, 1e3, 1e5])
def test_confident_rows_resolved_below_ulp_of_lse(ext, isa, top):
    """Rows with a large target logit and a loss near 0.03, far below ``ulp(lse)`` at 1e5: the loss
    ``(lse - z_y) + lse_lo`` and the gradient ``p - onehot`` match float64 to a relative 2e-5
    (``fl(lse) - z_y`` alone is off by up to ``ulp(lse) / 2``: 11% at 1e5)."""
    V = 777
    rows = torch.arange(5)
    z = top - 10.0 + 0.5 * torch.randn(5, V, generator=_gen(int(top)))
    target = torch.tensor([0, 5, 300, 776, 10])
    z[rows, target] = top
    lse, lse_lo, zt, _ = ext.ce_rows_forward(z, target, None, 0.0, 0.0)
    want = torch.logsumexp(z.double(), 1) - z.double()[rows, target]
    torch.testing.assert_close((lse - zt).double() + lse_lo.double(), want, rtol=2e-5, atol=0.0)
    ones = torch.ones(5)
    dz = ext.ce_rows_backward_(z.clone(), target, None, lse, lse_lo, ones, ones, torch.zeros(5), 0.0)
    want_dz = torch.softmax(z.double(), 1)
    want_dz[rows, target] -= 1.0
    torch.testing.assert_close(dz.double(), want_dz, rtol=2e-5, atol=1e-12)


def test_lse_nan_propagates_backward(ext):
    z, target, w, a, b, c = _inputs(2, 20, seed=5)
    lse = torch.tensor([float("nan"), 3.0])
    dz = ext.ce_rows_backward_(z, target, None, lse, torch.zeros(2), a, b, c, 0.0)
    assert dz[0].isnan().all() and torch.isfinite(dz[1]).all()


def test_threads_and_isas_agree(ext):
    """Rows are independent: the thread count changes nothing; ISAs agree to rounding."""
    z, target, w, a, b, c = _inputs(64, 3001, seed=6, weighted=True)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.ce_rows_forward(z, target, w, 0.1, 7.0)
        torch.set_num_threads(max(2, prev))
        many = ext.ce_rows_forward(z, target, w, 0.1, 7.0)
    finally:
        torch.set_num_threads(prev)
    for x, y in zip(one, many):
        assert torch.equal(x, y)
    outs = {}
    try:
        for name in ext.supported_cpu_isas():
            ext.set_cpu_isa(name)
            outs[name] = ext.ce_rows_forward(z, target, w, 0.1, 7.0)
    finally:
        ext.set_cpu_isa("auto")
    base = outs["generic"]
    for name, out in outs.items():
        for x, y in zip(out, base):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=2e-6 * max(1.0, float(y.abs().max())), msg=f"isa {name}")


def test_isa_selection(ext):
    names = ext.supported_cpu_isas()
    assert names[0] == "generic"
    assert ext.cpu_isa() in names
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        ext.set_cpu_isa("sse9")
    ext.set_cpu_isa("generic")
    assert ext.cpu_isa() == "generic"
    ext.set_cpu_isa("auto")
    assert ext.cpu_isa() == names[-1]


def _bad_calls():
    z = torch.randn(3, 10)
    t = torch.tensor([0, 1, 9])
    v = torch.ones(3)
    fwd = "ce_rows_forward"
    bwd = "ce_rows_backward_"
    return [
        ("z float64", TypeError, fwd, (z.double(), t, None, 0.0, 0.0)),
        ("z 1-D", ValueError, fwd, (z[0], t[:1], None, 0.0, 0.0)),
        ("z non-contiguous", ValueError, fwd, (torch.randn(3, 20)[:, ::2], t, None, 0.0, 0.0)),
        ("z no classes", ValueError, fwd, (torch.randn(3, 0), t, None, 0.0, 0.0)),
        ("target int32", TypeError, fwd, (z, t.int(), None, 0.0, 0.0)),
        ("target length", ValueError, fwd, (z, t[:2], None, 0.0, 0.0)),
        ("target too big", IndexError, fwd, (z, torch.tensor([0, 10, 1]), None, 0.0, 0.0)),
        ("target negative", IndexError, fwd, (z, torch.tensor([0, -1, 1]), None, 0.0, 0.0)),
        ("class_weight shape", ValueError, fwd, (z, t, torch.ones(9), 0.1, 0.0)),
        ("class_weight dtype", TypeError, fwd, (z, t, torch.ones(10, dtype=torch.float64), 0.1, 0.0)),
        ("softcap negative", ValueError, fwd, (z, t, None, 0.0, -1.0)),
        ("softcap nan", ValueError, fwd, (z, t, None, 0.0, float("nan"))),
        ("smoothing nan", ValueError, fwd, (z, t, None, float("nan"), 0.0)),
        ("lse shape", ValueError, bwd, (z, t, None, torch.ones(2), v, v, v, v, 0.0)),
        ("lse_lo shape", ValueError, bwd, (z, t, None, v, torch.ones(4), v, v, v, 0.0)),
        ("coef dtype", TypeError, bwd, (z, t, None, v, v, v.double(), v, v, 0.0)),
        ("coef non-contiguous", ValueError, bwd, (z, t, None, v, v, v, torch.ones(3, 2)[:, 0], v, 0.0)),
        ("bwd target range", IndexError, bwd, (z, torch.tensor([0, 1, 99]), None, v, v, v, v, v, 0.0)),
        ("bwd z dtype", TypeError, bwd, (z.half(), t, None, v, v, v, v, v, 0.0)),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_inputs_raise(ext, case):
    name, exc, fn, args = case
    with pytest.raises(exc, match=fn):
        getattr(ext, fn)(*args)


# ---------------------------------------------------------------- impl="cpp" end to end

E2E = [
    dict(),
    dict(softcap=20.0),
    dict(weight=True, label_smoothing=0.1),
    dict(weight=True, label_smoothing=0.2, z_loss=1e-3, softcap=10.0, bias=True),
    dict(z_loss=1e-2, bias=True, reduction="sum"),
    dict(label_smoothing=0.3, reduction="none", softcap=5.0),
]


@pytest.mark.parametrize("opts", E2E, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("chunk_mb", [None, 0.05], ids=["one-chunk", "many-chunks"])
def test_cpp_matches_reference(ext, monkeypatch, opts, chunk_mb):
    if chunk_mb is not None:
        monkeypatch.setenv("NCKERNELS_REFERENCE_CHUNK_MB", str(chunk_mb))
    opts = dict(opts)
    g = _gen(11)
    N, D, V = 96, 32, 1003
    x = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5 * 3
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -100  # ignored tokens
    kwargs = dict(reduction=opts.pop("reduction", "mean"), label_smoothing=opts.pop("label_smoothing", 0.0),
                  z_loss=opts.pop("z_loss", 0.0), softcap=opts.pop("softcap", None))
    if opts.pop("weight", False):
        kwargs["weight"] = torch.rand(V, generator=g) + 0.5
    bias = torch.randn(V, generator=g) if opts.pop("bias", False) else None
    assert not opts

    results = {}
    for impl in ("reference", "cpp"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        bi = bias.clone().requires_grad_() if bias is not None else None
        loss, lse = nckernels.linear_cross_entropy(xi, wi, y, linear_bias=bi, return_lse=True, impl=impl, **kwargs)
        grad_out = torch.randn(loss.shape, generator=_gen(12))
        (loss * grad_out).sum().backward()
        results[impl] = [loss.detach(), lse.detach(), xi.grad, wi.grad] + ([bi.grad] if bi is not None else [])
    names = ["loss", "lse", "dx", "dw", "db"]
    for name, got, want in zip(names, results["cpp"], results["reference"]):
        tol = 2e-5 * max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=2e-5, atol=tol, msg=lambda m: f"{name}: {m}")


def test_auto_on_cpu_follows_backend_table(ext, monkeypatch):
    """With the extension loaded, ``auto`` on CPU picks what backend.py's ``auto_cpu`` says."""
    from nckernels import backend

    monkeypatch.delenv("NCKERNELS_IMPL", raising=False)
    for op, spec in backend._OP_BACKENDS.items():
        assert backend.choose(op, "auto", torch.device("cpu")) == spec["auto_cpu"], op


# ---------------------------------------------------------------- without the extension

_NO_EXT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["nckernels._C"] = None   # the prebuilt extension cannot be imported
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        import torch
        import nckernels
        from nckernels import _ext, backend

        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 16, generator=g, requires_grad=True)
        w = torch.randn(50, 16, generator=g, requires_grad=True)
        y = torch.randint(0, 50, (8,), generator=g)
        loss = nckernels.linear_cross_entropy(x, w, y, impl="reference")
        loss.backward()
        expected = torch.nn.functional.cross_entropy(x.detach() @ w.detach().T, y)
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), (loss, expected)
        assert x.grad is not None and w.grad is not None
        auto1 = nckernels.linear_cross_entropy(x, w, y)          # auto -> reference
        auto2 = nckernels.linear_cross_entropy(x, w, y)
        assert torch.equal(auto1, loss) and torch.equal(auto2, loss)
        assert backend.choose("linear_cross_entropy", "auto", torch.device("cpu")) == "reference"
        assert _ext.get() is None and "nckernels._C" in _ext.error()
        try:
            nckernels.linear_cross_entropy(x, w, y, impl="cpp")
        except RuntimeError as e:
            assert "unavailable" in str(e), e
        else:
            raise SystemExit("impl='cpp' did not raise without the extension")
    print("WARNINGS", sum("C++ extension unavailable" in str(r.message) for r in rec))
    """
)


def test_package_works_without_extension():
    env = {k: v for k, v in os.environ.items() if k != "NCKERNELS_IMPL"}
    env["NCKERNELS_NO_JIT"] = "1"
    proc = subprocess.run([sys.executable, "-c", _NO_EXT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = int(proc.stdout.split("WARNINGS")[-1])
    assert count <= 1, proc.stdout + proc.stderr


_JIT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["nckernels._C"] = None   # force the JIT fallback
    import torch
    from nckernels import _ext
    mod = _ext.get()
    assert mod is not None, _ext.error()
    assert mod.__name__ == "nckernels_C", mod.__name__
    z = torch.randn(4, 300)
    t = torch.randint(0, 300, (4,))
    lse, lse_lo, zt, zs = mod.ce_rows_forward(z, t, None, 0.1, 0.0)
    assert torch.allclose(lse, torch.logsumexp(z, 1), atol=1e-5)
    print("JIT OK", mod.cpu_isa())
    """
)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NCKERNELS_TEST_JIT") != "1",
                    reason="compiles csrc/ (minutes); set NCKERNELS_TEST_JIT=1 to run")
def test_jit_fallback_builds(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NCKERNELS_NO_JIT"}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _JIT], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and "JIT OK" in proc.stdout, proc.stdout + proc.stderr
