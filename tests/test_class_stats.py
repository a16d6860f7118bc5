"""nckernels.class_stats (every backend) and the streaming ClassStats accumulator vs float64 oracles."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

import nckernels
from nckernels.collapse import ClassStats
from oracle_collapse import class_stats as oracle

torch.set_default_dtype(torch.float32)


def _zipf_labels(n, C, s=1.1, gen=None):
    p = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** s
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)


def _data(n, D, C, dtype=torch.float32, seed=0, ignore_frac=0.1, zipf=False):
    g = torch.Generator().manual_seed(seed)
    y = _zipf_labels(n, C, gen=g) if zipf else torch.randint(0, C, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    h = (torch.randn(n, D, generator=g) + 3 * torch.randn(C, D, generator=g)[y.clamp(min=0)]).to(dtype)
    return h, y


def _assert_stats(got, ref, rtol=1e-10):
    counts, sums, m2 = got[:3]
    assert counts.dtype == torch.int64 and sums.dtype == torch.float64 and m2.dtype == torch.float64
    torch.testing.assert_close(counts.cpu(), ref[0], rtol=0, atol=0)
    scale = max(float(ref[1].abs().max()), 1.0)
    torch.testing.assert_close(sums.cpu(), ref[1], rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(m2.cpu(), ref[2], rtol=rtol, atol=rtol * max(float(ref[2].abs().max()), 1.0))


def _shapes(cfg):
    # the interpreter is slow: keep Triton shapes small
    return [(1, 3, 4), (37, 5, 7), (150, 19, 9)] if cfg.interpreted else [(1, 3, 4), (37, 5, 7), (600, 33, 50)]


def test_class_stats_matches_oracle(cfg):
    for n, D, C in _shapes(cfg):
        h, y = _data(n, D, C, cfg.dtype, seed=n)
        h, y = h.to(cfg.device), y.to(cfg.device)
        got = nckernels.class_stats(h, y, C, impl=cfg.impl)
        _assert_stats(got, oracle(h, y, C))
        assert (got.sums[got.counts == 0] == 0).all() and (got.m2[got.counts == 0] == 0).all()


def test_class_stats_zipf_and_chunk_boundaries(backend):
    """Zipf labels (one class with ~20% of rows) and class sizes around typical chunk sizes."""
    sizes = [1, 2, 63, 64, 65, 127, 128, 129, 261] if not backend.interpreted else [1, 2, 63, 64, 65, 133]
    y = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    h = torch.randn(len(y), 6) * 2 + 1
    C = len(sizes) + 3  # trailing empty classes
    _assert_stats(nckernels.class_stats(h, y, C, impl=backend.impl), oracle(h, y, C))
    hz, yz = _data(200 if backend.interpreted else 4000, 8, 40, zipf=True, seed=3)
    _assert_stats(nckernels.class_stats(hz, yz, 40, impl=backend.impl), oracle(hz, yz, 40))


def test_class_stats_near_collapsed_class_is_exact(backend):
    """||mu||^2 / tr(Sigma) = 1e6: one-pass sum / sum-of-squares loses every digit here."""
    g = torch.Generator().manual_seed(5)
    n, D = 130 if backend.interpreted else 2000, 4
    mu = torch.full((D,), 500.0)  # ||mu||^2 = 1e6
    h = (mu + torch.randn(n, D, generator=g) / D ** 0.5).float()  # tr(Sigma) ~ 1
    y = torch.zeros(n, dtype=torch.int64)
    got = nckernels.class_stats(h, y, 1, impl=backend.impl)
    ref = oracle(h, y, 1)
    assert abs(float(got.m2[0]) - float(ref[2][0])) <= 1e-9 * float(ref[2][0])
    naive = (h.float() ** 2).sum() - (h.float().sum(0) ** 2).sum() / n  # the trap, for contrast
    assert abs(float(naive) - float(ref[2][0])) > 1e-2 * float(ref[2][0])


def test_class_stats_edge_inputs(backend):
    C = 5
    for n in (0, 4):  # empty input; every row ignored
        h = torch.randn(n, 3)
        y = torch.full((n,), -100)
        got = nckernels.class_stats(h, y, C, impl=backend.impl)
        assert got.counts.eq(0).all() and got.sums.eq(0).all() and got.m2.eq(0).all()
        assert got.sums.shape == (C, 3)
    # leading dims, int32 labels, custom ignore_index
    h = torch.randn(2, 9, 4)
    y = torch.randint(0, C, (2, 9), dtype=torch.int32)
    y[0, :3] = 7
    got = nckernels.class_stats(h, y, C, ignore_index=7, impl=backend.impl)
    _assert_stats(got, oracle(h, y, C, ignore_index=7))
    # a non-contiguous view
    base = torch.randn(8, 12)
    _assert_stats(nckernels.class_stats(base[:, ::2], torch.arange(8) % C, C, impl=backend.impl),
                  oracle(base[:, ::2], torch.arange(8) % C, C))


def test_class_stats_within_scatter(backend):
    h, y = _data(90, 6, 5, seed=2)
    got = nckernels.class_stats(h, y, 5, within_cov=True, impl=backend.impl)
    ref = oracle(h, y, 5)
    torch.testing.assert_close(got.scatter, ref[3], rtol=1e-10, atol=1e-10 * float(ref[3].abs().max()))
    counts, sums, m2, scatter = got  # a four-field named tuple
    assert scatter.shape == (6, 6)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(labels=torch.zeros(4)), TypeError, "labels"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels shape"),
    (dict(labels=torch.tensor([0, 1, 9, 0])), ValueError, "outside"),
    (dict(labels=torch.tensor([0, 1, -1, 0])), ValueError, "outside"),
    (dict(features=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "features"),
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(impl="cuda-magic"), ValueError, "impl"),
])
def test_class_stats_bad_input(bad, exc, match):
    args = dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 0]), num_classes=3)
    args.update(bad)
    impl = args.pop("impl", "reference")
    with pytest.raises(exc, match=match):
        nckernels.class_stats(args["features"], args["labels"], args["num_classes"], impl=impl)


# ----------------------------------------------------------------------------- ClassStats


def _full_stats(h, y, C, **kw):
    return ClassStats(C, h.shape[-1], impl="reference", **kw).update(h, y)


def _assert_same_state(a: ClassStats, b: ClassStats, rtol=1e-12):
    assert torch.equal(a.counts, b.counts)
    seen = a.counts > 0
    torch.testing.assert_close(a.means[seen], b.means[seen], rtol=rtol, atol=rtol * float(a.means[seen].abs().max()))
    torch.testing.assert_close(a.m2, b.m2, rtol=rtol, atol=rtol * float(a.m2.abs().max()))
    if a.track_within_cov:
        torch.testing.assert_close(a.within_cov, b.within_cov, rtol=rtol, atol=rtol * float(a.within_cov.abs().max()))
    if a.cov_classes is not None:
        torch.testing.assert_close(a.class_covs, b.class_covs, rtol=rtol, atol=rtol * float(a.class_covs.abs().max()))


def test_streaming_updates_and_merges_equal_one_update():
    C, D = 9, 5
    h, y = _data(700, D, C, seed=11, zipf=True)
    kw = dict(track_within_cov=True, cov_classes=[0, 3, 8])
    whole = _full_stats(h, y, C, **kw)
    streamed = ClassStats(C, D, impl="reference", **kw)
    for start in range(0, 700, 53):
        streamed.update(h[start:start + 53], y[start:start + 53])
    _assert_same_state(whole, streamed)
    a, b = _full_stats(h[:250], y[:250], C, **kw), _full_stats(h[250:], y[250:], C, **kw)
    _assert_same_state(whole, a.merge(b))
    # against the oracle: counts, means, variances, pooled covariance, per-class covariance
    counts, sums, m2, scatter = oracle(h, y, C)
    assert torch.equal(whole.counts, counts)
    seen = counts > 0
    torch.testing.assert_close(whole.means[seen], sums[seen] / counts[seen, None])
    torch.testing.assert_close(whole.variances[seen], m2[seen] / counts[seen])
    multi = counts > 1
    torch.testing.assert_close(whole.unbiased_variances[multi], m2[multi] / (counts[multi] - 1))
    assert whole.unbiased_variances[~multi].isnan().all() and whole.means[~seen].isnan().all()
    torch.testing.assert_close(whole.within_cov, scatter / counts.sum())
    hs, ys = h[y >= 0].double(), y[y >= 0]
    for k, c in enumerate([0, 3, 8]):
        rows = hs[ys == c]
        torch.testing.assert_close(whole.class_covs[k], torch.cov(rows.T, correction=0))
    means = sums[seen] / counts[seen, None]
    torch.testing.assert_close(whole.global_mean(), means.mean(0))
    torch.testing.assert_close(whole.global_mean(weighted=True), hs.mean(0))


def test_streaming_keeps_the_near_collapsed_variance():
    """Many small fp32 batches of a class with ||mu||^2 / tr(Sigma) = 1e6: variance within 1e-6."""
    g = torch.Generator().manual_seed(9)
    D = 8
    mu = torch.full((D,), 1000.0 / D ** 0.5)
    h = (mu + torch.randn(4000, D, generator=g) / D ** 0.5).float()
    y = torch.zeros(4000, dtype=torch.int64)
    stats = ClassStats(1, D, impl="reference")
    for start in range(0, 4000, 7):
        stats.update(h[start:start + 7], y[start:start + 7])
    ref = oracle(h, y, 1)
    assert abs(float(stats.variances[0]) - float(ref[2][0] / 4000)) <= 1e-6 * float(ref[2][0] / 4000)


def test_state_dict_roundtrip_and_refusals(tmp_path):
    C, D = 6, 4
    h, y = _data(80, D, C, seed=4)
    stats = _full_stats(h, y, C, track_within_cov=True)
    snapshot = stats.state_dict()
    path = tmp_path / "state.pt"
    torch.save(snapshot, path)
    stats.update(h, y)  # must not change the snapshot
    restored = ClassStats(C, D, track_within_cov=True).load_state_dict(torch.load(path))
    _assert_same_state(restored, _full_stats(h, y, C, track_within_cov=True), rtol=0)
    with pytest.raises(ValueError, match="num_classes"):
        ClassStats(C + 1, D, track_within_cov=True).load_state_dict(snapshot)
    with pytest.raises(ValueError, match="track_within_cov"):
        ClassStats(C, D).load_state_dict(snapshot)
    with pytest.raises(ValueError, match="merge"):
        ClassStats(C, D + 1).merge(ClassStats(C, D))
    with pytest.raises(ValueError, match="features"):
        ClassStats(C, D).update(torch.randn(3, D + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cov_classes"):
        ClassStats(C, D, cov_classes=[0, C])
    with pytest.raises(RuntimeError, match="track_within_cov"):
        ClassStats(C, D).within_cov


def _all_reduce_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        h, y = _data(301, 5, 7, seed=21, zipf=True)
        shard = slice(rank * 150, (rank + 1) * 150 if rank < world - 1 else None)
        stats = ClassStats(7, 5, track_within_cov=True, cov_classes=[0, 2], impl="reference")
        stats.update(h[shard], y[shard]).all_reduce()
        torch.save(stats.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes_equals_one_update(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    h, y = _data(301, 5, 7, seed=21, zipf=True)
    whole = _full_stats(h, y, 7, track_within_cov=True, cov_classes=[0, 2])
    for rank in range(2):
        reduced = ClassStats(7, 5, track_within_cov=True, cov_classes=[0, 2])
        reduced.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt"))
        _assert_same_state(whole, reduced)
