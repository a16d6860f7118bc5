"""Tile-shape sweep for the linear cross-entropy Triton kernels (GPU).

    python benchmarks/gpu_tune.py [--shape gemma2-2b] [--configs m,v,k,warps,stages;...]

For each block configuration (set through ``NCKERNELS_LCE_TILES``) it checks the loss and
gradients on a slice against the float64 reference, then times the forward and fwd+bwd
(atomic, deterministic) at the full shape. Prints one JSON line per configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nckernels  # noqa: E402
from gpu_bench import SHAPES, peaked_inputs  # noqa: E402

DEFAULT = "128,128,64,8,3;128,256,64,8,3;128,128,64,4,4;64,128,64,4,3;128,128,32,8,4;256,128,64,8,3"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(n=512):
    """Relative error of loss/dx/dw/db vs float64, options on, bf16 and fp32."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        h, w, y = peaked_inputs(n, 320, 5003, dtype, seed=1, ignore_frac=0.1)
        b = (0.1 * torch.randn(5003, device="cuda")).to(dtype).requires_grad_()
        cw = torch.rand(5003, device="cuda")
        kw = dict(weight=cw, label_smoothing=0.1, z_loss=1e-4, softcap=15.0)
        loss = nckernels.linear_cross_entropy(h, w, y, linear_bias=b, **kw)
        g = torch.autograd.grad(loss, (h, w, b))
        h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
        ref = nckernels.linear_cross_entropy(h64.float(), w64.float(), y, linear_bias=b64.float(), impl="reference", **kw)
        gref = torch.autograd.grad(ref, (h64, w64, b64))
        out[str(dtype)] = [abs(loss.item() - ref.item()) / abs(ref.item())] + [rel(a, r) for a, r in zip(g, gref)]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="gemma2-2b")
    p.add_argument("--configs", default=DEFAULT)
    args = p.parse_args()
    N, D, V = SHAPES[args.shape]
    h, w, y = peaked_inputs(N, D, V, torch.bfloat16)

    def step():
        torch.autograd.grad(nckernels.linear_cross_entropy(h, w, y), (h, w))

    def fwd():
        with torch.no_grad():
            nckernels.linear_cross_entropy(h, w, y)

    for cfg in args.configs.split(";"):
        os.environ["NCKERNELS_LCE_TILES"] = cfg
        r = {"tiles": cfg}
        try:
            r["check"] = check()
            r["ms_fwd"] = triton.testing.do_bench(fwd, warmup=25, rep=300, return_mode="median")
            r["ms_fwd_bwd"] = triton.testing.do_bench(step, warmup=25, rep=800, return_mode="median")
            torch.use_deterministic_algorithms(True)
            r["ms_fwd_bwd_det"] = triton.testing.do_bench(step, warmup=25, rep=800, return_mode="median")
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            torch.use_deterministic_algorithms(False)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
