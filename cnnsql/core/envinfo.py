"""What a result was measured on: host, framework versions, git commit."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path

PACKAGES = ("torch", "tensorflow-cpu", "tensorflow", "pyvelox", "pyarrow", "evadb", "numpy", "pandas", "ray",
            "psycopg2-binary", "cnnsql")


@functools.cache
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@functools.cache
def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
        return proc.stdout.strip() + ("-dirty" if dirty else "") if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor()): figures compare only on one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or None


def host() -> str:
    import os

    model = cpu_model()
    return (f"{socket.gethostname()} ({platform.machine()}{', ' + model if model else ''}, {os.cpu_count()} cpus, "
            f"{platform.system()})")
