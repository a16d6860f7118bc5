"""CPU benchmark of the margin losses (CosFace, ArcFace, class-level and pair-wise Circle), fwd + bwd, fp32.

    pytest benchmarks/bench_cpu_margin.py --benchmark-only [--benchmark-json=out.json]
    pytest benchmarks/bench_cpu_margin.py -k smoke --benchmark-disable   # CI: tiny shapes, one call each
    python benchmarks/bench_cpu_margin.py --table out.json               # markdown table of a saved run

Contenders, on the same inputs and settings (``benchmarks/_margin_losses.py``: ``s = 64``, CosFace
``m = 0.35``, ArcFace ``m = 0.5`` rad, class-level Circle ``gamma = 256, m = 0.25``, pair-wise
Circle ``gamma = 80, m = 0.4`` on P x 4 batches):

* ``nckernels``: ``nckernels.cosface_loss`` / ``arcface_loss`` / ``circle_loss`` / ``pair_circle_loss``
  (``impl="auto"``: on CPU the chunked reference; no ``B x C`` matrix; the backward recomputes the cosines)
* ``torch-dense``: plain PyTorch over the full ``B x C`` fp32 cosines and logits (``B x B`` for the
  pair loss), ``F.cross_entropy``, autograd
* ``pml``: pytorch-metric-learning's ``CosFaceLoss``, ``ArcFaceLoss`` (margin in degrees:
  ``degrees(0.5)``) and the pair-wise ``CircleLoss``; skipped when the package is not installed
  (it has no class-level Circle). pml holds its class centres as ``W (D, C)``; the benchmark
  replaces ``W`` with a transposed view of the shared ``(C, D)`` weight, so that the gradients
  reach the same leaf. pml's reductions equal ours here: CosFace / ArcFace take the mean over
  rows; Circle the mean over non-zero anchor losses, and every anchor has a positive and a
  negative and a loss > 0.

One round is one forward + ``torch.autograd.grad`` w.r.t. the embeddings (and the weight).
Before timing, every contender's loss and gradients are checked against ``torch-dense``'s.
Alongside: the GEMM floor, ``gemms x 2 B C D`` flops (3 GEMMs for autograd's dense backward,
4 for nckernels' class losses, whose backward recomputes the cosines; ``C = B`` for the pair
loss) over the rate of one ``(B, D) x (D, C)`` fp32 matmul (into a preallocated output) timed
in the same run; and peak memory, measured in a fresh subprocess per contender
(``benchmarks/_common.py``; skipped under ``--benchmark-disable``).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import torch

from _common import peak_extra_rss, peak_in_subprocess
from _margin_losses import (ARCFACE_MARGIN, COSFACE_MARGIN, DENSE, LOSSES, PAIR_GAMMA, PAIR_MARGIN, SCALE,
                            make_inputs, nckernels_loss, rel_err, step)

# (loss, B, D, C); C is unused by pair_circle. B = 1024 at C = 100,000 makes the fp32 logits
# (390 MiB) four times the reference's 96 MiB chunk budget.
CASES = [
    ("cosface", 256, 128, 10_000), ("cosface", 256, 128, 100_000), ("cosface", 1024, 128, 100_000),
    ("arcface", 256, 128, 10_000), ("arcface", 256, 128, 100_000),
    ("circle", 256, 128, 10_000), ("circle", 256, 128, 100_000),
    ("pair_circle", 256, 128, 0), ("pair_circle", 1024, 128, 0),
]
SMOKE_CASES = [(loss, 64, 16, 1000) for loss in LOSSES]
NAMES = ["torch-dense", "nckernels", "pml"]


def rounds_for(work):
    """Timed rounds for a score matrix of ``work`` = B x C (or B x B) entries: more for the quick cases."""
    return 3 if work >= 10**8 else 5 if work >= 10**7 else 15


def case_id(case):
    loss, B, D, C = case
    shape = f"B{B}-D{D}" if loss == "pair_circle" else f"B{B}-D{D}-C{C}"
    return ("smoke-" if case in SMOKE_CASES else "") + f"{loss}-{shape}"


def columns(case):
    """Columns of the score matrix: classes, or the batch for the pair loss."""
    loss, B, _D, C = case
    return B if loss == "pair_circle" else C


def gemm_count(name, loss):
    return 4 if name == "nckernels" and loss != "pair_circle" else 3


def pml_loss(loss):
    """pytorch-metric-learning's version of ``loss`` on the benchmark's signature (ImportError if absent)."""
    from pytorch_metric_learning import losses

    if loss == "pair_circle":
        circle = losses.CircleLoss(m=PAIR_MARGIN, gamma=PAIR_GAMMA)
        return lambda x, y: circle(x, y)
    make = {"cosface": lambda C, D: losses.CosFaceLoss(C, D, margin=COSFACE_MARGIN, scale=SCALE),
            "arcface": lambda C, D: losses.ArcFaceLoss(C, D, margin=math.degrees(ARCFACE_MARGIN), scale=SCALE)}[loss]
    modules = {}  # one module per weight shape: constructing one initialises a D x C weight

    def run(x, w, y):
        module = modules.get(w.shape)
        if module is None:
            module = modules[w.shape] = make(*w.shape)
            del module.W  # its own parameter; the shared weight goes in its place
        module.W = w.T
        return module(x, y)

    return run


def contender(name, loss):
    if name == "nckernels":
        return nckernels_loss(loss)
    if name == "torch-dense":
        return DENSE[loss]
    if name == "pml":
        return pml_loss(loss)
    raise ValueError(name)


def sgemm_gflops(B, D, C, repeats=5):
    """fp32 rate of one ``(B, D) x (D, C)`` matmul into a preallocated output (median of ``repeats``).

    Preallocated: a fresh output of this size is a new mapping whose page faults halve the rate here."""
    a, b, out = torch.randn(B, D), torch.randn(C, D), torch.empty(B, C)
    torch.mm(a, b.T, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b.T, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * B * C * D / statistics.median(times) / 1e9


# ------------------------------------------------------------------ peak memory (subprocess)

def measure_peak(name, loss, B, D, C):
    """Peak extra resident memory (MiB) of one round of ``name``; runs in its own process."""
    fn = contender(name, loss)
    leaves, labels = make_inputs(loss, B, D, C)
    return peak_extra_rss(lambda: step(fn, leaves, labels))


# ------------------------------------------------------------------ pytest-benchmark

try:
    import pytest
except ImportError:  # the --peak / --table modes need no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def dense_results():
        """Per case: the torch-dense ``(loss, grads)`` and the fp32 matmul rate."""
        return {}

    @pytest.mark.parametrize("case", CASES + SMOKE_CASES, ids=case_id)
    @pytest.mark.parametrize("name", NAMES)
    def test_margin_fwd_bwd(benchmark, name, case, dense_results):
        loss, B, D, C = case
        if name == "pml":
            pytest.importorskip("pytorch_metric_learning")
            if loss == "circle":
                pytest.skip("pytorch-metric-learning has no class-level Circle loss")
        fn = contender(name, loss)
        leaves, labels = make_inputs(loss, B, D, C)
        if case not in dense_results:
            dense_results[case] = (step(DENSE[loss], leaves, labels), sgemm_gflops(B, D, columns(case)))
        (ref_loss, ref_grads), gflops = dense_results[case]
        value, grads = step(fn, leaves, labels)
        torch.testing.assert_close(value, ref_loss, rtol=1e-5, atol=1e-6)
        for grad, ref in zip(grads, ref_grads):
            assert rel_err(grad, ref) < 1e-4

        cols = columns(case)
        benchmark.group = case_id(case)
        benchmark.extra_info.update(
            loss=loss, B=B, D=D, C=cols, loss_value=value.item(), torch=torch.__version__,
            threads=torch.get_num_threads(), gemms=gemm_count(name, loss), sgemm_gflops=gflops,
            logits_mib=B * cols * 4 / 2**20, loadavg_1m_before=os.getloadavg()[0],
        )
        if name == "nckernels":
            from nckernels import backend

            benchmark.extra_info["backend"] = backend.choose(f"{loss}_loss", "auto", labels.device)
        if not benchmark.disabled:
            benchmark.extra_info.update(peak_in_subprocess(__file__, name, *case))
        benchmark.pedantic(step, args=(fn, leaves, labels), rounds=rounds_for(B * cols), iterations=1,
                           warmup_rounds=1)


# ------------------------------------------------------------------ markdown table

def table(path):
    with open(path) as f:
        data = json.load(f)
    rows = [(b["group"], b["params"]["name"], b["extra_info"], b["stats"]) for b in data["benchmarks"]]
    dense = {g: s["median"] for g, n, _e, s in rows if n == "torch-dense"}
    lines = [
        "| loss | contender | B | D | C | median (s) | min (s) | mean ± sd (s) | rounds | speedup vs torch-dense "
        "(median) | GEMM floor (s) | peak extra RSS (MiB) | peak / fp32 logits |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {case_id(c): i for i, c in enumerate(CASES + SMOKE_CASES)}
    for group, name, e, s in sorted(rows, key=lambda r: (order.get(r[0], len(order)), r[3]["median"])):
        label = name + (f" ({e['backend']})" if e.get("backend") else "")
        speedup = f"{dense[group] / s['median']:.2f}x" if group in dense else ""
        floor = e["gemms"] * 2 * e["B"] * e["C"] * e["D"] / (e["sgemm_gflops"] * 1e9)
        peak = e.get("peak_rss_mib")
        peak_cells = f"{peak:.0f} | {peak / e['logits_mib']:.2f}" if peak is not None else " | "
        lines.append(
            f"| {e['loss']} | {label} | {e['B']} | {e['D']} | {e['C'] if e['loss'] != 'pair_circle' else '-'} | "
            f"{s['median']:.3f} | {s['min']:.3f} | {s['mean']:.3f} ± {s['stddev']:.3f} | {s['rounds']} | {speedup} | "
            f"{floor:.3f} ({e['gemms']} GEMMs) | {peak_cells} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--peak":
        name, loss, B, D, C = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
        print(json.dumps(measure_peak(name, loss, B, D, C)))
    elif len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(sys.argv[2]))
    else:
        sys.exit(__doc__)
