"""GPU benchmark of per-class statistics (counts, fp64 class sums, M2 about the class means).

    python benchmarks/gpu_bench_collapse_segment.py --out DIR [--n 32768 --d 1024 --c 50257 --zipf 1.1]
    python benchmarks/gpu_bench_collapse_segment.py --dry-run      # tiny shape, CPU, Triton interpreter

At the token-level neural-collapse shape (N = 32768 tokens, D = 1024, C = 50257 classes, labels
Zipf(1.1) over randomly permuted class ids: the top class holds ~14 % of the rows) and for bf16
and fp32 features, times (CUDA events, ``triton.testing.do_bench``, median):

* ``triton``: ``nckernels.kernels.segment.segment_stats`` (sort, class-aligned chunks, Chan merge);
* ``cuda``: ``nckernels.class_stats(..., impl="cuda")``: the CUDA C++ twin (csrc/cuda/class_stats_cuda.cu,
  one block per chunk, the same plan built with torch ops, a block per multi-chunk class for the merge);
* ``index_add``: the plain PyTorch reference (``h.double()``, ``bincount``, ``index_add_`` of the
  rows, the means, ``index_add_`` of the squared residual norms);
* ``onehot_gemm``: the one-hot GEMM of the Linguistic Collapse code (``onehot(y, C).double().T @
  h.double()`` in chunks of --onehot-rows tokens, then a second chunked pass for M2);
* floors: ``copy`` = ``features.clone()`` (moves 2x the feature bytes: the copy bandwidth) and
  ``zero_out`` = ``torch.zeros(C, D, float64)`` (the write of the dense output alone).

Reported per contender: ms; the read bandwidth ``feature bytes / time`` and its fraction of the
copy bandwidth; the *minimal-bytes* bandwidth ``(feature bytes + C D 8 output bytes) / time`` and
its fraction of copy bandwidth (at C = 50257, D = 1024 the fp64 output is 412 MB against 64 MB
of bf16 features, so it, not the feature read, is the floor); speed-ups vs ``index_add`` and
``onehot_gemm``; the largest relative difference from ``index_add``'s result. Writes
``segment.json`` and ``segment.md`` under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--c", type=int, default=50257)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--rep-ms", type=int, default=300)
    p.add_argument("--onehot-rows", type=int, default=1024, help="tokens per one-hot chunk (C x rows fp64)")
    p.add_argument("--skip-onehot", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="tiny shape on CPU under TRITON_INTERPRET=1 (no timing)")
    args = p.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.n, args.d, args.c, args.onehot_rows = 96, 12, 40, 32
    return args


ARGS = parse()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nckernels  # noqa: E402
from nckernels.kernels.segment import segment_stats  # noqa: E402


def zipf_labels(N, C, s, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    p = torch.arange(1, C + 1, device=device, dtype=torch.float64) ** -s
    ranks = torch.multinomial(p / p.sum(), N, replacement=True, generator=g)
    return torch.randperm(C, device=device, generator=g)[ranks]  # frequent classes at random ids


def index_add_ref(h, y, C):
    hd = h.double()
    counts = torch.bincount(y, minlength=C)
    sums = torch.zeros(C, h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, y, hd)
    means = sums / counts.clamp(min=1).unsqueeze(1)
    m2 = torch.zeros(C, dtype=torch.float64, device=h.device).index_add_(0, y, (hd - means[y]).square().sum(1))
    return counts, sums, m2


def onehot_gemm(h, y, C, rows):
    """Linguistic-Collapse style: class sums as ``onehot.T @ h`` in fp64, chunked over tokens, then
    a second chunked pass for the squared residual norms about the means."""
    N, D = h.shape
    sums = torch.zeros(C, D, dtype=torch.float64, device=h.device)
    counts = torch.zeros(C, dtype=torch.float64, device=h.device)
    for i in range(0, N, rows):
        oh = F.one_hot(y[i:i + rows], C).double()
        sums += oh.T @ h[i:i + rows].double()
        counts += oh.sum(0)
    means = sums / counts.clamp(min=1).unsqueeze(1)
    m2 = torch.zeros(C, dtype=torch.float64, device=h.device)
    for i in range(0, N, rows):
        oh = F.one_hot(y[i:i + rows], C).double()
        m2 += oh.T @ (h[i:i + rows].double() - means[y[i:i + rows]]).square().sum(1)
    return counts.long(), sums, m2


def rel_diff(a, b):
    out = 0.0
    for u, v in zip(a, b):
        u, v = u.double(), v.double()
        out = max(out, ((u - v).abs().max() / v.abs().max().clamp(min=1e-300)).item())
    return out


def timed(fn, rep_ms):
    if ARGS.dry_run:
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def main():
    device = "cpu" if ARGS.dry_run else "cuda"
    N, D, C = ARGS.n, ARGS.d, ARGS.c
    os.makedirs(ARGS.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run, Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
            "N": N, "D": D, "C": C, "zipf": ARGS.zipf, "dry_run": ARGS.dry_run}
    y = zipf_labels(N, C, ARGS.zipf, device)
    counts = torch.bincount(y, minlength=C)
    meta.update(classes_present=int((counts > 0).sum()), singletons=int((counts == 1).sum()),
                top_class_frac=float(counts.max()) / N)
    print(json.dumps(meta), flush=True)
    out_bytes = C * D * 8
    results = []
    for dt in ARGS.dtypes.split(","):
        dtype = getattr(torch, dt)
        h = torch.randn(N, D, device=device).to(dtype)
        feat_bytes = h.numel() * h.element_size()
        t_copy = timed(lambda: h.clone(), ARGS.rep_ms)
        t_zero = timed(lambda: torch.zeros(C, D, dtype=torch.float64, device=device), ARGS.rep_ms)
        copy_gb_s = 2 * feat_bytes / t_copy / 1e6
        ref = index_add_ref(h, y, C)
        fns = {"triton": lambda: segment_stats(h, y, C, -100), "index_add": lambda: index_add_ref(h, y, C)}
        if device == "cuda":  # the CUDA C++ kernel (csrc/cuda, JIT-built on first use; an error row if it cannot be)
            fns["cuda"] = lambda: tuple(nckernels.class_stats(h, y, C, impl="cuda"))
        if not ARGS.skip_onehot:
            fns["onehot_gemm"] = lambda: onehot_gemm(h, y, C, ARGS.onehot_rows)
        base = {"dtype": dt, "feature_bytes": feat_bytes, "output_bytes": out_bytes, "copy_ms": t_copy,
                "copy_gb_s": copy_gb_s, "zero_out_ms": t_zero,
                "floor_ms": (feat_bytes + out_bytes) / (copy_gb_s * 1e6)}  # minimal bytes at copy bandwidth
        print(json.dumps(base), flush=True)
        for name, fn in fns.items():
            r = dict(base, impl=name)
            try:
                r["max_rel_diff_vs_index_add"] = rel_diff(fn(), ref)
                ms = timed(fn, ARGS.rep_ms if name != "onehot_gemm" else max(ARGS.rep_ms // 10, 1))
                r.update(ms=ms, read_gb_s=feat_bytes / ms / 1e6, min_bytes_gb_s=(feat_bytes + out_bytes) / ms / 1e6)
                r.update(read_frac_copy=r["read_gb_s"] / copy_gb_s, min_bytes_frac_copy=r["min_bytes_gb_s"] / copy_gb_s)
            except Exception as exc:  # e.g. out of memory for the one-hot at a large --onehot-rows
                r["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            print(json.dumps(r), flush=True)
            results.append(r)
        del h
        if device == "cuda":
            torch.cuda.empty_cache()
    for r in results:
        for peer in ("index_add", "onehot_gemm"):
            q = next((q for q in results if q["dtype"] == r["dtype"] and q["impl"] == peer and "ms" in q), None)
            if q and "ms" in r:
                r[f"speedup_vs_{peer}"] = q["ms"] / r["ms"]
    with open(os.path.join(ARGS.out, "segment.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = ["# Per-class statistics (counts, fp64 sums, M2)", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}. N = {N}, D = {D}, "
             f"C = {C}, Zipf({ARGS.zipf}) labels: {meta['classes_present']} classes present, {meta['singletons']} "
             f"singletons, top class {100 * meta['top_class_frac']:.1f} % of rows. Read GB/s = feature bytes / time; "
             "min-bytes GB/s = (feature bytes + C D 8 bytes of fp64 output) / time; both as % of the copy bandwidth "
             "(2 x feature bytes / time of `features.clone()`). Floor = min bytes at copy bandwidth.", ""]
    for dt in ARGS.dtypes.split(","):
        b = next((r for r in results if r["dtype"] == dt), None)
        if b:
            lines.append(f"- {dt}: copy {b['copy_ms']:.3f} ms ({b['copy_gb_s']:.0f} GB/s); zero fill of the "
                         f"{out_bytes / 1e6:.0f} MB output {b['zero_out_ms']:.3f} ms; floor {b['floor_ms']:.3f} ms")
    lines += ["", "| dtype | impl | ms | read GB/s | read % of copy | min-bytes GB/s | min-bytes % of copy | "
              "vs index_add | vs onehot_gemm | max rel diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['impl']} | error: {r['error']} |")
            continue
        sp = [f"{r[k]:.2f}x" if k in r else "-" for k in ("speedup_vs_index_add", "speedup_vs_onehot_gemm")]
        lines.append(f"| {r['dtype']} | {r['impl']} | {r['ms']:.3f} | {r['read_gb_s']:.0f} | "
                     f"{100 * r['read_frac_copy']:.0f}% | {r['min_bytes_gb_s']:.0f} | "
                     f"{100 * r['min_bytes_frac_copy']:.0f}% | {sp[0]} | {sp[1]} | {r['max_rel_diff_vs_index_add']:.1e} |")
    with open(os.path.join(ARGS.out, "segment.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
