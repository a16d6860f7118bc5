"""GPU benchmark of fused linear cross-entropy: nckernels against its peers, fwd+bwd.

    python benchmarks/gpu_bench.py --out DIR [--shapes gemma2-2b,llama3-8b] [--contenders ...]

Times with CUDA events (``triton.testing.do_bench``, median); peak memory is the CUDA
allocator's peak during one fwd+bwd minus what was allocated before it (the inputs), so it
includes the gradients. Hidden states are *peaked* like a trained LM's: ``h = s (w_y + noise)``
with ``s`` drawn per token, so most of the softmax mass sits on the target and gradient
filtering can skip most tiles, as it would in training (uniform random data would make it
look either magically fast or useless). Also measures the two floors: the bf16 matmul rate
and the device-to-device copy bandwidth. Writes ``bench.json`` and ``bench.md`` under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nckernels  # noqa: E402

SHAPES = {  # name: (N tokens, D hidden, V vocabulary)
    "gemma2-2b": (8192, 2304, 256000),
    "llama3-8b": (8192, 4096, 128256),
}


def peaked_inputs(N, D, V, dtype, seed=0, ignore_frac=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(V, D, device="cuda", generator=g) / math.sqrt(D)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    noise = torch.randn(N, D, device="cuda", generator=g) / math.sqrt(D)
    scale = torch.empty(N, 1, device="cuda").uniform_(8.0, 18.0, generator=g)
    h = scale * (w[y] + 0.6 * noise)
    if ignore_frac:
        y[torch.rand(N, device="cuda", generator=g) < ignore_frac] = -100
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), y


def contenders():
    F = torch.nn.functional
    out = {}

    def eager(h, w, y):
        return F.cross_entropy((h @ w.T).float(), y)

    out["torch-eager"] = eager
    compiled = torch.compile(eager)
    out["torch-compile"] = lambda h, w, y: compiled(h, w, y)
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()
        out["torch-chunked"] = lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, w, y: liger(w, h, y)
    except Exception as exc:  # not carried / incompatible
        print(f"liger unavailable: {exc}")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = lambda h, w, y: cce(h, w, y)
        out["cce_exact"] = lambda h, w, y: cce(h, w, y, filter_eps=None)
    except Exception as exc:
        print(f"cut-cross-entropy unavailable: {exc}")
    out["nck"] = lambda h, w, y: nckernels.linear_cross_entropy(h, w, y)
    out["nck-filter"] = lambda h, w, y: nckernels.linear_cross_entropy(h, w, y, grad_filter=2.0**-12)

    def nck_det(h, w, y):
        torch.use_deterministic_algorithms(True)
        try:
            return nckernels.linear_cross_entropy(h, w, y)
        finally:
            torch.use_deterministic_algorithms(False)

    out["nck-deterministic"] = nck_det
    return out


def measure(fn, h, w, y, rep_ms):
    def step():
        loss = fn(h, w, y)
        torch.autograd.grad(loss, (h, w))

    def fwd():
        with torch.no_grad():
            fn(h, w, y)

    step()  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    t_total = triton.testing.do_bench(step, warmup=max(25, rep_ms // 10), rep=rep_ms, return_mode="median")
    t_fwd = triton.testing.do_bench(fwd, warmup=25, rep=max(50, rep_ms // 3), return_mode="median")
    return {"ms_fwd_bwd": t_total, "ms_fwd": t_fwd, "peak_extra_gb": peak / 1e9}


def floors():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    tflops = 2 * 8192**3 / t / 1e9
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return {"bf16_matmul_tflops": tflops, "copy_tb_s": 2 * 2**30 / t / 1e9}


def accuracy(h, w, y):
    """Relative errors of each contender's loss and gradients against a float64 computation
    on the same (bf16-valued) inputs, on a slice of the tokens."""
    n = 1024
    hs, ys = h[:n].detach().requires_grad_(), y[:n]
    h64, w64 = hs.double().detach().requires_grad_(), w.double().detach().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h64 @ w64.T, ys)
    gref = torch.autograd.grad(ref, (h64, w64))
    return ref, gref, hs, ys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--contenders", default="")
    p.add_argument("--rep-ms", type=int, default=1500)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    meta.update(floors())
    print(json.dumps(meta), flush=True)
    all_fns = contenders()
    chosen = [c for c in args.contenders.split(",") if c] or list(all_fns)
    results = []
    for shape in args.shapes.split(","):
        N, D, V = SHAPES[shape]
        h, w, y = peaked_inputs(N, D, V, torch.bfloat16)
        flops = 4 * 2 * N * D * V
        ref, gref, hs, ys = accuracy(h, w, y)
        for name in chosen:
            fn = all_fns[name]
            try:
                r = measure(fn, h, w, y, args.rep_ms)
                loss = fn(hs, w, ys)
                g = torch.autograd.grad(loss, (hs, w))
                r["err_loss"] = abs(loss.double().item() - ref.item()) / abs(ref.item())
                r["err_dx"] = ((g[0].double() - gref[0]).norm() / gref[0].norm()).item()
                r["err_dw"] = ((g[1].double() - gref[1]).norm() / gref[1].norm()).item()
            except Exception as exc:
                r = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            r.update(shape=shape, contender=name)
            if "ms_fwd_bwd" in r:
                r["tflops_4x"] = flops / r["ms_fwd_bwd"] / 1e9
                r["frac_matmul_rate"] = r["tflops_4x"] / meta["bf16_matmul_tflops"]
            print(json.dumps(r), flush=True)
            results.append(r)
            torch.cuda.empty_cache()
        del h, w, y
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(markdown(meta, results))
    print(markdown(meta, results))


def markdown(meta, results):
    lines = [f"# Linear cross-entropy, fwd+bwd, bf16, peaked hidden states", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; commit {meta['commit']}; {meta['date']}.",
             f"Floors measured in the same run: bf16 matmul {meta['bf16_matmul_tflops']:.0f} TFLOP/s, "
             f"copy {meta['copy_tb_s']:.2f} TB/s.", ""]
    for shape in dict.fromkeys(r["shape"] for r in results):
        N, D, V = SHAPES[shape]
        floor_ms = 4 * 2 * N * D * V / meta["bf16_matmul_tflops"] / 1e9
        rows = [r for r in results if r["shape"] == shape]
        by = {r["contender"]: r for r in rows}
        lines += [f"## {shape}: N={N}, D={D}, V={V} (matmul floor for 4x2NDV: {floor_ms:.1f} ms)", "",
                  "| contender | fwd+bwd ms | fwd ms | extra peak GB | % of matmul rate | vs cce_exact | vs liger | vs cce | "
                  "loss rel err | dx rel err | dW rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['contender']} | error: {r['error']} |")
                continue
            ratio = lambda peer: (f"{r['ms_fwd_bwd'] / by[peer]['ms_fwd_bwd']:.2f}x"
                                  if peer in by and "ms_fwd_bwd" in by[peer] else "-")
            lines.append(f"| {r['contender']} | {r['ms_fwd_bwd']:.1f} | {r['ms_fwd']:.1f} | {r['peak_extra_gb']:.2f} | "
                         f"{100 * r['frac_matmul_rate']:.0f}% | {ratio('cce_exact')} | {ratio('liger')} | {ratio('cce')} | "
                         f"{r['err_loss']:.1e} | {r['err_dx']:.1e} | {r['err_dw']:.1e} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
