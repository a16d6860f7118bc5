"""CPU benchmark of linear cross-entropy, forward + backward (fp32).

    pytest benchmarks/bench_cpu.py --benchmark-only [--benchmark-json=out.json]
    python benchmarks/bench_cpu.py --table out.json      # markdown table of a saved run

Contenders, on the same inputs ``x (N, D)``, ``W (V, D)``, ``y (N,)``, loss = mean CE:

* ``nckernels-cpp``: ``nckernels.linear_cross_entropy(..., impl="cpp")`` (chunked matmuls, C++ epilogues)
* ``nckernels-reference``: ``impl="reference"`` (chunked matmuls, PyTorch epilogues)
* ``torch-unchunked``: ``torch.nn.functional.linear_cross_entropy`` with ``options=None``
  (materialises the ``N x V`` logits)
* ``torch-chunked``: the same with ``options=torch.nn.LinearCrossEntropyOptions(chunking_method=None,
  batch_chunk_size=256)``: PyTorch's chunked op, which computes the gradients inside the forward
  (three matmuls a round instead of four). Its default ``LinearCrossEntropyOptions()`` resolves
  to ``chunking_method="aspect_ratio:2"``, which for V / D = 250 makes chunks of a few rows; one
  round then took ~20 s here, so the suite sets the chunk size.
* ``nckernels-{cpp,reference}+softcap+smoothing``: ``softcap=30, label_smoothing=0.1`` (the
  epilogue-heavy case; PyTorch has no soft-capping)

One round is one forward + ``torch.autograd.grad`` w.r.t. ``x`` and ``W``. Peak memory is
measured in a fresh subprocess per contender: resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs``) during one round after a warm-up round, minus the resident
set before it; it lands in ``extra_info["peak_rss_mib"]``.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from _common import peak_extra_rss, peak_in_subprocess

# (N, D, V): V = 32000 like a LLaMA-2 vocabulary; N and D small so that a round takes a few
# seconds on 2 cores (the matmuls dominate: ~4 x 2 N D V flops a round; 2 to 4 s for most
# contenders on the loaded machine of results/cpu_linear_ce.md, far more for the reference
# with softcap).
# N = 2048 makes the N x V logits (250 MiB) larger than one chunk of the nckernels paths.
SHAPES = [(512, 128, 32000), (2048, 32, 32000), (64, 16, 1000)]
SMOKE = (64, 16, 1000)  # CI: one call per contender, no peak-memory subprocess
ROUNDS = 5
TORCH_CHUNK = 256  # rows per chunk of PyTorch's chunked op (see the module docstring)
SOFTCAP = 30.0     # Gemma-2 style soft-capping (nckernels only: PyTorch has no softcap)
SMOOTHING = 0.1

NAMES = ["nckernels-cpp", "nckernels-reference", "torch-unchunked", "torch-chunked",
         "nckernels-cpp+softcap+smoothing", "nckernels-reference+softcap+smoothing"]


def _contenders():
    import nckernels

    opts = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=TORCH_CHUNK)
    capped = dict(softcap=SOFTCAP, label_smoothing=SMOOTHING)
    return {
        "nckernels-cpp": lambda x, w, y: nckernels.linear_cross_entropy(x, w, y, impl="cpp"),
        "nckernels-reference": lambda x, w, y: nckernels.linear_cross_entropy(x, w, y, impl="reference"),
        "torch-unchunked": lambda x, w, y: F.linear_cross_entropy(x, w, y, options=None),
        "torch-chunked": lambda x, w, y: F.linear_cross_entropy(x, w, y, options=opts),
        "nckernels-cpp+softcap+smoothing":
            lambda x, w, y: nckernels.linear_cross_entropy(x, w, y, impl="cpp", **capped),
        "nckernels-reference+softcap+smoothing":
            lambda x, w, y: nckernels.linear_cross_entropy(x, w, y, impl="reference", **capped),
    }


def make_inputs(N, D, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return x, w, y


def step(fn, x, w, y):
    loss = fn(x, w, y)
    dx, dw = torch.autograd.grad(loss, (x, w))
    return loss.detach(), dx, dw


# ------------------------------------------------------------------ peak memory (subprocess)

def measure_peak(name, N, D, V):
    """Peak extra resident memory (MiB) of one round of ``name``; runs in its own process."""
    fn = _contenders()[name]
    x, w, y = make_inputs(N, D, V)
    return peak_extra_rss(lambda: step(fn, x, w, y))


# ------------------------------------------------------------------ pytest-benchmark

try:
    import pytest
except ImportError:  # the --peak / --table modes need no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def reference_losses():
        return {}

    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: ("smoke-" if s == SMOKE else "") + "N{}-D{}-V{}".format(*s))
    @pytest.mark.parametrize("name", NAMES)
    def test_linear_ce_fwd_bwd(benchmark, name, shape, reference_losses):
        N, D, V = shape
        if name.startswith("nckernels-cpp"):
            from nckernels import _ext

            if _ext.get() is None:
                pytest.skip(f"C++ extension unavailable: {_ext.error()}")
        fn = _contenders()[name]
        x, w, y = make_inputs(N, D, V)
        loss, dx, dw = step(fn, x, w, y)
        # every contender computes the same thing (per option set)
        ref = reference_losses.setdefault((shape, "softcap" in name), (loss, dx, dw))
        torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw, ref[2], rtol=1e-4, atol=1e-7)

        benchmark.group = "linear_ce fwd+bwd N={} D={} V={} fp32".format(*shape) + (
            f" softcap={SOFTCAP} label_smoothing={SMOOTHING}" if "softcap" in name else "")
        benchmark.extra_info.update(
            N=N, D=D, V=V, torch=torch.__version__, threads=torch.get_num_threads(),
            logits_mib=N * V * 4 / 2**20, loadavg_1m_before=os.getloadavg()[0],
        )
        if name.startswith("nckernels-cpp"):
            from nckernels import _ext

            benchmark.extra_info["cpu_isa"] = _ext.get().cpu_isa()
        if not benchmark.disabled:
            benchmark.extra_info.update(peak_in_subprocess(__file__, name, N, D, V))
        benchmark.pedantic(step, args=(fn, x, w, y), rounds=ROUNDS, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------ markdown table

def table(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        e, s = b["extra_info"], b["stats"]
        rows.append((b["group"], b["params"]["name"], e, s))
    lines = [
        "| contender | N | D | V | median (s) | min (s) | mean ± sd (s) | peak extra RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for _group, name, e, s in sorted(rows, key=lambda r: (r[0], r[3]["median"])):
        label = name
        if e.get("cpu_isa"):
            label += f" ({e['cpu_isa']})"
        lines.append(
            f"| {label} | {e['N']} | {e['D']} | {e['V']} | {s['median']:.3f} | {s['min']:.3f} | "
            f"{s['mean']:.3f} ± {s['stddev']:.3f} | {e['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--peak":
        name, N, D, V = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(measure_peak(name, N, D, V)))
    elif len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(sys.argv[2]))
    else:
        sys.exit(__doc__)
