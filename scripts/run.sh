#!/usr/bin/env bash
# The main job: `python -m nckernels [ARGS]` (with no arguments, the demo on its embedded default).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m nckernels "$@"
