"""The C++ per-class statistics kernel of ``csrc/class_stats_cpu.cpp`` against a float64 oracle.

``class_stats_cpu(features, labels, num_classes, ignore_index) -> (counts, sums, m2)`` is checked
directly (``nckernels/reference/segment.py`` is its spec) against a per-class float64 computation
written here (one class at a time, two passes: no ``index_add_``), on fresh random inputs, for
every instruction set the CPU supports: every feature dtype, empty / single-row / all-ignored
batches, class sizes around the kernel's chunk size (so that chunks are merged), Zipf labels,
a mean/spread ratio that defeats sum-of-squares formulas, every finite fp16 / bf16 value, and
bad arguments. The module skips when the extension is unavailable.
"""
from __future__ import annotations

import pytest
import torch

from nckernels import _ext

_mod = _ext.get()
pytestmark = pytest.mark.skipif(_mod is None, reason=f"C++ extension unavailable: {_ext.error()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _isas():
    return _mod.supported_cpu_isas() if _mod is not None else ["generic"]


@pytest.fixture(params=_isas())
def ext(request):
    _mod.set_cpu_isa(request.param)
    yield _mod
    _mod.set_cpu_isa("auto")


def _oracle(features, labels, num_classes, ignore_index):
    """float64, one class at a time: count, sum, then the squared residuals about the class mean."""
    h = features.double()
    D = h.shape[1]
    counts = torch.zeros(num_classes, dtype=torch.int64)
    sums = torch.zeros(num_classes, D, dtype=torch.float64)
    m2 = torch.zeros(num_classes, dtype=torch.float64)
    keep = labels != ignore_index
    h, y = h[keep], labels[keep]
    order = torch.sort(y, stable=True).indices
    h, y = h[order], y[order]
    classes, sizes = torch.unique_consecutive(y, return_counts=True)
    for c, rows in zip(classes.tolist(), torch.split(h, sizes.tolist())):
        n = rows.shape[0]
        counts[c] = n
        sums[c] = rows.sum(0)
        m2[c] = (rows - sums[c] / n).square().sum()
    return counts, sums, m2


def _check(got, want, features, rtol=1e-11):
    counts, sums, m2 = got
    w_counts, w_sums, w_m2 = want
    C, D = w_sums.shape
    assert counts.dtype == torch.int64 and counts.shape == (C,)
    assert sums.dtype == torch.float64 and sums.shape == (C, D)
    assert m2.dtype == torch.float64 and m2.shape == (C,)
    assert torch.equal(counts, w_counts)
    # sums: summation order differs; bound the error by the class's sum of |h|
    scale = features.double().abs().max().item() if features.numel() else 0.0
    torch.testing.assert_close(sums, w_sums, rtol=rtol, atol=rtol * scale * max([1] + w_counts.tolist()))
    torch.testing.assert_close(m2, w_m2, rtol=rtol, atol=1e-300)
    # empty classes: exactly zero
    empty = w_counts == 0
    assert bool((sums[empty] == 0).all()) and bool((m2[empty] == 0).all())


def _features(N, D, dtype, gen, scale=1.0, shift=0.0):
    return (torch.randn(N, D, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("N,D,C", [(0, 5, 3), (1, 1, 1), (1, 9, 4), (7, 1, 3), (50, 13, 6), (300, 37, 9),
                                   (200, 17, 400), (40, 0, 5)])
def test_matches_float64(ext, dtype, N, D, C):
    gen = torch.Generator().manual_seed(N * 131 + D * 7 + C)
    x = _features(N, D, dtype, gen, scale=3.0, shift=0.5)
    y = torch.randint(0, C, (N,), generator=gen)
    if N > 4:
        y[::5] = -100
    x0, y0 = x.clone(), y.clone()
    got = ext.class_stats_cpu(x, y, C, -100)
    _check(got, _oracle(x, y, C, -100), x)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched


def test_empty_and_single_row_classes(ext):
    gen = torch.Generator().manual_seed(1)
    C, D = 20, 11
    y = torch.tensor([3, 3, 3, 7, 12, 12, 19, 0])  # 7, 19, 0: one row each; most classes empty
    x = _features(len(y), D, torch.float32, gen)
    counts, sums, m2 = ext.class_stats_cpu(x, y, C, -100)
    _check((counts, sums, m2), _oracle(x, y, C, -100), x)
    for c in (7, 19, 0):
        assert m2[c].item() == 0.0
        assert torch.equal(sums[c], x[y == c][0].double())
    empty = torch.ones(C, dtype=torch.bool)
    empty[y] = False
    assert torch.equal(sums[empty], torch.zeros(int(empty.sum()), D, dtype=torch.float64))
    assert torch.equal(m2[empty], torch.zeros(int(empty.sum()), dtype=torch.float64))


@pytest.mark.parametrize("ignore_index", [-100, -1, 4, 2**40])
def test_ignore_index(ext, ignore_index):
    gen = torch.Generator().manual_seed(2)
    C, N, D = 6, 90, 10
    x = _features(N, D, torch.float32, gen)
    y = torch.randint(0, C, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < 0.3] = ignore_index
    got = ext.class_stats_cpu(x, y, C, ignore_index)
    _check(got, _oracle(x, y, C, ignore_index), x)
    if 0 <= ignore_index < C:  # a class index used as ignore_index: that class stays empty
        assert got[0][ignore_index].item() == 0
    # all rows ignored
    y_all = torch.full((N,), ignore_index, dtype=torch.int64)
    counts, sums, m2 = ext.class_stats_cpu(x, y_all, C, ignore_index)
    assert torch.equal(counts, torch.zeros(C, dtype=torch.int64))
    assert torch.equal(sums, torch.zeros(C, D, dtype=torch.float64))
    assert torch.equal(m2, torch.zeros(C, dtype=torch.float64))


def test_zero_classes(ext):
    x = torch.randn(3, 4)
    counts, sums, m2 = ext.class_stats_cpu(x, torch.full((3,), -100), 0, -100)
    assert counts.shape == (0,) and sums.shape == (0, 4) and m2.shape == (0,)
    counts, sums, m2 = ext.class_stats_cpu(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64), 0, -100)
    assert counts.shape == (0,) and sums.shape == (0, 4) and m2.shape == (0,)


def _sized_labels(sizes, gen, extra_ignored=0):
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)]
                  + [torch.full((extra_ignored,), -100, dtype=torch.int64)])
    return y[torch.randperm(len(y), generator=gen)]


@pytest.mark.parametrize("D,dtype", [(8, torch.float32), (8, torch.float64), (700, torch.float32),
                                     (300, torch.bfloat16)], ids=["D8-float32", "D8-float64", "D700-float32",
                                                                  "D300-bfloat16"])
def test_chunk_boundaries(ext, D, dtype):
    """Classes of K - 1, K, K + 1 and 3 K + 5 rows for the kernel's chunk size K (K + 1 and more
    are split into chunks and merged), next to small and empty classes."""
    K = ext.class_stats_chunk_rows(D, torch.empty(0, dtype=dtype).element_size())
    assert 16 <= K <= 256
    gen = torch.Generator().manual_seed(D + K)
    sizes = [K - 1, 0, K, 1, K + 1, 3 * K + 5, 2, 2 * K]
    y = _sized_labels(sizes, gen, extra_ignored=7)
    x = _features(len(y), D, dtype, gen, scale=2.0, shift=-1.0)
    got = ext.class_stats_cpu(x, y, len(sizes) + 1, -100)
    _check(got, _oracle(x, y, len(sizes) + 1, -100), x)


def test_chunk_rows_formula(ext):
    # 256 rows, halved while a chunk takes more than 256 KiB, at least 16
    assert ext.class_stats_chunk_rows(256, 4) == 256
    assert ext.class_stats_chunk_rows(256, 8) == 128
    assert ext.class_stats_chunk_rows(700, 4) == 64
    assert ext.class_stats_chunk_rows(10**6, 2) == 16
    assert ext.class_stats_chunk_rows(0, 4) == 256


def _zipf_labels(N, C, gen):
    p = 1.0 / torch.arange(1, C + 1, dtype=torch.float64)
    y = torch.multinomial(p / p.sum(), N, replacement=True, generator=gen)
    return torch.randperm(C, generator=gen)[y]  # the frequent classes anywhere in [0, C)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_zipf_labels(ext, dtype):
    gen = torch.Generator().manual_seed(3)
    N, D, C = 6000, 19, 400
    y = _zipf_labels(N, C, gen)
    counts = torch.bincount(y, minlength=C)
    assert counts.max().item() > 0.1 * N and counts.max().item() > 2 * 256  # one class gets chunked
    x = _features(N, D, dtype, gen, scale=1.5, shift=0.25)
    _check(ext.class_stats_cpu(x, y, C, -100), _oracle(x, y, C, -100), x)


def test_independent_of_thread_count(ext):
    gen = torch.Generator().manual_seed(4)
    N, D, C = 8000, 33, 500
    y = _zipf_labels(N, C, gen)
    x = _features(N, D, torch.float32, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.class_stats_cpu(x, y, C, -100)
    finally:
        torch.set_num_threads(threads)
    many = ext.class_stats_cpu(x, y, C, -100)
    for a, b in zip(one, many):
        assert torch.equal(a, b)  # fixed chunks and summation order: bitwise identical


@pytest.mark.parametrize("dtype,shift,spread", [(torch.float32, 1000.0, 1.0),   # ||mean||^2 / var = 1e6
                                                (torch.float64, 1e5, 0.1)])     # 1e12
def test_large_mean_small_spread(ext, dtype, shift, spread):
    """m2 must be a residual sum (two passes / exact merge), not sum of squares minus square of sum:
    with ||mean_c||^2 / variance = 1e6 (and 1e12) that formula loses 6 (12) digits in double."""
    gen = torch.Generator().manual_seed(5)
    K = ext.class_stats_chunk_rows(16, torch.empty(0, dtype=dtype).element_size())
    sizes = [2, 5, K, K + 1, 3 * K + 5]
    y = _sized_labels(sizes, gen)
    D = 16
    direction = torch.randn(D, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm() * shift * D**0.5  # ||mean||^2 = shift^2 D
    x = (direction + spread * torch.randn(len(y), D, generator=gen, dtype=torch.float64)).to(dtype)
    counts, sums, m2 = ext.class_stats_cpu(x, y, len(sizes), -100)
    w_counts, w_sums, w_m2 = _oracle(x, y, len(sizes), -100)
    assert torch.equal(counts, w_counts)
    rel = ((m2 - w_m2).abs() / w_m2).max().item()
    assert rel < 1e-9, f"m2 relative error {rel:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_value(ext, dtype):
    """Every finite, infinite and NaN fp16 / bf16 bit pattern, one class each: sums = the value, exactly."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)[:, None]
    C = x.shape[0]
    y = torch.arange(C)
    counts, sums, m2 = ext.class_stats_cpu(x, y, C, -100)
    assert torch.equal(counts, torch.ones(C, dtype=torch.int64))
    torch.testing.assert_close(sums, x.double(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(m2, torch.zeros(C, dtype=torch.float64))
    # and pairs of values in one class: m2 = (a - m)^2 + (b - m)^2, m = (a + b) / 2
    finite = x[:, 0].double().isfinite()
    xf = x[finite][torch.randperm(int(finite.sum()), generator=torch.Generator().manual_seed(6))]
    n = xf.shape[0] // 2 * 2
    xf = xf[:n]
    counts, sums, m2 = ext.class_stats_cpu(xf, torch.arange(n) // 2, n // 2, -100)
    a, b = xf[0::2, 0].double(), xf[1::2, 0].double()
    mean = (a + b) / 2
    assert torch.equal(counts, torch.full((n // 2,), 2, dtype=torch.int64))
    assert torch.equal(sums[:, 0], a + b)  # both round a + b once, in double
    torch.testing.assert_close(m2, (a - mean).square() + (b - mean).square(), rtol=1e-15, atol=0)


def test_nan_and_inf_stay_in_their_class(ext):
    x = torch.randn(6, 3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x[0, 1] = float("nan")
    x[2, 2] = float("inf")
    counts, sums, m2 = ext.class_stats_cpu(x, y, 3, -100)
    assert sums[0, 1].isnan() and m2[0].isnan()
    assert sums[1, 2].item() == float("inf") and m2[1].isnan()  # inf - inf in the residual
    assert bool(sums[2].isfinite().all()) and bool(m2[2].isfinite())
    assert bool(sums[0, [0, 2]].isfinite().all()) and bool(sums[1, :2].isfinite().all())


def test_bad_arguments(ext):
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    f = ext.class_stats_cpu
    with pytest.raises(TypeError, match="labels"):
        f(x, y.int(), 3, -100)
    with pytest.raises(ValueError, match="labels"):
        f(x, y[:4], 3, -100)
    with pytest.raises(ValueError, match="labels"):
        f(x, torch.zeros(10, dtype=torch.int64)[::2], 3, -100)  # not contiguous
    with pytest.raises(ValueError, match="features"):
        f(x[:, 0].contiguous(), y, 3, -100)  # 1-D
    with pytest.raises(ValueError, match="features"):
        f(torch.randn(5, 2, 3), y, 3, -100)
    with pytest.raises(ValueError, match="features.*contiguous"):
        f(torch.randn(3, 5).t(), y, 3, -100)
    with pytest.raises(TypeError, match="features"):
        f(x.int(), y, 3, -100)
    with pytest.raises(ValueError, match="features.*CPU"):
        f(torch.empty(5, 3, device="meta"), y, 3, -100)
    with pytest.raises(ValueError, match="num_classes"):
        f(x, y, -1, -100)
    with pytest.raises(IndexError, match=r"labels\[2\] = 2 is outside \[0, 2\)"):
        f(x, y, 2, -100)
    with pytest.raises(IndexError, match=r"labels\[1\] = -1"):
        f(x, torch.tensor([0, -1, 2, 1, 0]), 3, -100)
    with pytest.raises(IndexError, match="labels"):
        f(x, torch.tensor([0, 1, 2, 1, -100]), 3, -1)  # -100 is not ignore_index here
