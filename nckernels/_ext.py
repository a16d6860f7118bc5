"""Load the C++ extensions: ``nckernels._C`` (CPU) and the CUDA kernels of ``csrc/cuda``.

``get()`` returns the CPU module (prebuilt by setup.py, else JIT-compiled with ninja) or
``None``; the package works without it (reference path) and warns once. ``NCKERNELS_NO_JIT=1``
disables the JIT fallback. ``get_cuda()`` JIT-compiles ``csrc/cuda/*.cu`` with nvcc on first
use on a CUDA machine (torch caches the build) and returns ``None`` where that is impossible
(no GPU, a CPU build of torch, no nvcc); ``cuda_error()`` says why.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

_error: str | None = None


@functools.lru_cache(maxsize=None)
def get():
    global _error
    try:
        from . import _C  # type: ignore[attr-defined]

        return _C
    except ImportError as exc:
        _error = f"prebuilt nckernels._C not found ({exc})"
    if os.environ.get("NCKERNELS_NO_JIT", "0") != "1":
        sources = sorted(str(p) for p in (Path(__file__).parent.parent / "csrc").glob("*.cpp"))
        if sources:
            try:
                from torch.utils.cpp_extension import load

                return load(
                    name="nckernels_C",
                    sources=sources,
                    extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as exc:  # compiler or ninja missing, build error
                _error += f"; JIT build failed ({type(exc).__name__}: {exc})"
        else:
            _error += "; csrc/ sources not found for a JIT build"
    warnings.warn(f"nckernels: C++ extension unavailable, using the PyTorch reference path: {_error}")
    return None


def error() -> str | None:
    """Why the extension is unavailable (``None`` if it loaded or was never asked for)."""
    return _error


_cuda_error: str | None = None


@functools.lru_cache(maxsize=None)
def get_cuda():
    global _cuda_error
    import torch

    if not torch.cuda.is_available():
        _cuda_error = "no CUDA device (or a CPU build of torch)"
        return None
    sources = sorted(str(p) for p in (Path(__file__).parent.parent / "csrc" / "cuda").glob("*.cu"))
    try:
        from torch.utils.cpp_extension import load

        return load(name="nckernels_cuda", sources=sources, extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as exc:  # nvcc or ninja missing, build error
        _cuda_error = f"JIT build of {sources} failed ({type(exc).__name__}: {exc})"
        return None


def cuda_error() -> str | None:
    """Why the CUDA extension is unavailable (``None`` if it loaded or was never asked for)."""
    return _cuda_error
