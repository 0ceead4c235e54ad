"""Every failure is one line `cnnsql: error: <problem> (<fix>)`: no traceback, no hang, nothing logged.
(A FIFO as --source: test_hostile_input; a port taken and a stale postmaster.pid: test_cluster_security;
`db stop` during a load: test_integrity.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration  # the CLI in subprocesses, Ray


def cli(*args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnsql", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def one_line(proc, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and "usage:" not in err, err
    lines = err.splitlines()
    assert len([l for l in lines if l.startswith("cnnsql: error:")]) == 1 and lines[-1].startswith("cnnsql: error:"), err
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize("args, needle", [
    (["--repetitions", "0"], "--repetitions: must be at least 1, got 0"),
    (["--sample", "0"], "--sample/--velox-sample: must be at least 1, got 0"),
    (["--limit", "-5"], "--limit: must be at least 1, got -5"),
    (["--warmup", "-1"], "--warmup: must be at least 0, got -1"),
    (["--threads", "two"], "--threads: expected an integer, got 'two'"),
])
def test_meaningless_bench_numbers_are_refused_before_anything_runs(args, needle):
    one_line(cli("bench", *args), needle, "cnnsql bench --help")


def test_unknown_engine_on_ray_is_one_line():
    one_line(cli("bench", "--cluster", "ray", "--engines", "caffe"), "unknown engine 'caffe'", "choose from")


def test_ray_on_an_empty_database_is_one_line(target):
    empty = f"cnnsql_empty_{uuid.uuid4().hex[:8]}"
    one_line(cli("bench", "--cluster", "ray", "--engines", "torch", CNNSQL_DB=empty),
             "no test images", "cnnsql load")


def read_only_runner(home) -> list[str]:
    """A command prefix that runs with `home` read-only: a private read-only bind mount as root
    (root ignores file modes), the folder's mode otherwise."""
    if os.geteuid() != 0:
        os.chmod(home, 0o555)
        return []
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("root without mount namespaces: cannot make a read-only folder")
    return ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{home}" "{home}" && exec "$0" "$@"']


def test_read_only_cnnsql_home_is_one_line(tmp_path):
    home = tmp_path / "ro"
    home.mkdir()
    prefix = read_only_runner(home)
    env = {**os.environ, "CNNSQL_HOME": str(home / "state")}
    for args in (["db", "start"], ["load", "--synthetic", "10", "--quiet"]):
        proc = subprocess.run([*prefix, sys.executable, "-m", "cnnsql", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=env)
        one_line(proc, "CNNSQL_HOME")
        assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr, proc.stderr
    assert not (home / "state").exists()
