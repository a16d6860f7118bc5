"""The one place that decides which implementation runs a call.

``impl="auto"`` picks Triton for CUDA tensors (``impl="cuda"`` selects the CUDA C++ kernel of
an op that has one), the C++ CPU kernel where the op has one
(and it won its CPU benchmark), else the PyTorch reference. An explicit ``impl=`` wins;
otherwise the environment variable ``NCKERNELS_IMPL`` overrides ``auto`` for the ops that have that
backend (the others stay on ``auto``).
``NCKERNELS_IMPL=triton`` with ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU
tensors (used by the tests).
"""
from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "triton", "cuda", "cpp", "reference")

# Which backends each op has, and whether ``auto`` should prefer the C++ CPU kernel
# (only where the CPU benchmarks, benchmarks/bench_cpu*.py, show it beating the reference).
_OP_BACKENDS = {
    "linear_cross_entropy": {"backends": ("triton", "cpp", "reference"), "auto_cpu": "cpp"},
    "softmax": {"backends": ("triton", "reference"), "auto_cpu": "reference"},
    # C++ 2.4x the reference at 4096 x 32000 fp32 (benchmarks/results/cpu_rowwise.md), LSE residual included
    "cross_entropy": {"backends": ("triton", "cpp", "reference"), "auto_cpu": "cpp"},
    "stablemax_cross_entropy": {"backends": ("triton", "cpp", "reference"), "auto_cpu": "cpp"},
    # neural-collapse statistics (nckernels.collapse): family 2, family 3, family 1's argmax
    "class_stats": {"backends": ("triton", "cuda", "cpp", "reference"), "auto_cpu": "cpp"},
    "pair_stats": {"backends": ("triton", "reference"), "auto_cpu": "reference"},
    "linear_argmax": {"backends": ("triton", "reference"), "auto_cpu": "reference"},
    # margin losses (issue 6): Triton cosine logit transforms on the linear-reduce kernels; chunked reference
    "cosface_loss": {"backends": ("triton", "reference"), "auto_cpu": "reference"},
    "arcface_loss": {"backends": ("triton", "reference"), "auto_cpu": "reference"},
    "combined_margin_loss": {"backends": ("triton", "reference"), "auto_cpu": "reference"},
    "circle_loss": {"backends": ("triton", "reference"), "auto_cpu": "reference"},
    "pair_circle_loss": {"backends": ("triton", "reference"), "auto_cpu": "reference"},
}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result  # a constant of the call site: torch.compile bakes it in
def choose(op: str, impl: str, device: torch.device) -> str:
    """Return the backend name that runs ``op`` on ``device`` for the requested ``impl``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    spec = _OP_BACKENDS[op]
    if impl == "auto":
        impl = os.environ.get("NCKERNELS_IMPL", "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"NCKERNELS_IMPL must be one of {IMPLS}, got {impl!r}")
        if impl not in spec["backends"]:  # the environment's choice does not exist for this op: auto
            impl = "auto"
    if impl == "auto":
        if device.type == "cuda" and triton_available() and "triton" in spec["backends"]:
            return "triton"
        if device.type == "cpu" and spec["auto_cpu"] == "cpp":
            from . import _ext

            if _ext.get() is not None:
                return "cpp"
        return "reference"
    if impl not in spec["backends"]:
        raise ValueError(f"impl={impl!r} is not available for {op}; choose from {spec['backends']}")
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to "
                "run the kernels on CPU in the interpreter"
            )
    if impl == "cuda":
        from . import _ext

        if device.type != "cuda":
            raise ValueError(f"impl='cuda' runs on CUDA tensors, got {device.type}")
        if _ext.get_cuda() is None:
            raise RuntimeError(f"impl='cuda' needs the CUDA extension, which is unavailable: {_ext.cuda_error()}")
    if impl == "cpp":
        from . import _ext

        if device.type != "cpu":
            raise ValueError(f"impl='cpp' runs on CPU tensors, got {device.type}")
        if _ext.get() is None:
            raise RuntimeError(f"impl='cpp' needs the C++ extension, which is unavailable: {_ext.error()}")
    return impl
