"""nckernels.collapse.metrics against closed forms (designed mixtures, a simplex ETF) and the float64 oracle."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import oracle_collapse as oracle
from nckernels.collapse import ClassStats, NC4Agreement, compute, nc4_predictions

KEYS = ("nc1_pinv", "nc1_quotient", "cdnv", "equinorm_means", "equiangularity", "max_angle", "gnc2_mean",
        "gnc2_var")
W_KEYS = ("equinorm_weights", "nc3_duality", "nc3_mean_cos", "unc3")


def _pair_impl(backend):
    if backend.impl == "cpp":
        pytest.skip("no C++ backend for pair statistics / argmax")
    return backend.impl


def _stats(h, y, C, **kw):
    return ClassStats(C, h.shape[-1], track_within_cov=True, impl="reference", **kw).update(h, y)


def _designed_mixture(K=6, D=4, seed=0):
    """Rows mu_c +- sigma_c sqrt(D) e_k: sample means are exactly mu_c, tr Sigma_c exactly sigma_c^2 D."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, D, generator=g, dtype=torch.float64) * 3
    sigma = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    eye = torch.eye(D, dtype=torch.float64) * D ** 0.5
    rows, labels = [], []
    for c in range(K):
        rows += [mu[c] + sigma[c] * eye, mu[c] - sigma[c] * eye]
        labels.append(torch.full((2 * D,), c))
    return torch.cat(rows), torch.cat(labels), mu, sigma


def test_designed_mixture_closed_forms(backend):
    impl = _pair_impl(backend)
    K, D = 6, 4
    h, y, mu, sigma = _designed_mixture(K, D)
    out = compute(_stats(h, y, K), impl=impl)
    v = sigma ** 2 * D
    pairs = list(itertools.combinations(range(K), 2))
    for p in (1, 2):
        cdnv = sum(float((v[i] + v[j]) / (2 * ((mu[i] - mu[j]) ** 2).sum() ** p)) for i, j in pairs) / len(pairs)
        got = compute(_stats(h, y, K), cdnv_power=p, impl=impl)["cdnv"]
        assert got == pytest.approx(cdnv, rel=1e-5 if impl == "triton" else 1e-12)
    m = mu - mu.mean(0)
    assert out["nc1_quotient"] == pytest.approx(float(v.mean() / (m ** 2).sum(1).mean()), rel=1e-12)
    sigma_b = m.T @ m / K  # Sigma_W = mean(sigma^2) I by construction
    assert out["nc1_pinv"] == pytest.approx(float((sigma ** 2).mean() * torch.linalg.pinv(sigma_b).trace() / K),
                                            rel=1e-9)


def _etf(K, D, scale):
    e = torch.eye(K, dtype=torch.float64) - 1.0 / K
    e = e * math.sqrt(K / (K - 1))  # unit rows, pairwise cos -1/(K-1)
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    return scale * e @ q[:K]


def test_simplex_etf_is_exactly_collapsed(backend):
    impl = _pair_impl(backend)
    K, D = 5, 7
    means = _etf(K, D, 3.0)
    h = means.repeat_interleave(3, 0)  # zero within-class variability
    y = torch.arange(K).repeat_interleave(3)
    out = compute(_stats(h, y, K), weight=0.5 * means, impl=impl)
    tol = 1e-5 if impl == "triton" else 1e-12
    for key in ("nc1_pinv", "nc1_quotient", "cdnv", "equinorm_means", "equinorm_weights", "nc3_duality", "unc3",
                "equiangularity", "max_angle", "gnc2_var"):
        assert abs(out[key]) <= tol, (key, out[key])
    assert out["nc3_mean_cos"] == pytest.approx(1.0, abs=tol)
    assert out["gnc2_mean"] == pytest.approx(-0.5 * math.log(2 * K / (K - 1)), abs=tol)


@pytest.mark.parametrize("global_mean, unbiased, min_count, cdnv_power", [
    ("class_means", False, 1, 1), ("sample", False, 1, 2), ("class_means", True, 1, 1), ("sample", True, 4, 1),
    ("class_means", False, 6, 2),
])
def test_metrics_match_oracle(global_mean, unbiased, min_count, cdnv_power):
    g = torch.Generator().manual_seed(7)
    C, D, n = 12, 6, 400
    p = 1.0 / torch.arange(1, C + 1) ** 1.2
    y = torch.multinomial(p, n, replacement=True, generator=g)
    y[:3] = -100
    y[y == 5] = 4  # class 5 never seen
    h = torch.randn(n, D, generator=g) + 2 * torch.randn(C, D, generator=g)[y.clamp(min=0)]
    w = torch.randn(C, D, generator=g)
    conv = dict(global_mean=global_mean, unbiased=unbiased, min_count=min_count, cdnv_power=cdnv_power)
    out = compute(_stats(h, y, C), weight=w, impl="reference", **conv)
    ref = oracle.metrics(h[y >= 0], y[y >= 0], C, w, **conv)
    for key in KEYS + W_KEYS:
        assert out[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    keep = (torch.bincount(y[y >= 0], minlength=C) >= max(min_count, 2 if unbiased else 1))
    assert out["conventions"]["classes"] == int(keep.sum()) == out["classes"]


def test_pair_metrics_backends_agree(backend):
    """The pair reductions of every backend against the float64 oracle (fp32 kernels: 1e-5)."""
    impl = _pair_impl(backend)
    g = torch.Generator().manual_seed(8)
    C, D = 23, 5
    y = torch.randint(0, C, (300,), generator=g)
    h = torch.randn(300, D, generator=g) + 3 * torch.randn(C, D, generator=g)[y]
    out = compute(_stats(h, y, C), impl=impl)
    ref = oracle.metrics(h, y, C)
    for key in ("cdnv", "equiangularity", "max_angle", "gnc2_mean", "gnc2_var"):
        assert out[key] == pytest.approx(ref[key], rel=1e-4 if impl == "triton" else 1e-10), key


def test_bands_restrict_pairs_to_the_band():
    g = torch.Generator().manual_seed(2)
    C, D = 10, 4
    y = torch.cat([torch.full((c + 1,) if c < 5 else (20 + c,), c) for c in range(C)])
    h = torch.randn(len(y), D, generator=g) + 2 * torch.randn(C, D, generator=g)[y]
    out = compute(_stats(h, y, C), bands=[1, 5, 20], impl="reference")
    lo, mid, hi = out["bands"]
    assert (lo["classes"], mid["classes"], hi["classes"]) == (4, 1, 5)
    assert lo["tokens"] == 1 + 2 + 3 + 4 and hi["tokens"] == sum(20 + c for c in range(5, 10))
    sel = y >= 5
    assert hi["cdnv"] == pytest.approx(oracle.metrics(h[sel], y[sel], C)["cdnv"], rel=1e-10)
    assert math.isnan(mid["cdnv"])  # one class: no pair
    with pytest.raises(ValueError, match="bands"):
        compute(_stats(h, y, C), bands=[5, 1])


def test_compute_bad_input():
    h, y = torch.randn(10, 3), torch.arange(10) % 4
    stats = _stats(h, y, 4)
    with pytest.raises(ValueError, match="cdnv_power"):
        compute(stats, cdnv_power=3)
    with pytest.raises(ValueError, match="global_mean"):
        compute(stats, global_mean="median")
    with pytest.raises(ValueError, match="weight"):
        compute(stats, weight=torch.randn(4, 5))
    with pytest.raises(ValueError, match="at least 2 classes"):
        compute(stats, min_count=4)
    with pytest.raises(TypeError, match="stats"):
        compute({"counts": 1})


# ----------------------------------------------------------------------------- NC4


def _nc4_data(N, C, D, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g) * 4
    w = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    h = means[y] + torch.randn(N, D, generator=g)
    return h, y, means, w


def test_nc4_predictions_match_oracle(backend):
    impl = _pair_impl(backend)
    N, C, D = (40, 19, 8) if backend.interpreted else (300, 70, 16)
    h, y, means, w = _nc4_data(N, C, D, seed=1)
    bias = torch.randn(C)
    means[3] = float("nan")  # a class never seen in training: never an NCC candidate
    mask = torch.ones(C, dtype=torch.bool)
    mask[[0, 7]] = False
    linear, ncc = nc4_predictions(h, means, w, bias, class_mask=mask, impl=impl)
    ref_linear, ref_ncc = oracle.nc4_predictions(h, means, w, bias, class_mask=mask)
    # fp32 products can only flip near-ties: require agreement wherever the oracle's margin is clear
    logits = h.double() @ w.double().T + bias.double()
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.float().mean() > 0.9 and torch.equal(linear[clear], ref_linear[clear])
    assert torch.equal(ncc, ref_ncc)
    assert not ((ncc == 3) | (ncc == 0) | (ncc == 7)).any()
    assert linear.dtype == ncc.dtype == torch.int64


def test_nc4_agreement_per_class_and_min_count():
    C, D = 9, 6
    h, y, means, w = _nc4_data(500, C, D, seed=4)
    y[y == 2] = 1  # class 2 unseen in training
    y[:5] = 8
    stats = _stats(h, y, C)
    held_h, held_y, _, _ = _nc4_data(120, C, D, seed=5)
    held_y[:4] = -100
    nc4 = NC4Agreement(stats, w, min_count=6).update(held_h[:70], held_y[:70]).update(held_h[70:], held_y[70:])
    valid = held_y >= 0
    counts = torch.bincount(y, minlength=C)
    ref_linear, ref_ncc = oracle.nc4_predictions(held_h[valid], stats.means, w, class_mask=counts >= 6)
    hit = (ref_linear == ref_ncc).double()
    assert nc4.tokens == int(valid.sum())
    assert nc4.agreement == pytest.approx(float(hit.mean()), abs=1e-12)
    per = torch.zeros(C, dtype=torch.float64).index_add_(0, held_y[valid], hit)
    seen = torch.bincount(held_y[valid], minlength=C)
    torch.testing.assert_close(nc4.per_class[seen > 0], per[seen > 0] / seen[seen > 0])
    out = compute(stats, weight=w, min_count=6, nc4=nc4, impl="reference")
    assert out["nc4"] == nc4.agreement
    direct = compute(stats, weight=w, min_count=6, nc4=(held_h, held_y), impl="reference")
    assert direct["nc4"] == nc4.agreement and direct["nc4_class_mean"] == nc4.class_mean_agreement
