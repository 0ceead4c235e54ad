"""A local Ray run listens on loopback only, keeps its folder private and never ships the password.

The run uses a DSN that carries the private cluster's password (TCP, as an external server would be
given), so the password must reach the workers through a 0600 pgpass file, not an actor argument.
"""
from __future__ import annotations

import ipaddress
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from cnnsql import db
from cnnsql.placements import ray_local
from cnnsql.placements import ray_worker
from conftest import REPO

N = 4000


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def listeners(pid: int) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of the process and its descendants."""
    root = psutil.Process(pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            name = p.name()
            out += [(name, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def password_dsn(target) -> tuple[str, str]:
    cluster = db.private_cluster()
    password = cluster.pgpass.read_text().split("\n")[0].rsplit(":", 1)[1]
    info = {**cluster.tcp_conninfo(target.params()["dbname"]), "password": password}
    return " ".join(f"{k}={v}" for k, v in info.items()), password


def test_local_ray_listens_on_loopback_only_with_a_private_folder(loaded, target, random_weights_file):
    dsn, password = password_dsn(target)
    home = Path(tempfile.mkdtemp(prefix="crs", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "CNNSQL_HOME": str(home), "CNNSQL_DSN": dsn, "PGPASSFILE": "/nonexistent"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnsql", "bench", "--cluster", "ray", "--engines", "torch", "--workers", "2",
         "--limit", str(N), "--repetitions", "2", "--weights", str(random_weights_file)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, cmdlines = [], []
    for line in proc.stderr:
        if "pids [" in line:  # workers are up: Ray's whole process tree exists now
            seen = listeners(proc.pid)
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    cmdlines.append(" ".join(p.cmdline()))
                except psutil.NoSuchProcess:
                    pass
            mode = stat.S_IMODE((home / "ray").stat().st_mode)
            pgpass_mode = stat.S_IMODE((home / "ray" / f"pgpass.{proc.pid}").stat().st_mode)
            break
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    assert len(seen) >= 4, seen  # GCS, raylet, driver and worker gRPC servers at least
    exposed = [s for s in seen if not is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert mode == 0o700, oct(mode)
    assert not any(password in c for c in cmdlines)
    assert pgpass_mode == 0o600
    for f in (home / "ray").rglob("*"):  # logs, session files: no password left after the run
        if f.is_file() and not f.is_symlink() and f.stat().st_size < 50_000_000:
            assert password.encode() not in f.read_bytes(), f
    assert password not in stdout + stderr
    shutil.rmtree(home, ignore_errors=True)


def test_actor_arguments_carry_no_password(tmp_path):
    target = db.Target("host=db.example port=5432 dbname=x user=u password=s3cr:t@%", private=False)
    env = ray_worker.worker_env(target, tmp_path)
    args = ray_worker.actor_args("torch", None, 1, target, env)
    assert b"s3cr" not in pickle.dumps(args)
    pgpass = tmp_path / f"pgpass.{os.getpid()}"
    assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600 and env["PGPASSFILE"] == str(pgpass)
    assert pgpass.read_text() == "db.example:5432:x:u:s3cr\\:t@%\n"


def test_remote_ray_gets_no_password_from_the_dsn():
    from cnnsql.core.errors import CnnsqlError

    target = db.Target("host=db.example dbname=x user=u password=pw", private=False)
    with pytest.raises(CnnsqlError, match="PGPASSFILE or PGPASSWORD on every Ray node"):
        ray_worker.worker_env(target, None)
    assert ray_worker.worker_env(db.Target("host=db.example dbname=x user=u", private=False), None) == \
        {"OMP_NUM_THREADS": "1"}


def test_a_cnnsql_home_too_long_for_ray_sockets_gets_a_private_short_folder(tmp_path):
    long_home = tmp_path / ("x" * 80)
    path = ray_local.private_dir(long_home / "ray")
    try:
        assert len(str(path)) + ray_local.SOCKET_TAIL <= ray_local.UNIX_PATH_MAX
        assert stat.S_IMODE(path.stat().st_mode) == 0o700 and path.stat().st_uid == os.getuid()
        (path / f"pgpass.{os.getpid()}").write_text("x")
        ray_local.cleanup(path)
        assert not path.exists()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    home = Path(tempfile.mkdtemp(prefix="crs", dir="/tmp"))
    try:
        short = ray_local.private_dir(home / "ray")
        assert short == home / "ray" and stat.S_IMODE(short.stat().st_mode) == 0o700
        ray_local.cleanup(short)
        assert short.exists()  # only the mkdtemp fallback is removed
    finally:
        shutil.rmtree(home)


def test_a_killed_runs_password_file_is_swept_by_the_next_command(tmp_path):
    """A Ray run killed before its cleanup leaves its DSN password file; any next command removes it
    (its process is gone), and leaves a running run's file alone."""
    home = tmp_path / "state"
    (home / "ray").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = home / "ray" / f"pgpass.{dead.pid}"
    left.write_text("db:5432:x:u:secret\n")
    live = home / "ray" / f"pgpass.{os.getpid()}"
    live.write_text("db:5432:x:u:secret\n")
    proc = subprocess.run([sys.executable, "-m", "cnnsql", "db", "status"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "CNNSQL_HOME": str(home)}, timeout=120)
    assert not left.exists() and live.exists(), proc.stderr
