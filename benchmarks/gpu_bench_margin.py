"""GPU benchmark of the margin losses (issue 6) against dense PyTorch, fwd+bwd.

    python benchmarks/gpu_bench_margin.py --out DIR [--tiny] [--device cpu] [--losses ...] [--contenders ...]

Cases: CosFace, ArcFace and class-level Circle at B = 1,024, D = 512, C = 100,000 and
1,000,000; pair-wise Circle at B = 1,024 and 4,096, D = 512; embeddings fp32 and bf16 (class
centres fp32, as under AMP). Settings, inputs and the dense losses: ``benchmarks/_margin_losses.py``.

Contenders:

* ``nckernels``: ``impl="auto"`` (Triton on CUDA where the op has kernels, else the chunked
  reference; the row names the backend)
* ``nckernels-reference``: ``impl="reference"``, when ``auto`` picks another backend
* ``torch-eager``: dense PyTorch: ``B x C`` fp32 logits (the cosine matmul in the embeddings'
  dtype, in IEEE fp32 for fp32: PyTorch's default), ``F.cross_entropy``, autograd
* ``torch-compile``: ``torch.compile`` of ``torch-eager`` (one compiled function per loss)

Per contender and case: fwd+bwd time (``triton.testing.do_bench``, median); peak memory
(``torch.cuda.max_memory_allocated`` during one fwd+bwd minus what was allocated before it: the
inputs), split into the gradients it returns (``dW`` alone is ``C x D`` fp32: 2 GB at C = 1M,
D = 512) and the rest, the *workspace*, also given as a share of the dense ``B x C`` fp32 logits
(issue 6's target: at most 10 %); speedups against eager and compiled. Before timing, the loss
and gradients of ``torch-eager`` and nckernels are compared with a float64 run of the dense loss
on the same values (the first ``ORACLE_ROWS`` rows of a class-level case, the whole batch of a
pair-wise one); nckernels is flagged MISMATCH where its error exceeds both ``TOLERANCE`` and twice
eager's (``torch-compile`` is not checked: the check's smaller shape would compile it once more).
The GEMM floor is ``gemms x 2 B C D`` flops over the rate of one ``(B, D) x (D, C)`` matmul in
the embeddings' dtype, timed in the same run (3 GEMMs for autograd's dense backward, 4 for
nckernels' class losses, which recompute the cosines; ``C = B`` for the pair loss). A contender
that runs out of memory gets a row saying OOM. The exit status is 1 if any row is an error or a
MISMATCH.

``--tiny``: small shapes, a quick check. ``--device cpu``: the same code on CPU (times by
``perf_counter``, no memory numbers): ``--device cpu --tiny`` checks the script without a GPU
(``NCKERNELS_IMPL=triton TRITON_INTERPRET=1`` runs nckernels' Triton kernels in the interpreter;
bf16 ``tl.dot`` is wrong there). Writes ``margin.json`` and ``margin.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _margin_losses import CLASS_LOSSES, DENSE, LOSSES, make_inputs, nckernels_loss, rel_err, step  # noqa: E402
from nckernels import backend  # noqa: E402

CASES = ([(loss, 1024, 512, C) for C in (100_000, 1_000_000) for loss in CLASS_LOSSES]
         + [("pair_circle", B, 512, 0) for B in (1024, 4096)])  # (loss, B, D, C); C unused by pair_circle
TINY_CASES = [(loss, 64, 32, 2000) for loss in CLASS_LOSSES] + [("pair_circle", 64, 32, 0)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}  # relative loss / gradient error nckernels may always have
ORACLE_ROWS = 128  # rows of a class-level case checked against float64 (1 GB per B x C array at C = 1M)
CONTENDERS = ("torch-eager", "torch-compile", "nckernels", "nckernels-reference")  # torch-eager first: the reference


def make_timer(device, rep_ms):
    """``bench(fn) -> ms``: do_bench median on CUDA, a perf_counter median (at least 3 runs) on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")

    def cpu_ms(fn):
        fn()
        times, deadline = [], time.perf_counter() + rep_ms / 1e3
        while len(times) < 3 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    return cpu_ms


def matmul_tflops(B, D, C, dtype, device, bench):
    """Rate of one ``(B, D) x (D, C)`` matmul in ``dtype``."""
    a = torch.randn(B, D, device=device, dtype=dtype)
    b = torch.randn(C, D, device=device, dtype=dtype)
    return 2 * B * C * D / bench(lambda: a @ b.T) / 1e9


def peak_memory(run, device):
    """``(peak bytes of one run() above what was allocated before, bytes of the gradients it returns)``; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _, grads = run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, sum(g.numel() * g.element_size() for g in grads)


def contenders(loss, device, compiled, chosen):
    """``{name: (fn, backend label)}`` for ``loss``, restricted to ``chosen``."""
    auto = backend.choose(f"{loss}_loss", "auto", device)
    out = {"torch-eager": (DENSE[loss], "eager"), "torch-compile": (compiled[loss], "inductor"),
           "nckernels": (nckernels_loss(loss), auto)}
    if auto != "reference":
        out["nckernels-reference"] = (nckernels_loss(loss, impl="reference"), "reference")
    return {name: out[name] for name in chosen if name in out}


def oracle_check(loss, leaves, labels):
    """``errors(fn) -> (loss rel err, largest grad rel err)`` against float64 on the checked rows."""
    rows = len(labels) if loss == "pair_circle" else min(ORACLE_ROWS, len(labels))
    checked = (leaves[0][:rows].detach().requires_grad_(), *leaves[1:])
    oracle_loss, oracle_grads = step(DENSE[loss], tuple(t.detach().double().requires_grad_() for t in checked),
                                     labels[:rows])

    def errors(fn):
        value, grads = step(fn, checked, labels[:rows])
        return rel_err(value, oracle_loss), max(rel_err(g, r) for g, r in zip(grads, oracle_grads))

    return errors


def run_case(case, dtype_name, device, fns, bench):
    """Rows of one case: the check against float64, memory, time."""
    loss, B, D, C = case
    leaves, labels = make_inputs(loss, B, D, C, device=device, dtype=DTYPES[dtype_name])
    cols = B if loss == "pair_circle" else C
    tflops = matmul_tflops(B, D, cols, DTYPES[dtype_name], device, bench)
    errors = oracle_check(loss, leaves, labels)
    eager_err, rows = 0.0, []
    for name, (fn, label) in fns.items():
        gemms = 4 if name.startswith("nckernels") and loss != "pair_circle" else 3
        row = {"loss": loss, "B": B, "D": D, "C": cols, "dtype": dtype_name, "contender": name, "backend": label,
               "gemms": gemms, "matmul_tflops": tflops, "floor_ms": gemms * 2 * B * cols * D / tflops / 1e9,
               "logits_gb": B * cols * 4 / 1e9}
        try:
            if name != "torch-compile":
                row["loss_rel_err"], row["grad_rel_err"] = errors(fn)
                worst = max(row["loss_rel_err"], row["grad_rel_err"])
                if name == "torch-eager":
                    eager_err = worst
                else:
                    row["agrees"] = worst <= max(TOLERANCE[dtype_name], 2 * eager_err)
            row["loss_value"] = step(fn, leaves, labels)[0].item()  # warm-up (compilation)
            memory = peak_memory(lambda: step(fn, leaves, labels), device)
            if memory is not None:
                peak, grad_bytes = memory
                row.update(peak_extra_gb=peak / 1e9, grads_gb=grad_bytes / 1e9, workspace_gb=(peak - grad_bytes) / 1e9)
                row["workspace_pct_logits"] = 100 * row["workspace_gb"] / row["logits_gb"]
            row["ms_fwd_bwd"] = bench(lambda: step(fn, leaves, labels))
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as exc:  # one failing contender must not end the run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes only")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--rep-ms", type=int, default=300)
    args = p.parse_args()
    device = torch.device(args.device)
    losses = args.losses.split(",")
    cases = [c for c in (TINY_CASES if args.tiny else CASES) if c[0] in losses]
    os.makedirs(args.out, exist_ok=True)
    bench = make_timer(device, args.rep_ms)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "fp32_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(json.dumps(meta), flush=True)
    compiled = {loss: torch.compile(DENSE[loss]) for loss in losses}
    results = []
    for dtype_name in args.dtypes.split(","):
        for case in cases:
            fns = contenders(case[0], device, compiled, args.contenders.split(","))
            results += run_case(case, dtype_name, device, fns, bench)
    with open(os.path.join(args.out, "margin.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    text = markdown(meta, results)
    with open(os.path.join(args.out, "margin.md"), "w") as f:
        f.write(text)
    print(text)
    if any("error" in r or r.get("agrees") is False for r in results):
        sys.exit(1)


def _cell(row, key, fmt):
    return format(row[key], fmt) if key in row else "-"


def _speedup(row, peer):
    """``peer``'s time over ``row``'s, or "-" when the peer has no time."""
    return f"{peer['ms_fwd_bwd'] / row['ms_fwd_bwd']:.2f}x" if peer and "ms_fwd_bwd" in peer else "-"


def markdown(meta, results):
    lines = ["# Margin losses, fwd+bwd", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; commit {meta['commit']}; {meta['date']}. "
             f"fp32 matmuls in PyTorch: {'TF32' if meta['fp32_matmul_tf32'] else 'IEEE fp32'}. Workspace = peak "
             "extra memory minus the gradients returned; its share is of the dense B x C fp32 logits (B x B for "
             "pair_circle; target <= 10 %). Speedup = other's time / this row's. Errors of the loss and the "
             f"gradients are relative, against float64 on {ORACLE_ROWS} rows (the whole batch for pair_circle); "
             "MISMATCH: beyond twice eager's error and "
             + ", ".join(f"{tol:.0e} ({name})" for name, tol in TOLERANCE.items()) + ".", ""]
    cases = dict.fromkeys((r["loss"], r["B"], r["D"], r["C"], r["dtype"]) for r in results)
    for loss, B, D, C, dtype in cases:
        rows = [r for r in results if (r["loss"], r["B"], r["D"], r["C"], r["dtype"]) == (loss, B, D, C, dtype)]
        by = {r["contender"]: r for r in rows}
        shape = f"B={B}, D={D}" if loss == "pair_circle" else f"B={B}, D={D}, C={C:,}"
        lines += [f"## {loss}: {shape}, {dtype} embeddings (fp32 logits {rows[0]['logits_gb']:.2f} GB; "
                  f"{dtype} matmul {rows[0]['matmul_tflops']:.3g} TFLOP/s)", "",
                  "| contender | backend | fwd+bwd ms | GEMM floor ms | speedup vs eager | speedup vs compile | "
                  "peak extra GB | grads GB | workspace GB | workspace % of logits | loss rel err | grad rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['contender']} | {r['backend']} | {r['error']} |")
                continue
            flag = " MISMATCH" if r.get("agrees") is False else ""
            lines.append(
                f"| {r['contender']}{flag} | {r['backend']} | {r['ms_fwd_bwd']:.2f} | {r['floor_ms']:.2f} ({r['gemms']}) | "
                f"{_speedup(r, by.get('torch-eager'))} | {_speedup(r, by.get('torch-compile'))} | "
                f"{_cell(r, 'peak_extra_gb', '.3f')} | "
                f"{_cell(r, 'grads_gb', '.3f')} | {_cell(r, 'workspace_gb', '.3f')} | "
                f"{_cell(r, 'workspace_pct_logits', '.1f')} | {_cell(r, 'loss_rel_err', '.1e')} | "
                f"{_cell(r, 'grad_rel_err', '.1e')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
