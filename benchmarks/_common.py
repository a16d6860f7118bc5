"""Helpers shared by the CPU benchmarks: peak extra resident memory of one call, in a fresh process.

A benchmark script answers ``python SCRIPT --peak ARGS...`` by building its inputs, calling
:func:`peak_extra_rss` with one round of the contender, and printing the result as JSON on its
last line; :func:`peak_in_subprocess` runs that and parses it. Linux only (``/proc``).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_high_water_mark():
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_rss(run_once):
    """Peak resident memory (MiB) of one call of ``run_once()`` above the resident set before it.

    A warm-up call comes first (lazy inits, thread pools) when the high-water mark can be reset
    after it; otherwise the mark since process start is used, and the method says so."""
    resettable = _reset_high_water_mark()
    if resettable:
        run_once()
    _trim()
    base = _status_kib("VmRSS")
    if resettable:
        _reset_high_water_mark()
    out = run_once()
    peak = _status_kib("VmHWM")
    del out
    return {"peak_rss_mib": (peak - base) / 1024, "method": "VmHWM reset" if resettable else "VmHWM (no reset)"}


def peak_in_subprocess(script, *args):
    """Run ``python script --peak *args`` and return the JSON dict it prints last (NaN on failure)."""
    # default glibc malloc in the child: freed blocks go back to the OS, so RSS tracks live memory
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, script, "--peak", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        return {"peak_rss_mib": float("nan"), "method": f"failed: {proc.stderr[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
