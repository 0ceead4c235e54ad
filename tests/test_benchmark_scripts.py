"""Every measurement script in benchmarks/ starts against the installed package (its imports resolve, its
options parse): none of them is a timed test, but none may rot unnoticed. One interpreter runs each
script's `--help` in turn (the frameworks are imported once)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))
RUN_ALL = r"""
import contextlib, io, os, runpy, sys, traceback
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path[:0] = [os.path.dirname(path)]  # as `python benchmarks/X.py` puts its folder first
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        failed.append(f"{path}: --help did not exit")
    except SystemExit as exc:
        if exc.code not in (0, None) or "usage" not in out.getvalue().lower():
            failed.append(f"{path}: exit {exc.code}, output {out.getvalue()[:200]!r}")
    except BaseException:
        failed.append(f"{path}: {traceback.format_exc(limit=3)}")
print("\n".join(failed) or "all started")
"""


def test_the_scripts_are_all_here():
    assert len(SCRIPTS) >= 13 and not any("sys.path" in (REPO / "benchmarks" / s).read_text() for s in SCRIPTS)


@pytest.mark.integration
def test_every_benchmark_script_starts():
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, *(str(REPO / "benchmarks" / s) for s in SCRIPTS)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "all started", proc.stdout[-3000:] + proc.stderr[-2000:]
