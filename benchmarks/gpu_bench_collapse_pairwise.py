"""GPU benchmark of the neural-collapse kernels: pairwise class-mean statistics and NC4 argmax.

    python benchmarks/gpu_bench_collapse_pairwise.py --out DIR
    python benchmarks/gpu_bench_collapse_pairwise.py --tiny --out DIR   # CPU, TRITON_INTERPRET=1: code path only

(a) ``kernels.pairwise.pair_stats`` at K = 50,257 classes, D = 1,024 (fp32, TF32 off; p = 1 and 2)
    against one fp32 ``K x D x K`` GEMM ``M @ M.T`` (``torch.mm``, TF32 off), the work the kernel
    does twice over (it computes the upper triangle only). Target: < 3x the GEMM's time.
(b) NC4 at N = 32,768 tokens, C = 49,152 classes, D = 576 (bf16): two ``linear_argmax`` calls (the
    classifier ``x W^T`` and the nearest class mean ``argmax_c x (2 mu_c) - ||mu_c||^2``) against
    the two bf16 GEMMs (``x @ W.T`` and ``addmm(-||mu||^2, x, (2M).T)``) + ``argmax`` they replace.
    Target: <= 1.3x. Also reports the agreement of the two predictions (the GEMM path rounds its
    logits to bf16 before the argmax, the fused one keeps fp32).

Time: ``triton.testing.do_bench`` (CUDA events, median). Extra memory: the peak of
``torch.cuda.max_memory_allocated`` during a call minus what was allocated before it. Writes
``collapse_pairwise.json`` and ``collapse_pairwise.md`` under --out.
"""
from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nckernels.kernels.linear_reduce import linear_argmax  # noqa: E402
from nckernels.kernels.pairwise import pair_stats  # noqa: E402

FULL = dict(K=50257, D=1024, N=32768, C=49152, D4=576, dtype4=torch.bfloat16)
TINY = dict(K=100, D=32, N=64, C=96, D4=32, dtype4=torch.float32)  # bf16 tl.dot is wrong in the interpreter


def bench(fn, device, rep_ms):
    """(median ms, peak extra bytes)."""
    if device == "cuda":
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
        return ms, extra
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3, None


def case_pairwise(s, device, rep_ms):
    K, D = s["K"], s["D"]
    g = torch.Generator(device=device).manual_seed(0)
    m = torch.randn(K, D, device=device, generator=g)
    m -= m.mean(0)
    v = torch.rand(K, device=device, generator=g) + 0.5
    flop = 2 * K * K * D
    out = []
    ms, mem = bench(lambda: torch.mm(m, m.T), device, rep_ms)
    gemm = dict(case="pair_stats", impl="torch.mm M M^T (fp32, TF32 off)", shape=f"K={K} D={D}", ms=ms,
                extra_bytes=mem, tflops=flop / ms / 1e9)
    out.append(gemm)
    for p in (1, 2):
        ms, mem = bench(lambda: pair_stats(m, v, p), device, rep_ms)
        out.append(dict(case="pair_stats", impl=f"nckernels pair_stats p={p}", shape=f"K={K} D={D}", ms=ms,
                        extra_bytes=mem, tflops=flop / 2 / ms / 1e9, vs_baseline=ms / gemm["ms"], target="< 3x"))
    # sanity: cosine moments against a float64 computation of the same upper triangle (small K only)
    if K <= 4096:
        r = pair_stats(m, v, 1).cpu()
        md = m.double()
        nrm = md.norm(dim=1)
        c = (md @ md.T) / (nrm[:, None] * nrm[None, :])
        iu = torch.triu_indices(K, K, offset=1, device=device)
        out[-1]["check_cos_mean_err"] = abs(r[1, 1].item() - c[iu[0], iu[1]].mean().item())
    return out


def case_nc4(s, device, rep_ms):
    N, C, D, dt = s["N"], s["C"], s["D4"], s["dtype4"]
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(N, D, device=device, generator=g).to(dt)
    w = (torch.randn(C, D, device=device, generator=g) / D**0.5).to(dt)
    means = torch.randn(C, D, device=device, generator=g)
    w2 = (2 * means).to(dt)  # NCC as a linear head: argmax_c x . 2mu_c - ||mu_c||^2
    nb = -(means.double() ** 2).sum(1)
    nb[::97] = float("-inf")  # excluded classes
    nb32, nb_lo = nb.float(), nb.to(dt)

    def fused():
        return linear_argmax(x, w), linear_argmax(x, w2, nb32)

    def gemms():
        return (x @ w.T).argmax(1), torch.addmm(nb_lo, x, w2.T).argmax(1)

    flop = 2 * 2 * N * C * D
    out = []
    ms_b, mem_b = bench(gemms, device, rep_ms)
    base = dict(case="NC4 argmax", impl="2 GEMMs + argmax (torch)", shape=f"N={N} C={C} D={D} {dt}", ms=ms_b,
                extra_bytes=mem_b, tflops=flop / ms_b / 1e9)
    ms, mem = bench(fused, device, rep_ms)
    a, b = fused()
    ra, rb = gemms()
    out += [base, dict(case="NC4 argmax", impl="2 x nckernels linear_argmax", shape=base["shape"], ms=ms,
                       extra_bytes=mem, tflops=flop / ms / 1e9, vs_baseline=ms / ms_b, target="<= 1.3x",
                       agree_classifier=(a == ra).double().mean().item(), agree_ncc=(b == rb).double().mean().item())]
    return out


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default=None)
    p.add_argument("--out", dest="out_opt", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (code path only)")
    p.add_argument("--rep-ms", type=int, default=500)
    args = p.parse_args()
    out_dir = args.out_opt or args.out or os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    s = TINY if args.tiny else FULL
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
            "tiny": args.tiny}
    print(json.dumps(meta), flush=True)
    results = []
    for case in (case_pairwise, case_nc4):
        try:
            rows = case(s, device, args.rep_ms)
        except Exception as exc:
            rows = [dict(case=case.__name__, error=f"{type(exc).__name__}: {str(exc)[:200]}")]
        for r in rows:
            print(json.dumps(r, default=str), flush=True)
        results += rows
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "collapse_pairwise.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    lines = ["# Neural-collapse kernels: pairwise class-mean statistics, NC4 argmax", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}."
             + (" TINY SHAPES, interpreter: times mean nothing." if args.tiny else ""), "",
             "TFLOP/s counts the useful work (pair_stats: the upper triangle, K^2 D FLOPs; "
             "the GEMM: 2 K^2 D FLOPs). Ratio = time / time of the torch baseline in the same run.", "",
             "| case | shape | impl | ms | TFLOP/s | extra memory | ratio | target |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | | error: {r['error']} | | | | | |")
            continue
        ratio = f"{r['vs_baseline']:.2f}x" if "vs_baseline" in r else "-"
        lines.append(f"| {r['case']} | {r['shape']} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.1f} | "
                     f"{fmt_bytes(r['extra_bytes'])} | {ratio} | {r.get('target', '')} |")
    agree = [r for r in results if "agree_ncc" in r]
    if agree:
        lines += ["", f"Fused vs GEMM argmax agreement: classifier {agree[0]['agree_classifier']:.5f}, "
                  f"NCC {agree[0]['agree_ncc']:.5f} (the GEMM path rounds logits to {s['dtype4']})."]
    with open(os.path.join(out_dir, "collapse_pairwise.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
