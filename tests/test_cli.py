"""The command line: `python -m nckernels demo` trains a tiny LM twice and compares the losses."""
import re
import subprocess
import sys


def test_demo_small_run_agrees_with_pytorch():
    out = subprocess.run(
        [sys.executable, "-m", "nckernels", "demo", "--steps", "3", "--batch", "2", "--seq", "16", "--vocab", "512",
         "--hidden", "32", "--layers", "1", "--impl", "reference"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    worst = float(re.search(r"max relative loss difference over 3 steps: (\S+)", out.stdout).group(1))
    assert worst < 1e-4
    for name in ("torch", "nckernels"):
        assert re.search(rf"{name}: median step +\d+\.\d ms, peak RSS +\d+ MiB", out.stdout), out.stdout


def test_help_lists_both_jobs_and_collapse_is_the_default():
    out = subprocess.run([sys.executable, "-m", "nckernels", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout and "collapse" in out.stdout
    out = subprocess.run([sys.executable, "-m", "nckernels", "--max-tokens", "-1"], capture_output=True, text=True,
                         timeout=120)  # no subcommand: the options go to `collapse`, which rejects this one
    assert out.returncode != 0 and "--max-tokens" in out.stderr
