"""GPU benchmark of the row-wise ops on explicit logits: softmax, logsumexp, cross-entropy, StableMax CE.

    python benchmarks/gpu_bench_rowwise.py --out DIR

For row lengths 1k..256k (about 2^27 elements per case; fp32 and bf16) and the LLM shape
8,192 x 128,256 (bf16), times (CUDA events, median) each op against PyTorch (eager and
``torch.compile``) and Liger-Kernel's cross-entropy, and reports effective bandwidth
``(bytes read + bytes written) / time`` with the minimal byte count of each op, next to the
device-to-device copy bandwidth measured in the same run. Writes ``rowwise.json`` and
``rowwise.md`` under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nckernels  # noqa: E402

ROW_LENGTHS = (1024, 4096, 16384, 65536, 262144)
ELEMENTS = 2**27


def copy_bandwidth():
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * 2**30 / t / 1e9


def cases(x, y):
    """name -> (contenders {label: fn}, memory passes of the minimal implementation)."""
    xg = x.detach().requires_grad_()
    dy = torch.randn_like(x)
    torch_ce = torch.compile(lambda a, t: F.cross_entropy(a.float(), t))
    out = {
        "softmax fwd": ({"nckernels": lambda: nckernels.softmax(x), "torch": lambda: torch.softmax(x, -1)}, 2),
        "softmax fwd+bwd": ({
            "nckernels": lambda: torch.autograd.grad(nckernels.softmax(xg), xg, dy),
            "torch": lambda: torch.autograd.grad(torch.softmax(xg, -1), xg, dy)}, 5),
        "logsumexp fwd": ({"nckernels": lambda: nckernels.logsumexp(x), "torch": lambda: torch.logsumexp(x, -1)}, 1),
        "cross_entropy fwd+bwd": ({
            "nckernels": lambda: torch.autograd.grad(nckernels.cross_entropy(xg, y), xg),
            "torch": lambda: torch.autograd.grad(F.cross_entropy(xg, y), xg),
            "torch.compile": lambda: torch.autograd.grad(torch_ce(xg, y), xg)}, 3),
        "stablemax_ce fwd+bwd": ({
            "nckernels": lambda: torch.autograd.grad(nckernels.stablemax_cross_entropy(xg, y), xg)}, 3),
    }
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        out["cross_entropy fwd+bwd"][0]["liger"] = lambda: torch.autograd.grad(liger(xg, y), xg)
    except Exception as exc:  # not carried
        print(f"liger unavailable: {exc}")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--rep-ms", type=int, default=300)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "copy_gb_s": copy_bandwidth()}
    print(json.dumps(meta), flush=True)
    shapes = [(ELEMENTS // c, c, dt) for c in ROW_LENGTHS for dt in (torch.float32, torch.bfloat16)]
    shapes.append((8192, 128256, torch.bfloat16))
    results = []
    for R, C, dtype in shapes:
        x = torch.randn(R, C, device="cuda", dtype=dtype) * 3
        y = torch.randint(0, C, (R,), device="cuda")
        for op, (fns, passes) in cases(x, y).items():
            for label, fn in fns.items():
                r = {"op": op, "impl": label, "rows": R, "cols": C, "dtype": str(dtype).removeprefix("torch.")}
                try:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")
                    r.update(ms=ms, gb_s=passes * R * C * x.element_size() / ms / 1e6)
                    r["frac_copy"] = r["gb_s"] / meta["copy_gb_s"]
                except Exception as exc:
                    r["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                print(json.dumps(r), flush=True)
                results.append(r)
        del x, y
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "rowwise.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = ["# Row-wise ops on explicit logits", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}. Copy bandwidth "
             f"(read + write) {meta['copy_gb_s']:.0f} GB/s. GB/s counts the minimal bytes of each op "
             "(softmax fwd: read + write; fwd+bwd: 5 passes; logsumexp: 1; CE fwd+bwd: 3).", "",
             "| op | rows x cols | dtype | impl | ms | GB/s | % of copy | vs torch |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['rows']}x{r['cols']} | {r['dtype']} | {r['impl']} | error: {r['error']} |")
            continue
        base = next((q for q in results if q["op"] == r["op"] and q["cols"] == r["cols"] and q["dtype"] == r["dtype"]
                     and q["impl"] == "torch" and "ms" in q), None)
        ratio = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        lines.append(f"| {r['op']} | {r['rows']}x{r['cols']} | {r['dtype']} | {r['impl']} | {r['ms']:.3f} | "
                     f"{r['gb_s']:.0f} | {100 * r['frac_copy']:.0f}% | {ratio} |")
    with open(os.path.join(args.out, "rowwise.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
