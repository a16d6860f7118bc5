"""Test configuration: backends x devices x dtypes, and the Triton interpreter on CPU.

Without CUDA the Triton kernels run in the Triton interpreter on CPU tensors, so
``TRITON_INTERPRET=1`` must be set before anything imports ``triton`` or
``nckernels.kernels``: it is set here, at conftest import, ahead of every test module.

Tests take one of these parameters (``pytest_generate_tests`` below):

* ``cfg``: a :class:`Config` (backend, device, dtype, tolerance) for every backend this
  machine can test: ``reference`` (CPU fp32 and bf16), ``cpp`` (CPU fp32; skipped when the
  C++ extension is unavailable), ``triton`` (interpreter on CPU: fp32 and fp16 -- not bf16, on
  which ``tl.dot`` is wrong in the interpreter; on a CUDA machine: cuda tensors in fp32, fp16
  and bf16, plus the reference on cuda).
* ``backend``: the fp32 config of each backend (full option grid; tests where the dtype does
  not matter).
* ``lowp_cfg``: the fp16 / bf16 configs (a covering subset of the option grid).
* ``triton_cfg``: the Triton configs only (determinism, gradient filtering).

The Triton configs are never skipped when the kernel module fails to import: such a
failure is a failure.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@dataclass(frozen=True)
class Config:
    impl: str
    device: str
    dtype: torch.dtype
    tol: float  # relative tolerance, measured against the largest |value| of the oracle tensor

    @property
    def id(self) -> str:
        return f"{self.impl}-{self.device}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def interpreted(self) -> bool:
        return self.impl == "triton" and self.device == "cpu"


def _configs():
    out = [
        (Config("reference", "cpu", torch.float32, 1e-5), ()),
        (Config("reference", "cpu", torch.bfloat16, 2e-2), ()),
        (Config("cpp", "cpu", torch.float32, 1e-5), ()),  # skipped by _skip_missing_cpp when unavailable
    ]
    if CUDA:
        out += [
            (Config("triton", "cuda", torch.float32, 1e-5), ()),
            (Config("triton", "cuda", torch.float16, 1e-2), ()),
            (Config("triton", "cuda", torch.bfloat16, 2e-2), ()),
            (Config("reference", "cuda", torch.float32, 1e-5), ()),
            (Config("reference", "cuda", torch.bfloat16, 2e-2), ()),
        ]
    else:  # Triton interpreter: fp32 and fp16 only (bf16 tl.dot is wrong in the interpreter)
        out += [
            (Config("triton", "cpu", torch.float32, 1e-5), ()),
            (Config("triton", "cpu", torch.float16, 1e-2), ()),
        ]
    return out


CONFIGS = _configs()


def _params(pred):
    return [pytest.param(c, id=c.id, marks=m) for c, m in CONFIGS if pred(c)]


def pytest_generate_tests(metafunc):
    if "cfg" in metafunc.fixturenames:
        metafunc.parametrize("cfg", _params(lambda c: True))
    if "backend" in metafunc.fixturenames:
        seen = set()

        def first_per_backend(c):
            key = (c.impl, c.device)
            if c.dtype != torch.float32 or key in seen:
                return False
            seen.add(key)
            return True

        metafunc.parametrize("backend", _params(first_per_backend))
    if "lowp_cfg" in metafunc.fixturenames:
        metafunc.parametrize("lowp_cfg", _params(lambda c: c.dtype != torch.float32))
    if "triton_cfg" in metafunc.fixturenames:
        metafunc.parametrize("triton_cfg", _params(lambda c: c.impl == "triton"))


@pytest.fixture
def one_thread():
    """Tiny ops: one intra-op thread (on a shared 2-core machine, two threads mostly spin)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@pytest.fixture
def deterministic():
    """Run the test under ``torch.use_deterministic_algorithms(True)``, then restore."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.fixture(autouse=True)
def _skip_missing_cpp(request):
    """Skip ``cpp`` configs when the C++ extension is unavailable (checked lazily, per test)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None:
        return
    for name in ("cfg", "backend"):
        c = callspec.params.get(name)
        if isinstance(c, Config) and c.impl == "cpp":
            from nckernels import _ext

            if _ext.get() is None:
                pytest.skip(f"C++ extension nckernels._C unavailable: {_ext.error()}")
