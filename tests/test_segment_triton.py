"""Triton per-class statistics (``nckernels.kernels.segment.segment_stats``) against a float64 oracle.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set by conftest before triton is imported); the interpreter is slow, so the shapes are small
and ``chunk`` is shrunk to 4 or 8 to reach the multi-chunk (Chan merge) path with few rows. The
oracle loops over classes in torch float64 on the same (upcast) features, so results agree to
fp64 rounding: rtol 1e-10 against the largest |value| of the oracle tensor, and 1e-9 relative
per class for ``m2`` in the ``||mean||^2 / variance = 1e6`` trap.
"""
from __future__ import annotations

import pytest
import torch

from nckernels.kernels.segment import segment_stats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def oracle(h, y, C, ignore_index):
    """``(counts, sums, m2)`` by a per-class loop in float64 (two-pass M2 about the class mean)."""
    h = h.double().cpu()
    y = y.cpu()
    counts = torch.zeros(C, dtype=torch.int64)
    sums = torch.zeros(C, h.shape[1], dtype=torch.float64)
    m2 = torch.zeros(C, dtype=torch.float64)
    for c in range(C):
        if c == ignore_index:
            continue
        rows = h[y == c]
        if len(rows) == 0:
            continue
        counts[c] = len(rows)
        sums[c] = rows.sum(0)
        m2[c] = ((rows - sums[c] / len(rows)) ** 2).sum()
    return counts, sums, m2


def check(h, y, C, ignore_index=-100, chunk=8, rtol=1e-10):
    counts, sums, m2 = segment_stats(h, y, C, ignore_index, chunk=chunk)
    assert counts.dtype == torch.int64 and counts.shape == (C,)
    assert sums.dtype == torch.float64 and sums.shape == (C, h.shape[1])
    assert m2.dtype == torch.float64 and m2.shape == (C,)
    ref_counts, ref_sums, ref_m2 = oracle(h, y, C, ignore_index)
    counts, sums, m2 = counts.cpu(), sums.cpu(), m2.cpu()
    assert torch.equal(counts, ref_counts)
    empty = ref_counts == 0
    assert (sums[empty] == 0).all() and (m2[empty] == 0).all()  # exactly 0, not merely small
    for got, ref in ((sums, ref_sums), (m2, ref_m2)):
        if ref.numel():
            assert (got - ref).abs().max().item() <= rtol * ref.abs().max().item()
    return counts, sums, m2


def features(N, D, dtype=torch.float32, mean=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g) * 2 + mean).to(dtype).to(DEVICE)


def sized_labels(sizes, ignored=0, seed=0):
    """Labels with ``sizes[c]`` rows of class ``c`` plus ``ignored`` rows of -100, shuffled."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)] + [torch.full((ignored,), -100)])
    g = torch.Generator().manual_seed(seed)
    return y[torch.randperm(len(y), generator=g)].to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_dtypes(dtype):
    # one empty class, singletons, sizes around chunk = 8 (7, 8, 9, 29 = 3 * 8 + 5), ignored rows;
    # D = 37 spans two column blocks in the interpreter (32) and is no multiple of a block
    sizes = [7, 0, 1, 8, 9, 2, 29, 1, 3]
    check(features(sum(sizes) + 6, 37, dtype, mean=1.0), sized_labels(sizes, ignored=6), len(sizes))


def test_chunk_boundaries_small_chunk():
    # chunk = 4: class sizes chunk - 1, chunk, chunk + 1, 3 chunk + 5, 1, and a long class (40)
    sizes = [3, 4, 5, 17, 1, 40, 0]
    check(features(sum(sizes), 6), sized_labels(sizes), len(sizes), chunk=4)


def test_default_chunk_zipf():
    # Zipf(1.1) labels over 80 classes (classes 0 and 1 take ~25 % and ~12 % of the 300 rows:
    # several chunks of the default 32 rows each); some rows ignored; D = 24
    g = torch.Generator().manual_seed(1)
    C = 80
    p = torch.arange(1, C + 1, dtype=torch.float64) ** -1.1
    y = torch.multinomial(p / p.sum(), 300, replacement=True, generator=g)
    y[torch.rand(300, generator=g) < 0.05] = -100
    counts, _, _ = check(features(300, 24, seed=1), y.to(DEVICE), C, chunk=32)
    assert counts.max() > 32  # the merge path ran


def test_n0_n1_d1():
    for N, D in ((0, 5), (1, 5), (1, 1)):
        check(features(N, D), torch.zeros(N, dtype=torch.int64, device=DEVICE), 3)
    # D = 1 with merges
    check(features(30, 1, mean=3.0), sized_labels([13, 0, 9, 8]), 4, chunk=4)


def test_all_ignored_and_other_ignore_index():
    h = features(12, 5)
    counts, sums, m2 = check(h, torch.full((12,), -100, device=DEVICE), 4)
    assert counts.sum() == 0 and not sums.any() and not m2.any()
    # ignore_index -1, and an ignore_index inside [0, C) (that class stays empty)
    y = sized_labels([5, 6, 1, 4])
    y[:3] = -1
    check(features(16, 5), y, 4, ignore_index=-1, chunk=4)
    check(features(16, 5), sized_labels([5, 6, 1, 4]), 4, ignore_index=1, chunk=4)


@pytest.mark.parametrize("ratio, rtol", [(1e6, 1e-12), (1e12, 1e-9)])
def test_mean_to_variance_trap(ratio, rtol):
    # class means with ||mean||^2 / variance = ratio (|mean| = sqrt(ratio) per coordinate, sd 1),
    # fp32 features, sizes 2, 7, 8, 9, 29 with chunk = 8 (merges). Measured in the interpreter:
    # relative m2 error 5e-15 (1e6) and 6e-12 (1e12); the one-pass formula sum ||h||^2 - ||S||^2 / n,
    # even in fp64, is off by 3e-10 and 3e-4 (checked below: the trap is a trap at these rtols)
    sizes = [2, 7, 8, 9, 29]
    N, D = sum(sizes), 8
    g = torch.Generator().manual_seed(3)
    y = sized_labels(sizes, seed=3)
    mu = (torch.randn(len(sizes), D, generator=g).sign() * ratio ** 0.5).to(DEVICE)
    h = (mu[y] + torch.randn(N, D, generator=g).to(DEVICE)).float()
    _, _, m2 = check(h, y, len(sizes))
    ref_counts, ref_sums, ref_m2 = oracle(h, y, len(sizes), -100)
    assert (ref_m2 > 0).all()
    assert ((m2.cpu() - ref_m2).abs() <= rtol * ref_m2).all()
    hd, yc = h.double().cpu(), y.cpu()
    sq = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, yc, (hd * hd).sum(1))
    naive = sq - (ref_sums * ref_sums).sum(1) / ref_counts
    assert ((naive - ref_m2).abs() > rtol * ref_m2).any()


def test_noncontiguous_features():
    sizes = [6, 0, 11, 1, 3]
    N, D = sum(sizes), 19
    y = sized_labels(sizes)
    base = features(D, N, seed=4)
    check(base.t(), y, len(sizes), chunk=4)  # transposed view: stride (1, N)
    wide = features(2 * N, D + 3, seed=5)
    check(wide[::2, 1:D + 1], y, len(sizes), chunk=4)  # row stride 2 (D + 3), column offset 1


def test_deterministic():
    y = sized_labels([20, 3, 1, 9])
    h = features(33, 7)
    a = segment_stats(h, y, 4, -100, chunk=4)
    b = segment_stats(h, y, 4, -100, chunk=4)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_bad_chunk():
    with pytest.raises(ValueError, match="chunk"):
        segment_stats(features(4, 2), torch.zeros(4, dtype=torch.int64, device=DEVICE), 2, -100, chunk=6)
