"""Per-class statistics of a batch (DESIGN.md family 2): Triton kernels.

``segment_stats(h, y, C, ignore_index) -> (counts, sums, m2)``: for every class ``c`` the row
count ``n_c``, the fp64 row sum ``S_c = sum_{y_i = c} h_i`` and ``M2_c = sum_{y_i = c}
||h_i - mu_c||^2`` about the batch's own class mean ``mu_c = S_c / n_c``. Every loaded
feature is upcast to fp64 before any arithmetic, and ``M2`` is always a sum of squared
residuals about a mean (never ``sum ||h||^2 - n ||mu||^2``, which loses everything when
``||mu||^2 / var`` is large).

Design: sort, cut classes into chunks, exact merge
--------------------------------------------------
0. *Sort* (launch helper, torch ops, no host sync anywhere): the labels (ignored rows keyed
   ``C``, so they sort last) are sorted stably; ``perm`` lists the rows class by class and
   ``ends = searchsorted(sorted keys, [-1, 0, .., C - 1], right=True)`` gives each class's
   segment ``[ends[c], ends[c + 1])`` of ``perm`` (``bincount`` would sync on CUDA).
1. *Classes* (``_class_kernel``, grid ``(C / BLOCK_C, D / BLOCK_D)``): counts, the per-class
   chunk table, and the whole output row of every class with at most one row: zeros for
   empty classes, the upcast row for singletons (``M2 = 0``). Under Zipf labels these are
   most classes (at N = 32768, C = 50257: 43k empty, 4.8k singletons, 2k others), and this
   pass replaces the zero fill of ``sums``: every output row is written exactly once.
2. *Chunks* (``_chunk_kernel``): each class with ``n_c >= 2`` rows is cut into ``k_c =
   ceil(n_c / CHUNK)`` chunks (chunk ``j``: its rows ``[j CHUNK, min((j + 1) CHUNK, n_c))``).
   A chunk is the unit of work of one program, so a class holding 14 % of the batch is
   spread over ``n_c / CHUNK`` programs and nothing serialises on atomics or on one program.
   A program gathers its rows through ``perm`` as one register tile ``(R, BLOCK_D)`` per
   column block, ``R`` the smallest of 1, 2, 4, 8, 16, ``CHUNK`` that holds the chunk (a
   2-row class does not pay fp64 conversions for ``CHUNK`` masked rows), and from that
   single read computes the chunk sum ``P_j`` and the chunk's M2 about its own mean, ``q_j =
   sum ||h - P_j / n_j||^2`` (two passes over registers, one over memory). Programs are
   persistent (``for k in range(pid, total, num_programs)``, ``total`` read on device), so
   the ``N / CHUNK + min(N / 2, C)`` bound on the number of chunks costs nothing. A class
   with one chunk is final here: ``S_c, M2_c`` go straight to the outputs (exclusive owner,
   no atomics); a class with several chunks writes ``P_j, q_j`` to a partial buffer.
3. *Merge* (``_merge_kernel``, programs (multi-chunk class, column block)): Chan's formula for
   ``k`` groups, exact in real arithmetic,

       S_c  = sum_j P_j,           mu_c = S_c / n_c,
       M2_c = sum_j q_j + sum_j n_j ||P_j / n_j - mu_c||^2
            = sum_j q_j + sum_j ||P_j - n_j mu_c||^2 / n_j,

   in fp64 over ``(BLOCK_K chunks, BLOCK_D)`` tiles in a fixed order. Each program writes
   ``S_c`` for its column block and its share of ``M2_c`` into a small ``(classes, column
   blocks)`` buffer, added to ``m2`` by one ``index_add_`` (one value per class).

Deterministic: stable sort, fixed summation orders, every output element has one writer.

Why not block-local pre-aggregation (fixed row tiles of the sorted order, a segmented
reduction inside each tile, a fix-up across tiles)? Its tiles straddle class boundaries, so
it needs fp64 segmented scans inside a tile plus a cross-tile merge for every class cut by a
tile edge, and M2 about the class mean needs that mean first (a second pass, or a Chan merge
of the pieces anyway). Chunks aligned to classes balance the load the same way (no program
reads more than ``CHUNK`` rows) with plain reductions, and only the few classes larger than
``CHUNK`` need a merge.

Numerics: rows are exact in fp64; ``q_j`` is a two-pass M2 about the chunk mean (error
``O(eps n_j var)``, not ``O(eps n_j ||mu||^2)``); the merge term ``P_j - n_j mu_c`` is a
difference of fp64 sums of size ``n_j ||mu||`` with an ``O(sqrt(n_j) sigma)`` result: relative
error ``O(eps sqrt(n_j) ||mu|| / sigma)``, about ``1e-13`` at ``||mu||^2 / var = 1e6``.

Memory beyond the outputs: the sort (keys, ``perm``: ``O(N)``), per-class int64 tables
(``O(C)``), the chunk-to-class map (``N / CHUNK + min(N / 2, C)`` int64) and the partials of
multi-chunk classes. Those have ``n_c > CHUNK`` rows and ``ceil(n_c / CHUNK) < 2 n_c / CHUNK``
chunks; their slots are bounded by ``N / CHUNK + N / (CHUNK + 1)``, so the partial buffer is
``(N / CHUNK + N / (CHUNK + 1)) x D`` fp64 (16 MiB at N = 32768, D = 1024, CHUNK = 32): never
``O(#chunks x D)`` over the many single-chunk classes.

Cost at the LLM shape (N = 32768, D = 1024, C = 50257): writing the dense ``C x D`` fp64 output
(412 MB) dominates; the features (64 MB in bf16) are read once.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

CHUNK = 32  # most rows per chunk (a power of 2)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _class_kernel(X, stride_n, stride_d, PERM, ENDS, COUNTS, TABLE, SUMS, M2, C, D,
                  CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(i, b)``: classes ``[i BLOCK_C, (i + 1) BLOCK_C)``, column block ``b``. Writes the
    ``SUMS`` columns of classes with at most one row (0, or the row); column block 0 also
    writes ``COUNTS``, ``M2 = 0`` and the table rows ``TABLE[0] = #chunks`` (0 when ``n_c < 2``:
    no chunk) and ``TABLE[1] = (#chunks > 1)``."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    start = tl.load(ENDS + offs_c, mask=mask_c, other=0)
    count = tl.load(ENDS + 1 + offs_c, mask=mask_c, other=0) - start
    if tl.program_id(1) == 0:
        n_chunks = tl.where(count > 1, (count + CHUNK - 1) // CHUNK, 0)
        tl.store(COUNTS + offs_c, count, mask=mask_c)
        tl.store(TABLE + offs_c, n_chunks, mask=mask_c)
        tl.store(TABLE + C + offs_c, (n_chunks > 1).to(tl.int64), mask=mask_c)
        tl.store(M2 + offs_c, tl.zeros((BLOCK_C,), tl.float64), mask=mask_c)
    one = mask_c & (count == 1)
    rows = tl.load(PERM + start, mask=one, other=0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    x = tl.load(X + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=one[:, None] & mask_d[None, :],
                other=0.0).to(tl.float64)
    small = mask_c & (count <= 1)
    tl.store(SUMS + offs_c.to(tl.int64)[:, None] * D + cols[None, :], x, mask=small[:, None] & mask_d[None, :])


@triton.jit
def _chunk_tile(X, stride_n, stride_d, PERM, start, length, D, single, SUMS_ROW, M2_OUT, PART_ROW, PM2_OUT,
                R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum and M2 (about their own mean) of the ``length <= R`` sorted rows ``perm[start:]``,
    read once as ``(R, BLOCK_D)`` tiles; stored at ``SUMS_ROW`` / ``M2_OUT`` when ``single``
    (the class's only chunk), else at ``PART_ROW`` / ``PM2_OUT``."""
    offs_d = tl.arange(0, BLOCK_D)
    d_single = tl.where(single, D, 0)  # the two destinations as column limits (store masks)
    d_multi = D - d_single
    if R == 1:  # one row (last chunk of a multi-chunk class): the sum is the row, M2 = 0
        row_ptr = X + tl.load(PERM + start) * stride_n
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            x = tl.load(row_ptr + cols * stride_d, mask=cols < D, other=0.0).to(tl.float64)
            tl.store(SUMS_ROW + cols, x, mask=cols < d_single)
            tl.store(PART_ROW + cols, x, mask=cols < d_multi)
        q = 0.0
    else:
        offs_r = tl.arange(0, R)
        mask_r = offs_r < length
        rows = tl.load(PERM + start + offs_r, mask=mask_r, other=0)
        row_ptrs = X + rows[:, None] * stride_n
        inv_n = 1.0 / length.to(tl.float64)
        m2 = tl.zeros((BLOCK_D,), tl.float64)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask = mask_r[:, None] & (cols < D)[None, :]
            x = tl.load(row_ptrs + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float64)
            s = tl.sum(x, axis=0)
            tl.store(SUMS_ROW + cols, s, mask=cols < d_single)
            tl.store(PART_ROW + cols, s, mask=cols < d_multi)
            dev = tl.where(mask, x - (s * inv_n)[None, :], 0.0)
            m2 += tl.sum(dev * dev, axis=0)
        q = tl.sum(m2, axis=0)
    tl.store(M2_OUT, q, mask=single)
    tl.store(PM2_OUT, q, mask=d_multi > 0)


@triton.jit
def _chunk_kernel(X, stride_n, stride_d, PERM, ENDS, COUNTS, CHUNK_END, MULTI_END, CHUNK_CLS, TOTAL,
                  SUMS, M2, PART, PART_M2, D,
                  CHUNK: tl.constexpr, BD1: tl.constexpr, BD2: tl.constexpr, BD4: tl.constexpr, BD8: tl.constexpr,
                  BD16: tl.constexpr, BDC: tl.constexpr):
    """Persistent over the chunks ``k < TOTAL``: chunk ``k`` belongs to class ``c = CHUNK_CLS[k]``
    (``CHUNK_END`` = cumulative #chunks per class, ``MULTI_END`` = cumulative #multi-chunk classes)."""
    total = tl.load(TOTAL)
    for k in range(tl.program_id(0), total, tl.num_programs(0)):
        c = tl.load(CHUNK_CLS + k)
        count = tl.load(COUNTS + c)
        seg_start = tl.load(ENDS + c)
        n_chunks = (count + CHUNK - 1) // CHUNK
        j = k - (tl.load(CHUNK_END + c) - n_chunks)  # chunk index within the class
        start = seg_start + j * CHUNK
        length = tl.minimum(count - j * CHUNK, CHUNK)
        single = n_chunks == 1
        # partial slot of a multi-chunk class: floor(row / CHUNK) of the chunk's first sorted row
        # plus the class's ordinal g among multi-chunk classes: distinct, < N / CHUNK + N / (CHUNK + 1)
        slot = seg_start // CHUNK + j + (tl.load(MULTI_END + c) - 1)
        sums_row = SUMS + c * D
        part_row = PART + slot * D
        if length <= 1:
            _chunk_tile(X, stride_n, stride_d, PERM, start, length, D, single, sums_row, M2 + c, part_row,
                        PART_M2 + slot, 1, BD1)
        elif length <= 2:
            _chunk_tile(X, stride_n, stride_d, PERM, start, length, D, single, sums_row, M2 + c, part_row,
                        PART_M2 + slot, 2, BD2)
        elif length <= 4:
            _chunk_tile(X, stride_n, stride_d, PERM, start, length, D, single, sums_row, M2 + c, part_row,
                        PART_M2 + slot, 4, BD4)
        elif length <= 8:
            _chunk_tile(X, stride_n, stride_d, PERM, start, length, D, single, sums_row, M2 + c, part_row,
                        PART_M2 + slot, 8, BD8)
        elif length <= 16:
            _chunk_tile(X, stride_n, stride_d, PERM, start, length, D, single, sums_row, M2 + c, part_row,
                        PART_M2 + slot, 16, BD16)
        else:
            _chunk_tile(X, stride_n, stride_d, PERM, start, length, D, single, sums_row, M2 + c, part_row,
                        PART_M2 + slot, CHUNK, BDC)


@triton.jit
def _merge_kernel(ENDS, COUNTS, MULTI_CLS, MULTI_TOTAL, SUMS, PART, PART_M2, MQ, D,
                  CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(i, b)``, persistent over the multi-chunk classes ``g`` (``c = MULTI_CLS[g]``):
    Chan merge of the chunks of ``c`` over column block ``b``; ``S_c`` to ``SUMS``, the block's
    share of ``M2_c`` (plus ``sum_j q_j`` when ``b == 0``) to ``MQ[g, b]``."""
    pid_d = tl.program_id(1)
    n_db = tl.num_programs(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.load(MULTI_TOTAL)
    for g in range(tl.program_id(0), total, tl.num_programs(0)):
        c = tl.load(MULTI_CLS + g)
        count = tl.load(COUNTS + c)
        n_chunks = (count + CHUNK - 1) // CHUNK
        first = tl.load(ENDS + c) // CHUNK + g  # slot of chunk 0 (see _chunk_kernel)
        q_chunks = tl.where(pid_d == 0, n_chunks, 0)  # column block 0 also adds the chunks' own M2
        s = tl.zeros((BLOCK_D,), tl.float64)
        for j0 in range(0, n_chunks, BLOCK_K):
            mask_k = j0 + offs_k < n_chunks
            p = tl.load(PART + (first + j0 + offs_k)[:, None] * D + cols[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            s += tl.sum(p, axis=0)
        tl.store(SUMS + c * D + cols, s, mask=mask_d)
        mean = s / count.to(tl.float64)
        acc = tl.zeros((BLOCK_K,), tl.float64)
        for j0 in range(0, n_chunks, BLOCK_K):
            mask_k = j0 + offs_k < n_chunks
            mask = mask_k[:, None] & mask_d[None, :]
            p = tl.load(PART + (first + j0 + offs_k)[:, None] * D + cols[None, :], mask=mask, other=0.0)
            n_j = tl.where(mask_k, tl.minimum(count - (j0 + offs_k) * CHUNK, CHUNK), 1).to(tl.float64)
            dev = tl.where(mask, p - n_j[:, None] * mean[None, :], 0.0)
            acc += tl.sum(dev * dev, axis=1) / n_j
            acc += tl.load(PART_M2 + first + j0 + offs_k, mask=j0 + offs_k < q_chunks, other=0.0)
        tl.store(MQ + g * n_db + pid_d, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------- launch helper

def _config(device: torch.device, D: int, chunk: int) -> dict:
    """Tile sizes. GPU: tiles of about 2k elements in fp64 registers (4 warps; at most ~128
    registers a thread); interpreter: small tiles so that tests cover several column blocks
    and persistent programs that loop."""
    if _interpreted() or device.type != "cuda":
        tile, d_max, programs = 128, 32, 3
        cfg = dict(class_c=4, class_d=32, merge_k=8, merge_d=32, warps=1)
    else:
        tile, d_max = 2048, 1024
        programs = torch.cuda.get_device_properties(device).multi_processor_count * 8
        cfg = dict(class_c=8, class_d=512, merge_k=16, merge_d=128, warps=4)
    d_pow2 = triton.next_power_of_2(D)
    cfg.update(programs=programs, class_d=min(cfg["class_d"], d_pow2), merge_d=min(cfg["merge_d"], d_pow2))
    cfg["bd"] = {r: max(1, min(tile // r, d_max, d_pow2)) for r in (1, 2, 4, 8, 16, chunk)}
    return cfg


def segment_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int,
                  *, chunk: int = CHUNK):
    """``(counts int64 (C,), sums float64 (C, D), m2 float64 (C,))`` of the rows of ``features``
    ``(N, D)`` (fp32 / fp16 / bf16, any strides) grouped by ``labels`` ``(N,)`` int64; rows
    labelled ``ignore_index`` are skipped. ``m2[c]`` is the sum of ``||h - sums[c] / counts[c]||^2``
    over the rows of class ``c``; empty classes get exact zeros. Labels must be valid (in
    ``[0, C)`` or ``ignore_index``; the caller checks). ``chunk`` (a power of 2) is the most rows
    one program reads (tests shrink it). No host synchronisation; N = 0 launches nothing."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of 2, got {chunk}")
    N, D = features.shape
    C = int(num_classes)
    dev = features.device
    if N == 0 or C == 0:
        return (torch.zeros((C,), dtype=torch.int64, device=dev), torch.zeros((C, D), dtype=torch.float64, device=dev),
                torch.zeros((C,), dtype=torch.float64, device=dev))
    # 0. sort; ignored rows get key C and go last; class c owns perm[ends[c]:ends[c + 1]]
    key = labels.to(torch.int32).masked_fill_(labels == ignore_index, C)
    sorted_key, perm = torch.sort(key, stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(-1, C, device=dev, dtype=torch.int32), right=True)
    if D == 0:
        return ends[1:] - ends[:-1], torch.zeros((C, 0), dtype=torch.float64, device=dev), \
            torch.zeros((C,), dtype=torch.float64, device=dev)
    cfg = _config(dev, D, chunk)
    counts = torch.empty((C,), dtype=torch.int64, device=dev)
    table = torch.empty((2, C), dtype=torch.int64, device=dev)
    sums = torch.empty((C, D), dtype=torch.float64, device=dev)  # every row is written once below
    m2 = torch.empty((C,), dtype=torch.float64, device=dev)
    # 1. counts, chunk table, rows of empty and one-row classes
    _class_kernel[(triton.cdiv(C, cfg["class_c"]), triton.cdiv(D, cfg["class_d"]))](
        features, features.stride(0), features.stride(1), perm, ends, counts, table, sums, m2, C, D,
        CHUNK=chunk, BLOCK_C=cfg["class_c"], BLOCK_D=cfg["class_d"], num_warps=cfg["warps"])
    if N < 2:
        return counts, sums, m2
    # 2. chunks of the classes with >= 2 rows: chunk k belongs to the class c with
    #    chunk_end[c - 1] <= k < chunk_end[c]
    chunk_end, multi_end = table.cumsum_(dim=1)  # multi_end[c] - 1: ordinal of c among multi-chunk classes
    k_bound = N // chunk + min(N // 2, C)
    chunk_cls = torch.searchsorted(chunk_end, torch.arange(k_bound, device=dev, dtype=torch.int64), right=True)
    m_bound = N // (chunk + 1)  # multi-chunk classes have > chunk rows
    p_bound = N // chunk + m_bound if m_bound else 1
    part = torch.empty((p_bound, D), dtype=torch.float64, device=dev)
    part_m2 = torch.empty((p_bound,), dtype=torch.float64, device=dev)
    bd = cfg["bd"]
    _chunk_kernel[(max(1, min(k_bound, cfg["programs"])),)](
        features, features.stride(0), features.stride(1), perm, ends, counts, chunk_end, multi_end, chunk_cls,
        chunk_end[C - 1:], sums, m2, part, part_m2, D,
        CHUNK=chunk, BD1=bd[1], BD2=bd[2], BD4=bd[4], BD8=bd[8], BD16=bd[16], BDC=bd[chunk], num_warps=cfg["warps"])
    if m_bound:
        # 3. Chan merge of the multi-chunk classes
        multi_cls = torch.searchsorted(multi_end, torch.arange(m_bound, device=dev, dtype=torch.int64), right=True)
        n_db = triton.cdiv(D, cfg["merge_d"])
        mq = torch.zeros((m_bound, n_db), dtype=torch.float64, device=dev)
        _merge_kernel[(max(1, min(m_bound, cfg["programs"])), n_db)](
            ends, counts, multi_cls, multi_end[C - 1:], sums, part, part_m2, mq, D,
            CHUNK=chunk, BLOCK_K=cfg["merge_k"], BLOCK_D=cfg["merge_d"], num_warps=cfg["warps"])
        # unused rows of mq stay 0 and their index C is clamped to C - 1: adding 0.0 changes nothing
        m2.index_add_(0, multi_cls.clamp_(max=C - 1), mq.sum(dim=1))
    return counts, sums, m2
