#!/usr/bin/env bash
# The whole GPU check in one call: GPU tests, then every benchmark; results under $OUT:
# suite.log, results.md (every table) and results.tar.gz (every JSON and table), since at most
# 8 files come back from the device.
#   bash benchmarks/gpu_suite.sh            (on the device machine, from the repo root)
# Peer libraries (liger-kernel, cut-cross-entropy) are taken from .whl/*.whl when present
# (the device machine has no package registry); contenders that fail to import are skipped.
# Env: SKIP_TESTS=1, SKIP_BENCH=1, TUNE=1 (tile sweep first), BENCH_ARGS, MARGIN_ARGS (gpu_bench_margin.py),
# PYTEST_ARGS. One device command may run 10 minutes at most: if the whole suite does not fit, run it
# in two calls, SKIP_BENCH=1 (the tests) then SKIP_TESTS=1 (the benchmarks), each fetching its $OUT.
set -uo pipefail
OUT=${OUT:-out}
RAW="$OUT/raw"
mkdir -p "$RAW"
exec > >(tee "$OUT/suite.log") 2>&1
export PYTHONUNBUFFERED=1 NCKERNELS_NO_JIT=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest tests -q -x -p no:cacheprovider ${PYTEST_ARGS:-} || status=1
fi
if [ "${TUNE:-0}" = 1 ]; then
  python3 benchmarks/gpu_tune.py || status=1
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 benchmarks/gpu_bench.py --out "$RAW" ${BENCH_ARGS:-} || status=1
  python3 benchmarks/gpu_bench_rowwise.py --out "$RAW" || status=1
  python3 benchmarks/gpu_bench_collapse_segment.py --out "$RAW" || status=1
  python3 benchmarks/gpu_bench_collapse_pairwise.py --out "$RAW" || status=1
  python3 benchmarks/gpu_bench_collapse_pipeline.py --out "$RAW" || status=1
  python3 benchmarks/gpu_bench_margin.py --out "$RAW" ${MARGIN_ARGS:-} || status=1
fi
for f in "$RAW"/*.md; do echo "## $(basename "$f" .md)"; echo; cat "$f"; echo; done > "$OUT/results.md"
tar czf "$OUT/results.tar.gz" -C "$RAW" . && rm -rf "$RAW"
exit $status
