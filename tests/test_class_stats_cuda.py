"""The CUDA class-statistics kernel (csrc/cuda/class_stats_cuda.cu) and its chunk plan.

On CPU the plan (``nckernels.ops.collapse.chunk_plan``) is checked by a line-by-line Python
emulation of the two CUDA kernels against the float64 oracle, so the algorithm and its index
arithmetic are tested in CI; the kernel itself runs on a GPU machine (JIT-built with nvcc).
"""
from __future__ import annotations

import pytest
import torch

import nckernels
from nckernels.ops.collapse import chunk_plan
from oracle_collapse import class_stats as oracle
from test_class_stats import _assert_stats, _data

CUDA = torch.cuda.is_available()


def emulate(features, labels, C, ignore_index, chunk):
    """The two kernels of class_stats_cuda.cu in Python, reading only what they read from the plan."""
    plan = chunk_plan(labels, C, ignore_index, chunk)
    N, D = features.shape
    x = features.double()
    sums = torch.zeros(C, D, dtype=torch.float64)
    m2 = torch.zeros(C, dtype=torch.float64)
    part = torch.full((plan.num_slots, D), float("nan"), dtype=torch.float64)  # poisoned: every read slot is written
    part_m2 = torch.full((plan.num_slots,), float("nan"), dtype=torch.float64)
    for k in range(int(plan.chunk_end[C - 1])):  # chunk_stats_kernel
        c = int(plan.chunk_cls[k])
        seg_start, count = int(plan.ends[c]), int(plan.ends[c + 1] - plan.ends[c])
        n_chunks = -(-count // chunk)
        j = k - (int(plan.chunk_end[c]) - n_chunks)
        start, length = seg_start + j * chunk, min(count - j * chunk, chunk)
        rows = x[plan.perm[start:start + length]]
        s = rows.sum(0)
        q = ((rows - s / length) ** 2).sum()
        if n_chunks == 1:
            sums[c], m2[c] = s, q
        else:
            slot = seg_start // chunk + j + int(plan.multi_end[c]) - 1
            assert slot < plan.num_slots and torch.isnan(part_m2[slot]), "slots must be distinct and in bounds"
            part[slot], part_m2[slot] = s, q
    for g in range(int(plan.multi_end[C - 1])):  # merge_kernel
        c = int(plan.multi_cls[g])
        count = int(plan.ends[c + 1] - plan.ends[c])
        n_chunks = -(-count // chunk)
        first = int(plan.ends[c]) // chunk + g
        p = part[first:first + n_chunks]
        n_j = torch.tensor([min(count - j * chunk, chunk) for j in range(n_chunks)], dtype=torch.float64)
        s = p.sum(0)
        m2[c] = part_m2[first:first + n_chunks].sum() + ((p - n_j[:, None] * s / count) ** 2 / n_j[:, None]).sum()
        sums[c] = s
    return plan.counts, sums, m2


@pytest.mark.parametrize("chunk", [1, 2, 4, 32])
def test_plan_emulated_matches_oracle(chunk):
    """Zipf labels with ignored rows, and classes of sizes around multiples of the chunk."""
    h, y = _data(300, 5, 23, zipf=True, seed=chunk)
    _assert_stats(emulate(h, y, 23, -100, chunk), oracle(h, y, 23))
    sizes = [1, chunk, chunk + 1, 2 * chunk, 2 * chunk + 1, 3]
    ys = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    ys = ys[torch.randperm(len(ys), generator=torch.Generator().manual_seed(2))]
    hs = torch.randn(len(ys), 4)
    _assert_stats(emulate(hs, ys, len(sizes) + 2, -100, chunk), oracle(hs, ys, len(sizes) + 2))


def test_plan_all_ignored_and_one_row():
    h = torch.randn(5, 3)
    _assert_stats(emulate(h, torch.full((5,), -1), 4, -1, 32), oracle(h, torch.full((5,), -1), 4, ignore_index=-1))
    _assert_stats(emulate(h[:1], torch.tensor([2]), 4, -100, 32), oracle(h[:1], torch.tensor([2]), 4))


def test_impl_cuda_needs_cuda_tensors():
    with pytest.raises(ValueError, match="impl='cuda'"):
        nckernels.class_stats(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, impl="cuda")


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the kernel is JIT-built with nvcc)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_kernel_matches_oracle(dtype):
    for n, D, C, zipf in [(1, 3, 4, False), (37, 5, 7, False), (5000, 130, 300, True), (20000, 64, 50, True)]:
        h, y = _data(n, D, C, dtype, seed=n, zipf=zipf)
        got = nckernels.class_stats(h.cuda(), y.cuda(), C, impl="cuda")
        _assert_stats(got, oracle(h, y, C))
        again = nckernels.class_stats(h.cuda(), y.cuda(), C, impl="cuda")
        assert all(torch.equal(a, b) for a, b in zip(got, again)), "deterministic"
    # non-contiguous features (a column slice of a wider buffer) and an all-ignored batch
    wide = torch.randn(300, 20, dtype=dtype)
    y = torch.randint(0, 9, (300,))
    _assert_stats(nckernels.class_stats(wide.cuda()[:, 3:11], y.cuda(), 9, impl="cuda"), oracle(wide[:, 3:11], y, 9))
    empty = nckernels.class_stats(wide.cuda(), torch.full((300,), -100, device="cuda"), 9, impl="cuda")
    assert not empty.counts.any() and not empty.sums.any() and not empty.m2.any()
