"""CPU benchmark of per-class statistics (counts, sums, m2), the core of neural-collapse measurement.

    pytest benchmarks/bench_cpu_collapse.py --benchmark-only [--benchmark-json=out.json]
    pytest benchmarks/bench_cpu_collapse.py -k smoke --benchmark-disable   # CI: tiny shape, one call each
    python benchmarks/bench_cpu_collapse.py --table out.json               # markdown table of a saved run
    python benchmarks/bench_cpu_collapse.py --interleaved [ROUNDS]         # contenders alternated round by round

Every contender computes, on the same inputs ``features (N, D)`` fp32 and Zipf-distributed
``labels (N,)`` (class ``c`` of ``C`` drawn with probability proportional to ``1 / rank``; the
ranks are shuffled over the class indices, so at ``C = 8192`` one class holds ~10 % of the rows),
``counts`` int64 ``(C,)``, ``sums`` float64 ``(C, D)`` and ``m2`` float64 ``(C,)`` = sum over a
class's rows of ``||h - mean_c||^2`` (see ``nckernels/reference/segment.py``):

* ``cpp-kernel``: ``nckernels._ext.get().class_stats_cpu`` called directly (csrc/class_stats_cpu.cpp:
  counting sort by label, chunks of at most 256 rows over OpenMP threads, two passes in double
  per chunk, Chan merge of the chunks of large classes)
* ``nckernels-cpp``: ``nckernels.class_stats(..., impl="cpp")``: the same kernel behind the public
  function (argument and label-range checks)
* ``nckernels-reference``: ``nckernels.class_stats(..., impl="reference")``: the pure-PyTorch spec
  (chunked ``bincount`` / ``index_add_`` in float64, two passes)
* ``torch-index_add``: the same computation written plainly, unchunked::

      h = features.double(); keep = labels != ignore_index; h, y = h[keep], labels[keep]
      counts = torch.bincount(y, minlength=C)
      sums = torch.zeros(C, D, dtype=torch.float64).index_add_(0, y, h)
      means = sums / counts.clamp(min=1)[:, None]
      m2 = torch.zeros(C, dtype=torch.float64).index_add_(0, y, (h - means[y]).square().sum(1))

* ``torch-onehot-gemm``: the one-hot matmul of neural-collapse research code,
  ``sums = onehot(y, C).double().T @ h`` and ``m2 = onehot(y, C).double().T @ ||h - means[y]||^2``.
  A full ``N x C`` float64 one-hot matrix would take 4 GiB at ``N = 65536, C = 8192``, so the
  contender is bounded by chunking over ``N``: ``ONEHOT_ROWS = 4096`` rows per GEMM (a 256 MiB
  one-hot block, built directly in float64 with ``scatter_``). Its cost is ``2 N C D`` flops for
  the sums, whatever the label distribution.

Each contender's result is checked against the first one's (counts equal, sums and m2 to 1e-9
relative). Peak memory is measured in a fresh subprocess per contender (resident-set high-water
mark during one round after a warm-up round, minus the resident set before it; Linux only) and
lands in ``extra_info["peak_rss_mib"]``; it is skipped under ``--benchmark-disable``.

On a shared machine the load changes between contenders; ``--interleaved`` runs the fast
contenders (not the one-hot GEMM) alternately, round by round, in one process at the big shape,
plus the C++ kernel with 1 thread, with uniform labels (8 rows per class on average) and
with each narrower instruction set than the default, and prints medians and the median of the per-round time ratios against ``torch-index_add``.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from _common import peak_extra_rss, peak_in_subprocess

# (N, D, C, label distribution); the id of a shape is "N{N}-D{D}-C{C}-{labels}", "smoke-..." for CI
SHAPES = [(65536, 256, 8192, "zipf"), (512, 16, 64, "zipf")]
SMOKE = (512, 16, 64, "zipf")
ONEHOT_ROWS = 4096  # rows per one-hot GEMM (see the module docstring)
IGNORE_INDEX = -100
IGNORED_SHARE = 0.0  # share of rows labelled IGNORE_INDEX (0: every row counts, as in the lead's spec)
# rounds per contender at the big shape (the slow contenders take seconds a round)
ROUNDS = {"cpp-kernel": 20, "nckernels-cpp": 20, "nckernels-reference": 3, "torch-index_add": 3,
          "torch-onehot-gemm": 2}

NAMES = ["cpp-kernel", "nckernels-cpp", "nckernels-reference", "torch-index_add", "torch-onehot-gemm"]


def shape_id(shape):
    N, D, C, dist = shape
    return ("smoke-" if shape == SMOKE else "") + f"N{N}-D{D}-C{C}-{dist}"


def index_add(features, labels, C, ignore_index=IGNORE_INDEX):
    D = features.shape[1]
    h = features.double()
    keep = labels != ignore_index
    h, y = h[keep], labels[keep]
    counts = torch.bincount(y, minlength=C)
    sums = torch.zeros(C, D, dtype=torch.float64).index_add_(0, y, h)
    means = sums / counts.clamp(min=1)[:, None]
    m2 = torch.zeros(C, dtype=torch.float64).index_add_(0, y, (h - means[y]).square().sum(1))
    return counts, sums, m2


def onehot_gemm(features, labels, C, ignore_index=IGNORE_INDEX, rows=ONEHOT_ROWS):
    D = features.shape[1]
    keep = labels != ignore_index
    x, y = features[keep], labels[keep]
    counts = torch.bincount(y, minlength=C)
    sums = torch.zeros(C, D, dtype=torch.float64)

    def onehot(yc):
        return torch.zeros(yc.shape[0], C, dtype=torch.float64).scatter_(1, yc[:, None], 1.0)

    for s in range(0, x.shape[0], rows):
        sums.addmm_(onehot(y[s:s + rows]).T, x[s:s + rows].double())
    means = sums / counts.clamp(min=1)[:, None]
    m2 = torch.zeros(C, dtype=torch.float64)
    for s in range(0, x.shape[0], rows):
        yc = y[s:s + rows]
        r2 = (x[s:s + rows].double() - means[yc]).square().sum(1)
        m2.addmv_(onehot(yc).T, r2)
    return counts, sums, m2


def _contenders():
    import nckernels
    from nckernels import _ext

    def kernel(x, y, C):
        return _ext.get().class_stats_cpu(x, y, C, IGNORE_INDEX)

    def public(impl):
        return lambda x, y, C: tuple(nckernels.class_stats(x, y, C, ignore_index=IGNORE_INDEX, impl=impl))

    return {
        "cpp-kernel": kernel,
        "nckernels-cpp": public("cpp"),
        "nckernels-reference": public("reference"),
        "torch-index_add": index_add,
        "torch-onehot-gemm": onehot_gemm,
    }


def zipf_labels(N, C, gen):
    p = 1.0 / torch.arange(1, C + 1, dtype=torch.float64)
    y = torch.multinomial(p / p.sum(), N, replacement=True, generator=gen)
    return torch.randperm(C, generator=gen)[y]


def make_inputs(N, D, C, dist, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen) + 0.5
    if dist != "zipf":
        raise ValueError(dist)
    y = zipf_labels(N, C, gen)
    if IGNORED_SHARE > 0:
        y[torch.rand(N, generator=gen) < IGNORED_SHARE] = IGNORE_INDEX
    return x, y


# ------------------------------------------------------------------ peak memory (subprocess)

def measure_peak(name, N, D, C, dist):
    """Peak extra resident memory (MiB) of one round of ``name``; runs in its own process."""
    fn = _contenders()[name]
    x, y = make_inputs(N, D, C, dist)
    return peak_extra_rss(lambda: fn(x, y, C))


# ------------------------------------------------------------------ pytest-benchmark

try:
    import pytest
except ImportError:  # the --peak / --table modes need no pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
    @pytest.mark.parametrize("name", NAMES)
    def test_class_stats(benchmark, name, shape, first_results):
        N, D, C, dist = shape
        if name in ("cpp-kernel", "nckernels-cpp"):
            from nckernels import _ext

            if _ext.get() is None:
                pytest.skip(f"C++ extension unavailable: {_ext.error()}")
        fn = _contenders()[name]
        x, y = make_inputs(N, D, C, dist)
        counts, sums, m2 = fn(x, y, C)
        ref = first_results.setdefault(shape, (counts, sums, m2))  # every contender computes the same
        assert torch.equal(counts, ref[0])
        torch.testing.assert_close(sums, ref[1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m2, ref[2], rtol=1e-9, atol=1e-9)

        benchmark.group = f"class_stats N={N} D={D} C={C} {dist} fp32"
        benchmark.extra_info.update(
            N=N, D=D, C=C, labels=dist, largest_class_share=float(torch.bincount(y, minlength=C).max()) / N,
            torch=torch.__version__, threads=torch.get_num_threads(), loadavg_1m_before=os.getloadavg()[0],
        )
        if name in ("cpp-kernel", "nckernels-cpp"):
            from nckernels import _ext

            benchmark.extra_info["cpu_isa"] = _ext.get().cpu_isa()
        if not benchmark.disabled:
            benchmark.extra_info.update(peak_in_subprocess(__file__, name, *shape))
        rounds = ROUNDS[name] if shape != SMOKE else 5
        benchmark.pedantic(fn, args=(x, y, C), rounds=rounds, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------ markdown table

def table(path):
    with open(path) as f:
        data = json.load(f)
    rows = [(b["group"], b["params"]["name"], b["extra_info"], b["stats"]) for b in data["benchmarks"]]
    lines = [
        "| contender | N | D | C | median (ms) | min (ms) | mean ± sd (ms) | rounds | speedup vs torch-index_add "
        "(median) | peak extra RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {g: s["median"] for g, n, _e, s in rows if n == "torch-index_add"}
    for group, name, e, s in sorted(rows, key=lambda r: (r[0], r[3]["median"])):
        label = name + (f" ({e['cpu_isa']})" if e.get("cpu_isa") else "")
        speedup = f"{base[group] / s['median']:.3g}x" if group in base else ""
        peak = e.get("peak_rss_mib")
        lines.append(
            f"| {label} | {e['N']} | {e['D']} | {e['C']} | {s['median'] * 1e3:.1f} | {s['min'] * 1e3:.1f} | "
            f"{s['mean'] * 1e3:.1f} ± {s['stddev'] * 1e3:.1f} | {s['rounds']} | {speedup} | "
            f"{'' if peak is None else f'{peak:.0f}'} |"
        )
    return "\n".join(lines)


def interleaved(rounds=7):
    """Markdown table: the fast contenders alternated round by round at SHAPES[0] (see the docstring)."""
    import time

    from nckernels import _ext

    N, D, C, dist = SHAPES[0]
    x, y = make_inputs(N, D, C, dist)
    y_uniform = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(1))
    fns = {k: v for k, v in _contenders().items() if k != "torch-onehot-gemm"}
    threads = torch.get_num_threads()

    def kernel_1thread(x, y, C):
        torch.set_num_threads(1)
        try:
            return fns["cpp-kernel"](x, y, C)
        finally:
            torch.set_num_threads(threads)

    def kernel_isa(isa):
        def run(x, y, C):
            _ext.get().set_cpu_isa(isa)
            try:
                return fns["cpp-kernel"](x, y, C)
            finally:
                _ext.get().set_cpu_isa("auto")
        return run

    runs = {name: (fn, y) for name, fn in fns.items()}
    runs["cpp-kernel, 1 thread"] = (kernel_1thread, y)
    runs["cpp-kernel, uniform labels"] = (fns["cpp-kernel"], y_uniform)
    for isa in _ext.get().supported_cpu_isas()[:-1]:  # the last one is what "auto" runs
        runs[f"cpp-kernel, cpu_isa={isa}"] = (kernel_isa(isa), y)
    times = {name: [] for name in runs}
    for name, (fn, labels) in runs.items():  # warm-up
        fn(x, labels, C)
    load = [os.getloadavg()[0]]
    for _ in range(rounds):
        for name, (fn, labels) in runs.items():
            t0 = time.perf_counter()
            fn(x, labels, C)
            times[name].append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    base = times["torch-index_add"]
    isa = _ext.get().cpu_isa()
    lines = [f"N={N} D={D} C={C} {dist} fp32, {rounds} rounds each, {threads} threads, cpu_isa={isa}, "
             f"1-minute load average {min(load):.1f} to {max(load):.1f}", "",
             "| contender | median (ms) | min (ms) | median of per-round ratio torch-index_add / contender |",
             "| --- | ---: | ---: | ---: |"]
    for name, v in sorted(times.items(), key=lambda kv: med(kv[1])):
        ratio = med([b / t for b, t in zip(base, v)])
        lines.append(f"| {name} | {med(v) * 1e3:.1f} | {min(v) * 1e3:.1f} | {ratio:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--peak":
        name, N, D, C, dist = sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
        print(json.dumps(measure_peak(name, N, D, C, dist)))
    elif len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(sys.argv[2]))
    elif len(sys.argv) in (2, 3) and sys.argv[1] == "--interleaved":
        print(interleaved(*map(int, sys.argv[2:])))
    else:
        sys.exit(__doc__)
