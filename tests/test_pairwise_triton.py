"""``kernels.pairwise.pair_stats`` (Triton; the interpreter on CPU) against a float64 oracle.

The oracle builds the full ``K x K`` matrices in float64 from the inputs as the kernel sees them
(cast to fp32), with distances computed directly as ``||m_i - m_j||^2`` and ``||u_i - u_j||^2``
(no cancellation: exact duplicates give exactly 0), and reduces the upper triangle ``i < j``.
"""
from __future__ import annotations

import math

import pytest
import torch

from nckernels.kernels.pairwise import QUANTITIES, pair_stats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def oracle_values(means, variances, p):
    """Per quantity, the float64 values over the counted pairs ``i < j``."""
    m = means.to(torch.float32).double().cpu()
    v = variances.to(torch.float32).double().cpu()
    K = m.shape[0]
    iu = torch.triu_indices(K, K, offset=1)
    i, j = iu[0], iu[1]
    d2 = ((m[i] - m[j]) ** 2).sum(1)
    nrm = m.norm(dim=1)
    nz = (nrm[i] > 0) & (nrm[j] > 0)
    u = m / torch.where(nrm > 0, nrm, 1.0)[:, None]
    c = (u[i] * u[j]).sum(1)
    du2 = ((u[i] - u[j]) ** 2).sum(1)
    ok_d = d2 > 0
    cdnv = (v[i] + v[j])[ok_d] / (2 * d2[ok_d] ** p)
    cos = c[nz]
    ang = (cos + 1.0 / (K - 1)).abs() if K > 1 else cos
    ok_u = nz & (du2 > 0)
    lid = -0.5 * torch.log(du2[ok_u])
    return [cdnv, cos, ang, lid]


def moments(x):
    n = x.numel()
    if n == 0:
        return 0, 0.0, 0.0
    mean = x.mean().item()
    return n, mean, ((x - mean) ** 2).sum().item()


def check(out, values, tol=2e-4):
    assert out.shape == (4, 3) and out.dtype == torch.float64
    out = out.cpu()
    for q, (name, x) in enumerate(zip(QUANTITIES, values)):
        n, mean, m2 = moments(x)
        assert out[q, 0].item() == n, f"{name}: count {out[q, 0].item()} != {n}"
        if n == 0:
            assert out[q, 1].item() == 0 and out[q, 2].item() == 0, f"{name}: empty must give (0, 0, 0)"
            continue
        # error scale: the largest value; cosines (and |cos + 1/(K-1)|, which cancels) are O(1)
        scale = max(x.abs().max().item(), 0.0 if name == "cdnv" else 1.0)
        assert abs(out[q, 1].item() - mean) <= tol * scale, f"{name}: mean {out[q, 1].item()} != {mean}"
        std, std_o = math.sqrt(max(out[q, 2].item(), 0.0) / n), math.sqrt(m2 / n)
        assert abs(std - std_o) <= tol * scale, f"{name}: std {std} != {std_o}"


def centred_means(K, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(K, D, generator=g, dtype=torch.float64) * 3
    m -= m.mean(0)
    v = torch.rand(K, generator=g, dtype=torch.float64) * 2 + 0.1
    return m.to(DEVICE, dtype), v.to(DEVICE, torch.float32)


@pytest.mark.parametrize("K", [0, 1])
def test_fewer_than_two_classes(K):
    m, v = centred_means(K, 8)
    out = pair_stats(m, v, 1)
    assert torch.equal(out.cpu(), torch.zeros(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("K,D", [(2, 16), (33, 20), (70, 48), (130, 17)])
def test_random_means(K, D, p, dtype):
    m, v = centred_means(K, D, seed=K + D, dtype=dtype)
    check(pair_stats(m, v, p), oracle_values(m, v, p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicates_zero_norm_and_parallel_means(dtype):
    """Duplicates drop out of cdnv and log_inv_dist (not of cos), a zero mean out of cos,
    max_angle and log_inv_dist (not of cdnv), a 2x-scaled copy (same direction) out of
    log_inv_dist only -- also across tiles."""
    K, D = 75, 24
    m, v = centred_means(K, D, seed=3, dtype=torch.float32)
    m[40] = m[3]  # duplicates in different tiles
    m[5] = m[3]  # and in the same tile
    m[70] = m[71]
    m[10] = 0.0
    m[50] = 2 * m[20]
    m = m.to(dtype)
    out = pair_stats(m, v, 2)
    vals = oracle_values(m, v, 2)
    P = K * (K - 1) // 2
    assert len(vals[0]) == P - 4  # 3 pairs among {3, 5, 40} + (70, 71)
    assert len(vals[1]) == P - (K - 1)
    assert len(vals[3]) == P - (K - 1) - 5
    check(out, vals)


def test_near_duplicates_are_resolved():
    """Means 1e-4 apart relative to their norm: the Gram form would lose every digit of d2 in
    fp32; the kernel recomputes such pairs directly."""
    K, D = 40, 32
    m, v = centred_means(K, D, seed=5)
    g = torch.Generator().manual_seed(6)
    m[7] = m[30] + 1e-4 * torch.randn(D, generator=g).to(DEVICE)
    m[8] = m[9] * (1 + 2e-4) + 1e-4 * torch.randn(D, generator=g).to(DEVICE)
    for p in (1, 2):
        vals = oracle_values(m, v, p)
        check(pair_stats(m, v, p), vals, tol=1e-3)


@pytest.mark.parametrize("K,D", [(10, 12), (45, 48)])
def test_simplex_etf(K, D):
    """A simplex ETF: every cosine is -1/(K-1), every |cos + 1/(K-1)| is 0, every distance equal."""
    etf = (torch.eye(K, dtype=torch.float64) - 1.0 / K) * math.sqrt(K / (K - 1))
    q, _ = torch.linalg.qr(torch.randn(D, K, generator=torch.Generator().manual_seed(K), dtype=torch.float64))
    m = (etf @ q.T * 5).to(DEVICE, torch.float32)  # rotated into R^D, norms 5
    v = torch.ones(K, device=DEVICE)
    out = pair_stats(m, v, 1).cpu()
    P = K * (K - 1) // 2
    assert out[:, 0].tolist() == [P] * 4
    assert abs(out[1, 1].item() + 1 / (K - 1)) < 1e-6
    assert math.sqrt(out[1, 2].item() / P) < 1e-6  # cos std
    assert out[2, 1].item() < 1e-6  # max_angle mean
    # every squared distance is 2 * 25 * K / (K - 1)
    assert abs(out[0, 1].item() - 2 / (2 * 50 * K / (K - 1))) < 1e-5
    check(out, oracle_values(m, v, 1))


def test_small_blocks_many_tiles(monkeypatch):
    """16 x 16 tiles: 13 x 13 tile grid (two L2 groups), ragged last tile, odd D."""
    monkeypatch.setenv("NCKERNELS_PAIR_TILES", "16,8,4,1")
    m, v = centred_means(200, 13, seed=11)
    m[150] = m[2]
    check(pair_stats(m, v, 1), oracle_values(m, v, 1))


def test_strided_means_and_fp64_variances():
    m, v = centred_means(50, 30, seed=12)
    wide = torch.zeros(50, 60, device=DEVICE)
    wide[:, ::2] = m
    check(pair_stats(wide[:, ::2], v.double(), 1), oracle_values(m, v, 1))


def test_bad_arguments():
    m, v = centred_means(5, 4)
    with pytest.raises(ValueError, match="cdnv_power"):
        pair_stats(m, v, 3)
    with pytest.raises(ValueError, match="variances"):
        pair_stats(m, v[:4], 1)
