"""Integrations with other libraries, imported lazily.

``nckernels.integrations.transformers`` patches Hugging Face causal LMs to compute their
training loss with :func:`nckernels.linear_cross_entropy` (no logits). ``patch`` and ``unpatch``
are re-exported here on first access, so ``import nckernels`` never imports ``transformers``.
"""
from __future__ import annotations

import importlib

__all__ = ["patch", "unpatch", "is_patched", "transformers"]

_LAZY = {"patch": "transformers", "unpatch": "transformers", "is_patched": "transformers"}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    if name == "transformers":
        return importlib.import_module(".transformers", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
