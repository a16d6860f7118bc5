#!/usr/bin/env bash
# The tests, as CI runs them: bootstrap .venv, then pytest (Triton kernels in the interpreter,
# since CI has no GPU), then one smoke round of the CPU benchmarks.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1
python -m pytest tests -q -p no:cacheprovider "$@"
python -m pytest benchmarks/bench_cpu.py -q -p no:cacheprovider --benchmark-disable -k smoke
python -m pytest benchmarks/bench_cpu_collapse.py -q -p no:cacheprovider --benchmark-disable -k smoke
python -m pytest benchmarks/bench_cpu_rowwise.py -q -p no:cacheprovider --benchmark-disable -k smoke
python -m pytest benchmarks/bench_cpu_margin.py -q -p no:cacheprovider --benchmark-disable -k smoke
