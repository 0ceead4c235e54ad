"""The GPU path without a GPU: what `make setup GPU=1` would run, and GPU utilisation read from nvidia-smi.
(No GPU machine ran it: the CUDA install itself is untested, see README.)"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import time

from conftest import REPO


def make_dry_run(*args: str, target: str = "setup") -> list[str]:
    out = subprocess.run(["make", "-n", "-B", target, *args], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_gpu_setup_uses_its_own_venv_and_the_cuda_builds():
    cpu, gpu = make_dry_run(), make_dry_run("GPU=1")
    assert not any(".venv-gpu" in l or "and-cuda" in l for l in cpu)
    assert all(not re.search(r"(^|[ /])\.venv/", l) and " .venv " not in l for l in gpu), gpu  # CPU venv untouched
    text = "\n".join(gpu)
    assert "uninstall --quiet -y torch tensorflow-cpu" in text and "tensorflow[and-cuda]==" in text
    assert "--index-url https://pypi.org/simple" in text and "-c .venv-gpu/constraints.txt" in text
    pins = dict(re.findall(r'"(torch|tensorflow-cpu)==([^"]+)"', (REPO / "pyproject.toml").read_text()))
    subs = re.findall(r"\$\((sed .*?pyproject\.toml)\)", text)
    versions = [subprocess.run(s, shell=True, cwd=REPO, capture_output=True, text=True).stdout.strip() for s in subs]
    assert versions == [pins["torch"], pins["tensorflow-cpu"]]  # the CUDA builds of the pinned versions
    bench = [l for l in make_dry_run("GPU=1", target="bench-sql") if "cnnsql bench" in l]
    assert bench == [".venv-gpu/bin/cnnsql bench --device cuda --engines torch,tensorflow"]
    assert [l for l in make_dry_run(target="bench-sql") if "cnnsql bench" in l] == [".venv/bin/cnnsql bench "]


def test_monitor_reads_gpu_utilisation_from_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo '42'; echo '58'; sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    from cnnsql.measure.monitor import ResourceMonitor

    with ResourceMonitor(interval=0.05) as mon:
        time.sleep(0.5)
    assert mon.summary()["gpu_pct"] == 50.0
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no nvidia-smi: no GPU figure, never a made-up one
    with ResourceMonitor(interval=0.05) as none:
        time.sleep(0.2)
    assert none.summary()["gpu_pct"] is None
