"""Build script: the package metadata lives in pyproject.toml; this file adds the C++ extension.

``nckernels._C`` is built from ``csrc/*.cpp`` with torch's ``CppExtension`` (ninja, OpenMP).
Install into an environment that already has the torch you want, without build isolation, so
that pip never pulls another torch build::

    pip install --no-build-isolation -e .

``NCKERNELS_NO_EXT=1`` skips the extension (the package then uses its PyTorch reference path,
or JIT-builds ``csrc/`` on first use; see ``nckernels/_ext.py``).
"""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def extensions():
    if os.environ.get("NCKERNELS_NO_EXT", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    ext = CppExtension(
        "nckernels._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        # no FP traps / errno: lets GCC if-convert and vectorise the branch-free exp/tanh loops
        extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
