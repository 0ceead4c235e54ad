"""Every measurement script in benchmarks/ starts against the installed package (its imports resolve, its
options parse): none of them is a timed test, but none may rot unnoticed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


def test_the_scripts_are_all_here():
    assert len(SCRIPTS) >= 13 and not any("sys.path" in (REPO / "benchmarks" / s).read_text() for s in SCRIPTS)


@pytest.mark.integration
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_starts(script):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stdout[-500:] + proc.stderr[-2000:]
