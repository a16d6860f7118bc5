"""Sharded heads over torch.distributed (``nckernels.distributed``) against single-process float64 oracles.

One launch of 3 gloo processes on CPU (forked from pytest, which has torch imported already: no
re-import per process) runs every check below; the checks run on the 3 ranks and again on the
subgroup of ranks {0, 1}, so that both world sizes are covered by one launch, and the state_dict
check saves under 3 ranks and loads under 2. Each check compares the loss and the gradients of
every rank with a float64 oracle of the same loss on the whole (gathered) batch and the full
weight (tests/oracle.py, tests/oracle_margin.py). Every rank records each check's traceback (or
None) in a JSON file; the first failure stops the run (the other ranks would wait in its
collectives). ``test_distributed[check]`` fails with the tracebacks of the ranks where it failed,
or as not run when the run stopped before it.
"""
from __future__ import annotations

import io
import json
import math
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

import nckernels
from nckernels.distributed import PartialFC, comm, sharded_logsumexp, vocab_parallel_cross_entropy
from oracle import linear_cross_entropy_oracle
from oracle_margin import margin_oracle

WORLD = 3
D, V, C = 8, 50, 50
# the Triton kernels run on these CPU tensors in the interpreter (conftest sets TRITON_INTERPRET without CUDA);
# slow there, so on the 3 ranks only
TRITON = ("triton",) if nckernels.backend.triton_available() and nckernels.backend.triton_interpreted() else ()


def triton_on(grp) -> tuple[str, ...]:
    return TRITON if grp.size == WORLD else ()


CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


@dataclass
class Group:
    group: object  # None: the default group of 3 ranks
    size: int
    rank: int


def groups(rank: int, pair) -> list[Group]:
    """The groups this process belongs to: all 3 ranks, and {0, 1}."""
    return [Group(None, WORLD, rank)] + ([Group(pair, 2, rank)] if rank < 2 else [])


def assert_close(actual, expected, what, tol=2e-5):
    """``|actual - expected| <= tol * max|expected|`` (and NaN where expected is NaN)."""
    a, x = actual.detach().double(), expected.detach().double()
    assert a.shape == x.shape, f"{what}: shape {tuple(a.shape)} != {tuple(x.shape)}"
    assert torch.equal(a.isnan(), x.isnan()), f"{what}: NaN pattern differs: {a} vs {x}"
    scale = max(float(x.nan_to_num().abs().max()) if x.numel() else 0.0, 1e-30)
    err = float((a - x).nan_to_num().abs().max()) if a.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_()


def even_shards(total: int, size: int) -> list[tuple[int, int]]:
    return [(r * total // size, (r + 1) * total // size) for r in range(size)]


@contextmanager
def reduce_scatter(enabled: bool):
    """Gradients of gathered rows through the reduce-scatter (the NCCL path; gloo's reduce-scatter gives the
    same values, through an all-reduce) or the all-reduce + slice that gloo gets by default."""
    assert not comm.has_reduce_scatter(None, "cpu")
    saved = comm.REDUCE_SCATTER_BACKENDS
    comm.REDUCE_SCATTER_BACKENDS = frozenset({"gloo"}) if enabled else saved
    try:
        yield
    finally:
        comm.REDUCE_SCATTER_BACKENDS = saved


# ----------------------------------------------------------------------------- vocab-parallel cross-entropy


def vocab_case(seed, *, shape=(2, 9), ignore=3, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.7
    b = torch.randn(V, generator=g) * 0.5
    cw = torch.rand(V, generator=g) + 0.5
    t = torch.randint(0, V, shape, generator=g)
    t.view(-1)[torch.randperm(t.numel(), generator=g)[:ignore]] = ignore_index
    return x, w, b, cw, t


def vocab_layouts(grp: Group) -> list[tuple[int, int]]:
    """This rank's classes in each tested layout: the even split (50 over 3 ranks: 16, 17, 17) and, on
    2 ranks, unequal shards in reverse rank order."""
    layouts = [even_shards(V, grp.size)]
    if grp.size == 2:
        layouts.append([(23, V), (0, 23)])
    return [layout[grp.rank] for layout in layouts]


def run_vocab(grp, lo, hi, x, w, b, cw, t, up_lse=None, **kw):
    """Ours on this rank's shard and the oracle on the full weight, both differentiated through
    ``loss`` (times a random upstream for ``reduction="none"``) ``+ sum(up_lse * lse)``:
    ``(loss, lse, dx, dw[lo:hi], db[lo:hi])`` each."""
    xs, ws, bs = leaf(x), leaf(w[lo:hi]), leaf(b[lo:hi])
    xo, wo, bo = leaf(x, torch.float64), leaf(w, torch.float64), leaf(b, torch.float64)
    ours = vocab_parallel_cross_entropy(xs, ws, t, group=grp.group, vocab_start=lo, linear_bias=bs,
                                        weight=None if cw is None else cw[lo:hi], return_lse=True, **kw)
    oracle_kw = {k: v for k, v in kw.items() if k != "impl"}
    ref = linear_cross_entropy_oracle(xo, wo, t, linear_bias=bo, weight=cw, **oracle_kw)
    up = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for loss, lse in (ours, ref):
        objective = (loss * up.to(loss.dtype)).sum()
        if up_lse is not None:
            objective = objective + (lse * up_lse.to(lse.dtype)).sum()
        objective.backward()
    return ((ours[0], ours[1], xs.grad, ws.grad, bs.grad),
            (ref[0], ref[1], xo.grad, wo.grad[lo:hi], bo.grad[lo:hi]))


def assert_all_close(ours, ref, what, names=("loss", "lse", "d input", "d weight_shard", "d linear_bias"), tol=2e-5):
    for a, x, name in zip(ours, ref, names):
        assert_close(a, x, f"{what}: {name}", tol)


@check
def vocab_parallel_every_option(rank, pair):
    """label smoothing + class weights + z-loss + softcap + ignore_index + shift + return_lse (with its
    gradient), mean reduction, on the reference, auto (C++) and Triton backends."""
    x, w, b, cw, t = vocab_case(1, ignore_index=-1)
    up_lse = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    for grp in groups(rank, pair):
        for lo, hi in vocab_layouts(grp):
            for impl in ("reference", "auto") + triton_on(grp):
                ours, ref = run_vocab(grp, lo, hi, x, w, b, cw, t, up_lse, ignore_index=-1, label_smoothing=0.1,
                                      z_loss=1e-3, softcap=4.0, shift=True, impl=impl)
                assert_all_close(ours, ref, f"{grp.size} ranks, shard [{lo}, {hi}), {impl}")


@check
def vocab_parallel_reductions(rank, pair):
    """reduction none (random upstream gradient) and sum, with and without class weights."""
    x, w, b, cw, t = vocab_case(2, shape=(16,))
    for grp in groups(rank, pair):
        lo, hi = even_shards(V, grp.size)[grp.rank]
        for reduction in ("none", "sum", "mean"):
            for weights in (cw, None):
                ours, ref = run_vocab(grp, lo, hi, x, w, b, weights, t, reduction=reduction, label_smoothing=0.05)
                assert_all_close(ours, ref, f"{grp.size} ranks, {reduction}, class weights {weights is not None}")


@check
def vocab_parallel_all_ignored(rank, pair):
    """Every target ignored: NaN for mean (like PyTorch), 0 for sum, zero gradients; no crash, no hang."""
    x, w, b, cw, t = vocab_case(3, shape=(2, 5), ignore=10)
    for grp in groups(rank, pair):
        lo, hi = even_shards(V, grp.size)[grp.rank]
        for reduction in ("mean", "sum", "none"):
            ours, ref = run_vocab(grp, lo, hi, x, w, b, cw, t, reduction=reduction, z_loss=1e-3)
            assert_all_close(ours[:2], ref[:2], f"{grp.size} ranks, {reduction}")
            if reduction == "mean":
                assert ours[0].isnan(), ours[0]
            for g in ours[2:]:
                assert torch.equal(g, torch.zeros_like(g)), g


@check
def vocab_parallel_bad_arguments(rank, pair):
    """Clear errors naming the argument, raised on every rank (no rank left waiting in a collective)."""
    x, w, b, cw, t = vocab_case(4, shape=(6,), ignore=0)
    for grp in groups(rank, pair):
        lo, hi = even_shards(V, grp.size)[grp.rank]
        call = dict(group=grp.group, vocab_start=lo)
        with pytest.raises(ValueError, match="features but weight_shard has shape"):
            vocab_parallel_cross_entropy(x, torch.randn(hi - lo, D + 1), t, **call)
        with pytest.raises(TypeError, match="weight_shard dtype"):
            vocab_parallel_cross_entropy(x, w[lo:hi].double(), t, **call)
        with pytest.raises(ValueError, match="weight_shard must hold at least one class"):
            vocab_parallel_cross_entropy(x, torch.randn(0, D), t, **call)
        with pytest.raises(ValueError, match="target"):
            vocab_parallel_cross_entropy(x, w[lo:hi], torch.full_like(t, V), **call)
        with pytest.raises(ValueError, match="vocab_start"):  # every rank claims [0, V_r): overlaps
            vocab_parallel_cross_entropy(x, w[lo:hi], t, group=grp.group, vocab_start=0)
        with pytest.raises(ValueError, match="vocab_start"):
            vocab_parallel_cross_entropy(x, w[lo:hi], t, group=grp.group, vocab_start=-1)
        with pytest.raises(ValueError, match="weight"):
            vocab_parallel_cross_entropy(x, w[lo:hi], t, weight=cw, **call)
        with pytest.raises(ValueError, match="grad_filter"):
            vocab_parallel_cross_entropy(x, w[lo:hi], t, grad_filter=1e-3, impl="reference", **call)
        with pytest.raises(ValueError, match="label_smoothing"):
            vocab_parallel_cross_entropy(x, w[lo:hi], t, label_smoothing=1.5, **call)


@check
def sharded_logsumexp_matches_logsumexp(rank, pair):
    """Explicit logits split over the ranks (unequal slices, one rank with none): the global LSE and its
    gradient; a row that is -inf on one slice, and a row that is -inf everywhere (-inf, not NaN)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, 11, generator=g) * 3
    z[0, 1, :4] = -math.inf
    z[1, 2] = -math.inf
    finite = z.clone()
    finite[1, 2] = 0.0
    up = torch.randn(2, 4, generator=g, dtype=torch.float64)
    for grp in groups(rank, pair):
        lo, hi = ([(0, 4), (4, 4), (4, 11)] if grp.size == 3 else [(0, 7), (7, 11)])[grp.rank]
        assert_close(sharded_logsumexp(z[..., lo:hi], group=grp.group), torch.logsumexp(z.double(), -1), "lse")
        ours, ref = leaf(finite[..., lo:hi]), leaf(finite, torch.float64)
        (sharded_logsumexp(ours, -1, group=grp.group) * up).sum().backward()
        (torch.logsumexp(ref, -1) * up).sum().backward()
        assert_close(ours.grad, ref.grad[..., lo:hi], f"{grp.size} ranks: d logits")


# ----------------------------------------------------------------------------- Partial FC

MARGINS = [  # (PartialFC margin_loss, the oracle's arguments)
    (("cosface", {"scale": 16.0, "margin": 0.3}), dict(kind="cosface", scale=16.0, margin=0.3)),
    (("arcface", {"scale": 16.0, "margin": 0.5}), dict(kind="arcface", scale=16.0, margin=0.5)),
    (("combined", {"scale": 16.0, "m1": 0.9, "m2": 0.3, "m3": 0.1}),
     dict(kind="combined", scale=16.0, m1=0.9, m2=0.3, m3=0.1)),
    (("circle", {"gamma": 32.0, "margin": 0.25}), dict(kind="circle", scale=32.0, margin=0.25)),
]


def fc_case(seed, label_high=C):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g) * (0.5 + torch.rand(C, 1, generator=g))
    e = torch.randn(16, D, generator=g) * (0.5 + torch.rand(16, 1, generator=g))
    y = torch.randint(0, label_high, (16,), generator=g)
    return e, w, y


def local_rows(grp: Group) -> slice:
    """Unequal local batches: 5, 6, 5 rows on 3 ranks; 7, 9 on 2."""
    sizes = [5, 6, 5] if grp.size == 3 else [7, 9]
    return slice(sum(sizes[:grp.rank]), sum(sizes[:grp.rank + 1]))


def run_fc(grp, e, w, y, margin, oracle_kw, classes=None, **kw):
    """PartialFC on this rank's rows and the oracle on the global batch over ``classes`` (default: all);
    ``(loss, d local embeddings, d weight shard)`` each, the oracle's weight gradient zero outside ``classes``.
    The rows labelled ``kw["ignore_index"]`` (default -100) are ignored by the oracle."""
    fc = PartialFC(D, C, margin_loss=margin, group=grp.group, **kw)
    fc.load_state_dict(w)  # the full weight
    rows = local_rows(grp)
    e_local = leaf(e[rows])
    loss = fc(e_local, y[rows])
    loss.backward()
    classes = torch.arange(C) if classes is None else classes(fc)
    remap = torch.full((C,), -1).index_put_((classes,), torch.arange(len(classes)))
    valid = y != kw.get("ignore_index", -100)
    eo, wo = leaf(e, torch.float64), leaf(w, torch.float64)
    ref = margin_oracle(eo, wo[classes], torch.where(valid, remap[y.where(valid, 0)], -1), ignore_index=-1,
                        **oracle_kw)
    ref.backward()
    return fc, (loss, e_local.grad, fc.weight.grad), (ref, eo.grad[rows], wo.grad[fc.shard_start:fc.shard_end])


@check
def partial_fc_full_sample_equals_full_loss(rank, pair):
    """sample_rate = 1: the full margin loss of the global batch, for each margin kind and backend; full_weight()."""
    for grp in groups(rank, pair):
        for i, (margin, oracle_kw) in enumerate(MARGINS):
            e, w, y = fc_case(10 + i)
            for impl in ("reference",) + triton_on(grp):
                fc, ours, ref = run_fc(grp, e, w, y, margin, oracle_kw, sample_rate=1.0, ddp=False, impl=impl)
                for a, x, name in zip(ours, ref, ("loss", "d local_embeddings", "d weight")):
                    assert_close(a, x, f"{grp.size} ranks, {margin[0]}, {impl}: {name}", tol=1e-4)
                assert torch.equal(fc.full_weight(), w)


def gather_sampled(fc: PartialFC, grp: Group) -> torch.Tensor:
    sampled = [None] * grp.size
    dist.all_gather_object(sampled, fc.sampled_classes.tolist(), group=grp.group)
    return torch.tensor(sorted(sum(sampled, [])))


@check
def partial_fc_sampling_keeps_positives(rank, pair):
    """sample_rate < 1: each rank samples its positives plus random negatives, max(#positives,
    ceil(rate * C_r)) centres; the loss is the oracle's over the union of the samples, and the unsampled
    rows get exactly zero gradient. Labels in [0, 25): the last rank has no positive at all."""
    e, w, y = fc_case(20, label_high=25)
    margin, oracle_kw = MARGINS[1]
    for grp in groups(rank, pair):
        fc, ours, ref = run_fc(grp, e, w, y, margin, oracle_kw, classes=lambda fc: gather_sampled(fc, grp),
                               sample_rate=0.2, seed=3, ddp=False)
        sampled = fc.sampled_classes
        positives = y[(y >= fc.shard_start) & (y < fc.shard_end)].unique()
        size = fc.shard_end - fc.shard_start
        assert torch.equal(sampled, sampled.unique()), sampled  # sorted, distinct
        assert bool(((sampled >= fc.shard_start) & (sampled < fc.shard_end)).all()), sampled
        assert bool(torch.isin(positives, sampled).all()), (positives, sampled)
        assert len(sampled) == max(len(positives), math.ceil(0.2 * size)), (len(sampled), len(positives), size)
        for a, x, name in zip(ours, ref, ("loss", "d local_embeddings", "d weight")):
            assert_close(a, x, f"{grp.size} ranks: {name}", tol=1e-4)
        unsampled = torch.ones(size, dtype=torch.bool)
        unsampled[sampled - fc.shard_start] = False
        assert bool((fc.weight.grad[unsampled] == 0).all())


@check
def partial_fc_ddp_gradient_scaling(rank, pair):
    """ddp=True: a DDP-wrapped backbone gets exactly the gradient of the returned (global) loss;
    the local embeddings' gradient is K x that of ddp=False; the centres' gradient is the same."""
    e, w, y = fc_case(30)
    margin, oracle_kw = MARGINS[0]
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(31))
    for grp in groups(rank, pair):
        rows = local_rows(grp)
        torch.manual_seed(32)
        backbone = torch.nn.Linear(6, D)
        oracle_backbone = torch.nn.Linear(6, D).double()
        oracle_backbone.load_state_dict(backbone.state_dict())
        ddp_backbone = torch.nn.parallel.DistributedDataParallel(backbone, process_group=grp.group)
        fc = PartialFC(D, C, margin_loss=margin, group=grp.group, sample_rate=1.0, ddp=True)
        fc.load_state_dict(w)
        fc(ddp_backbone(x[rows]), y[rows]).backward()
        margin_oracle(oracle_backbone(x.double()), w.double(), y, **oracle_kw).backward()
        for p, q in zip(backbone.parameters(), oracle_backbone.parameters()):
            assert_close(p.grad, q.grad, f"{grp.size} ranks: backbone gradient after DDP averaging", tol=1e-4)
        grads = {}
        for ddp in (True, False):
            fc = PartialFC(D, C, margin_loss=margin, group=grp.group, sample_rate=1.0, ddp=ddp)
            fc.load_state_dict(w)
            e_local = leaf(e[rows])
            fc(e_local, y[rows]).backward()
            grads[ddp] = e_local.grad, fc.weight.grad
        assert_close(grads[True][0], grp.size * grads[False][0], "d local_embeddings: ddp=True vs K x ddp=False")
        assert torch.equal(grads[True][1], grads[False][1])


@check
def reduce_scatter_rows_sums_and_scatters(rank, pair):
    """comm.reduce_scatter_rows: this rank's rows of the sum over the ranks, unequal row counts (one rank
    with none; and so skewed that K max(sizes) > 2 B picks the all-reduce), with and without reduce-scatter."""
    for grp in groups(rank, pair):
        for sizes in ([3, 0, 5], [0, 0, 6]) if grp.size == 3 else ([4, 1], [0, 5]):
            mine = slice(sum(sizes[:grp.rank]), sum(sizes[:grp.rank + 1]))
            per_rank = [torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(90 + r),
                                    dtype=torch.float64) for r in range(grp.size)]
            for enabled in (True, False):
                with reduce_scatter(enabled):
                    out = comm.reduce_scatter_rows(per_rank[grp.rank], sizes, grp.group)
                assert_close(out, sum(per_rank)[mine], f"{grp.size} ranks, {sizes}, reduce-scatter {enabled}",
                             tol=1e-15)


def ignore_rows(y, rows_to_ignore, ignore_index=-100):
    y = y.clone()
    y[rows_to_ignore] = ignore_index
    return y


@check
def partial_fc_ignore_index(rank, pair):
    """Ignored rows on one rank only, on every rank, and all the rows of one rank (unequal local batches):
    the mean over the non-ignored rows of the global batch and the gradients, ignored rows' exactly zero;
    the full loss and a sampled one; the gradient through the reduce-scatter and the all-reduce fallback."""
    e, w, y = fc_case(70, label_high=25)
    margin, oracle_kw = MARGINS[0]
    for grp in groups(rank, pair):
        first = local_rows(grp).start  # this rank's first row in the global batch
        second = local_rows(Group(None, grp.size, 1)).start
        cases = {"rank 1 only": [second + 1, second + 3],
                 "every rank": [1, 6, 12, 15], "all of rank 0": list(range(local_rows(Group(None, grp.size, 0)).stop))}
        for what, ignored in cases.items():
            yi = ignore_rows(y, ignored)
            for rate, enabled in ((1.0, True), (1.0, False), (0.3, True)):
                classes = None if rate == 1.0 else (lambda fc: gather_sampled(fc, grp))
                with reduce_scatter(enabled):
                    fc, ours, ref = run_fc(grp, e, w, yi, margin, oracle_kw, classes, sample_rate=rate, seed=4,
                                           ddp=False)
                label = f"{grp.size} ranks, ignored {what}, rate {rate}, reduce-scatter {enabled}"
                for a, x, name in zip(ours, ref, ("loss", "d local_embeddings", "d weight")):
                    assert_close(a, x, f"{label}: {name}", tol=1e-4)
                local_ignored = [i - first for i in ignored if local_rows(grp).start <= i < local_rows(grp).stop]
                assert bool((ours[1][local_ignored] == 0).all()), label


@check
def partial_fc_ignored_rows_are_not_positives(rank, pair):
    """ignore_index may be a class id: its rows do not force that centre into the sample (with
    ceil(rate C_r) = 1 the sample is exactly the positives of the non-ignored rows)."""
    e, w, y = fc_case(71)
    margin, oracle_kw = MARGINS[1]
    for grp in groups(rank, pair):
        ignored = int(y[3])  # a class that occurs in the batch
        fc, ours, ref = run_fc(grp, e, w, y, margin, oracle_kw, lambda fc: gather_sampled(fc, grp), sample_rate=0.01,
                               seed=5, ddp=False, ignore_index=ignored)
        kept = y[y != ignored]
        positives = kept[(kept >= fc.shard_start) & (kept < fc.shard_end)].unique()
        if fc.shard_start <= ignored < fc.shard_end:
            assert len(positives), "the test needs other positives on the rank of the ignored class"
        if len(positives):
            assert torch.equal(fc.sampled_classes, positives), (fc.sampled_classes, positives, ignored)
        else:
            assert len(fc.sampled_classes) == 1, fc.sampled_classes
        for a, x, name in zip(ours, ref, ("loss", "d local_embeddings", "d weight")):
            assert_close(a, x, f"{grp.size} ranks, ignore_index={ignored}: {name}", tol=1e-4)


@check
def partial_fc_all_rows_ignored(rank, pair):
    """Every row of every rank ignored: loss 0.0 (not NaN) with a grad_fn, zero gradients, nothing sampled."""
    e, w, y = fc_case(72)
    for grp in groups(rank, pair):
        rows = local_rows(grp)
        for rate in (1.0, 0.2):
            fc = PartialFC(D, C, group=grp.group, sample_rate=rate, seed=1)
            fc.load_state_dict(w)
            e_local = leaf(e[rows])
            loss = fc(e_local, torch.full_like(y[rows], -100))
            assert loss.grad_fn is not None and loss.dtype == torch.float32
            assert torch.equal(loss.detach(), torch.tensor(0.0)), loss
            loss.backward()
            assert torch.equal(e_local.grad, torch.zeros_like(e_local)), e_local.grad
            assert torch.equal(fc.weight.grad, torch.zeros_like(fc.weight)), fc.weight.grad
            assert fc.sampled_classes.numel() == 0


def fc_steps(grp, fc, batches):
    """(loss, sampled_classes) of each forward of ``fc`` on this rank's rows of each ``(e, y)``."""
    rows = local_rows(grp)
    return [(fc(e[rows], y[rows]).detach(), fc.sampled_classes.clone()) for e, y in batches]


def saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()))


@check
def partial_fc_checkpoint_resumes_sampling(rank, pair):
    """With a seed: save after step 1, and a fresh module that loads the state samples at step 2 exactly
    what the uninterrupted run does (same sampled_classes, same loss), from this rank's state or the list
    of every rank's (same world size). Another world size, the full weight, or another seed restart the
    stream from seed + rank."""
    (e1, w, y1), (e2, _, y2) = fc_case(80), fc_case(81)
    step1, step2 = [(e1, y1)], [(e2, y2)]

    def make(grp, seed=9):
        fc = PartialFC(D, C, margin_loss=MARGINS[1][0], group=grp.group, sample_rate=0.5, seed=seed, ddp=False)
        fc.load_state_dict(w)
        return fc

    for grp in groups(rank, pair):
        run = make(grp)
        assert run.get_extra_state()["seed"] == 9 and run.get_extra_state()["sampling_rng"] is None
        fc_steps(grp, run, step1)
        state = saved(run.state_dict())
        assert state["_extra_state"]["sampling_rng"]["device"] == "cpu"
        (expected,) = fc_steps(grp, run, step2)
        (restarted,) = fc_steps(grp, make(grp), step2)
        assert not torch.equal(restarted[1], expected[1]), "the test needs a stream that moved at step 1"
        resumed = make(grp)
        resumed.load_state_dict(state)
        assert saved(resumed.state_dict())["_extra_state"]["sampling_rng"]["state"].equal(
            state["_extra_state"]["sampling_rng"]["state"])  # saving before the next forward keeps the stream
        # step 2, then step 1's batch again as step 3: the stream goes on as the uninterrupted run's
        for got, want in zip(fc_steps(grp, resumed, step2 + step1), [expected] + fc_steps(grp, run, step1)):
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (got, want)
        for load in (w, dict(state, _extra_state=dict(state["_extra_state"], seed=10))):
            other = make(grp)
            other.load_state_dict(load)
            (got,) = fc_steps(grp, other, step2)
            assert torch.equal(got[1], restarted[1]) and torch.equal(got[0], restarted[0]), (got, restarted)
        if grp.size != WORLD:
            continue
        states = [None] * WORLD
        dist.all_gather_object(states, state)
        same = make(grp)
        same.load_state_dict(states)
        (got,) = fc_steps(grp, same, step2)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0]), (got, expected)
        if rank < 2:  # the run of 3 ranks resumed on 2: restarted from seed + rank, as a fresh run of 2
            on_pair, fresh = make(Group(pair, 2, rank)), make(Group(pair, 2, rank))
            on_pair.load_state_dict(states)
            assert fc_steps(Group(pair, 2, rank), on_pair, step2)[0][1].equal(
                fc_steps(Group(pair, 2, rank), fresh, step2)[0][1])


@check
def partial_fc_state_dict_reshards(rank, pair):
    """Save under 3 ranks, load the list of the 3 states under 2 ranks (and the full weight, and through a
    parent module); the metadata; a state of another sharding alone is refused."""
    w = fc_case(40)[1]
    fc3 = PartialFC(D, C, group=None)
    fc3.load_state_dict(w)
    state = fc3.state_dict()
    lo, hi = even_shards(C, WORLD)[rank]
    assert state["_extra_state"] == dict(num_classes=C, embedding_size=D, shard_start=lo, shard_end=hi, world_size=3)
    assert torch.equal(state["weight"], w[lo:hi])
    states = [None] * WORLD
    dist.all_gather_object(states, state)
    if rank >= 2:
        return
    fc2 = PartialFC(D, C, group=pair)
    fc2.load_state_dict(states)
    assert torch.equal(fc2.weight.detach(), w[fc2.shard_start:fc2.shard_end])
    assert torch.equal(fc2.full_weight(), w)
    assert fc2.state_dict()["_extra_state"]["world_size"] == 2
    parent = torch.nn.ModuleDict({"head": PartialFC(D, C, group=pair)})
    parent.load_state_dict({"head.weight": w})
    assert torch.equal(parent["head"].weight.detach(), w[fc2.shard_start:fc2.shard_end])
    with pytest.raises(ValueError, match="re-shard"):
        fc2.load_state_dict(states[rank])
    with pytest.raises(ValueError, match="num_classes"):
        PartialFC(D, C + 1, group=pair).load_state_dict(states)
    with pytest.raises(ValueError, match="cover"):
        fc2.load_state_dict(states[:2])


@check
def partial_fc_bad_arguments(rank, pair):
    e, w, y = fc_case(50)
    for grp in groups(rank, pair):
        for rate in (0.0, 1.5, math.nan):
            with pytest.raises(ValueError, match="sample_rate"):
                PartialFC(D, C, sample_rate=rate, group=grp.group)
        with pytest.raises(ValueError, match="margin_loss"):
            PartialFC(D, C, margin_loss="sphereface", group=grp.group)
        with pytest.raises(TypeError, match="margin_loss"):
            PartialFC(D, C, margin_loss=("cosface", {"gamma": 1.0}), group=grp.group)
        with pytest.raises(ValueError, match="scale"):
            PartialFC(D, C, margin_loss=("arcface", {"scale": -1.0}), group=grp.group)
        with pytest.raises(ValueError, match="num_classes"):
            PartialFC(D, grp.size - 1, group=grp.group)
        fc = PartialFC(D, C, group=grp.group)
        rows = local_rows(grp)
        labels = y[rows].clone()
        if grp.rank == 1:
            labels[0] = C  # out of range on one rank only: every rank raises after the all-gather
        with pytest.raises(ValueError, match="local_labels"):
            fc(e[rows], labels)
        if grp.rank == 1:
            labels[0] = -1  # negative but not ignore_index
        with pytest.raises(ValueError, match="local_labels"):
            fc(e[rows], labels)
        for bad in (True, 1.0, None):
            with pytest.raises(TypeError, match="ignore_index"):
                PartialFC(D, C, ignore_index=bad, group=grp.group)
        with pytest.raises(ValueError, match="local_embeddings"):
            fc(torch.randn(4, D + 1), y[:4])
        with pytest.raises(TypeError, match="local_labels"):
            fc(e[rows], y[rows].float())


@check
def communication_is_independent_of_the_number_of_classes(rank, pair):
    """Elements sent through collectives per training step (unequal local batches 4, 5, 6): the same for 30
    and 300 classes, and within a small multiple of B * D per rank (all-gathers, per-row all-reduces, the
    gathered gradient: one reduce-scatter of K max_r B_r rows (NCCL), or an all-reduce of its B rows (gloo))."""
    sent = []  # (collective, elements this rank sends into it)

    def counting(name, collective, arg):
        def wrapper(*args, **kwargs):
            sent.append((name, args[arg].numel()))
            return collective(*args, **kwargs)
        return wrapper

    rs = comm._REDUCE_SCATTER
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", rs)}
    for name, arg in (("all_reduce", 0), ("all_gather", 1), (rs, 1)):  # all_gather(outputs, input), rs(out, in)
        setattr(dist, name, counting(name, originals[name], arg))
    n, longest, B = 4 + rank, 6, 15
    try:
        for enabled in (True, False):
            volume = {}
            for classes in (30, 300):
                g = torch.Generator().manual_seed(60 + rank)
                e, y = torch.randn(n, D, generator=g), torch.randint(0, classes, (n,), generator=g)
                sent.clear()
                with reduce_scatter(enabled):
                    PartialFC(D, classes, sample_rate=0.5, seed=1)(leaf(e), y).backward()
                scattered = [k for name, k in sent if name == rs]
                assert scattered == ([WORLD * longest * D] if enabled else []), (enabled, sent)
                assert enabled or (B * D) in [k for name, k in sent if name == "all_reduce"], sent
                x, t = torch.randn(6, D, generator=g), torch.randint(0, classes, (6,), generator=g)
                lo, hi = even_shards(classes, WORLD)[rank]
                vocab_parallel_cross_entropy(leaf(x), leaf(torch.randn(hi - lo, D)), t, vocab_start=lo).backward()
                volume[classes] = sum(k for _, k in sent)
            assert volume[30] == volume[300], (enabled, volume)
            assert volume[30] <= 8 * WORLD * longest * (D + 1), (enabled, volume)
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)


# ----------------------------------------------------------------------------- the launch


def _worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    pair = dist.new_group([0, 1])
    results, record = {}, Path(out_dir, f"rank{rank}.json")
    for name, fn in CHECKS.items():
        try:
            fn(rank, pair)
            results[name] = None
        except Exception:
            # stop every rank now (the others would wait in this check's collectives): record and re-raise,
            # start_processes then terminates the other processes
            results[name] = traceback.format_exc()
            raise
        finally:
            record.write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Per rank, each check's traceback or None (checks after a failure are missing), and the launch's error."""
    out = tmp_path_factory.mktemp("distributed")
    try:
        mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="fork")
        stopped = None
    except ProcessException as err:
        stopped = f"rank {err.error_index}: {str(err).strip().splitlines()[-1]}"
    files = [out / f"rank{r}.json" for r in range(WORLD)]
    return [json.loads(f.read_text()) if f.exists() else {} for f in files], stopped


@pytest.mark.parametrize("name", list(CHECKS))
def test_distributed(results, name):
    per_rank, stopped = results
    failures = [f"rank {r}:\n{res[name]}" for r, res in enumerate(per_rank) if res.get(name)]
    assert not failures, "\n".join(failures)
    assert all(name in res for res in per_rank), f"not run: the run stopped before ({stopped})"


def test_single_process_is_the_single_device_loss():
    """Without a process group: a group of one, equal to the single-device ops."""
    x, w, b, cw, t = vocab_case(70)
    kw = dict(linear_bias=b, weight=cw, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, shift=True)
    torch.testing.assert_close(vocab_parallel_cross_entropy(x, w, t, vocab_start=0, **kw),
                               nckernels.linear_cross_entropy(x, w, t, **kw))
    e, w, y = fc_case(71)
    fc = PartialFC(D, C, margin_loss=("cosface", {"scale": 16.0}), sample_rate=1.0)
    fc.load_state_dict(w)
    torch.testing.assert_close(fc(e, y), nckernels.cosface_loss(e, w, y, scale=16.0))


def test_single_process_checkpoint_resumes_sampling():
    """World size 1 without a process group: a state saved after step 1 resumes the sampling stream."""
    e, w, y = fc_case(73)

    def make():
        fc = PartialFC(D, C, sample_rate=0.3, seed=2)
        fc.load_state_dict(w)
        return fc

    run = make()
    run(e[:4], y[:4])
    state = saved(run.state_dict())
    expected = run(e, y), run.sampled_classes
    resumed = make()
    resumed.load_state_dict(state)
    got = resumed(e, y), resumed.sampled_classes
    restarted = make()
    restarted(e, y)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0]), (got, expected)
    assert not torch.equal(restarted.sampled_classes, expected[1]), "the test needs a stream that moved at step 1"
