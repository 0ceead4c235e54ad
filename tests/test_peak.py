"""A child's own peak memory (cnnsql.measure.peak): its VmHWM, not the parent's size that ru_maxrss starts from."""
from __future__ import annotations

import os
import subprocess
import sys

from cnnsql.measure import peak


def _run(*args: str) -> tuple[int, str, float]:
    """(exit code, stderr, ru_maxrss MB from wait4) of `python -m cnnsql.measure.peak ARGS`."""
    proc = subprocess.Popen([sys.executable, "-m", "cnnsql.measure.peak", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    return proc.returncode, err, usage.ru_maxrss / 1024


def test_the_child_reports_its_own_peak_not_its_large_parents():
    big = bytearray(400 << 20)
    big[::4096] = b"\1" * len(big[::4096])  # 400 MB resident in this (the parent) process
    code, err, maxrss = _run("-m", "platform")
    del big
    reported = peak.read_reported(err)
    assert code == 0, err
    assert maxrss > 400, maxrss  # what wait4 says: the parent's size, kept across the child's exec
    assert reported is not None and 5 < reported < 150, (reported, err)


def test_exit_code_passes_through_and_the_peak_is_still_reported():
    code, err, _ = _run("-m", "cnnsql", "no-such-command")
    assert code != 0
    assert peak.read_reported(err) is not None, err
    assert err.rstrip().splitlines()[-1].startswith(peak.PREFIX)


def test_usage_and_unreadable_reports():
    code, err, _ = _run("platform")
    assert code != 0 and "usage" in err
    assert peak.read_reported("nothing here\n") is None
    assert peak.read_reported(f"{peak.PREFIX} None\n") is None
    assert peak.read_reported(f"x\n{peak.PREFIX} 2048\n") == 2.0
    assert peak.own_peak_kb() > 0
