"""The private cluster is never reachable without its password, in any state, and its start-up
failures are one useful line. Each test uses its own cluster home (the session's stays untouched)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import psycopg2
import pytest

from cnnsql.db.pgcluster import PrivateCluster, pg_bin
from conftest import run_cli, traversable_tmpdir

pytestmark = pytest.mark.integration  # private PostgreSQL clusters started and probed


@pytest.fixture(scope="module")
def home():
    base = traversable_tmpdir("cnnsql-cl-")  # as root the server runs as 'postgres': it must traverse it
    yield base / "state"
    PrivateCluster(base / "state").stop()
    shutil.rmtree(base, ignore_errors=True)


def cli(home: Path, *args: str, **env):
    return run_cli(*args, env={"CNNSQL_HOME": str(home), **env}, check=False, timeout=120)


def one_line_error(proc, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err, err
    line = [l for l in err.splitlines() if l.startswith("cnnsql: error:")]
    assert len(line) == 1, err
    for n in needles:
        assert n in line[0], line[0]
    return line[0]


def tcp_without_password(cluster: PrivateCluster) -> str:
    """Try a passwordless superuser login over TCP; return the server's answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run([pg_bin("psql"), "-w", "-h", "127.0.0.1", "-p",
                           str(cluster.port), "-U", "cnnsql", "-d", "postgres", "-c", "SELECT 1"],
                          capture_output=True, text=True, env={**env, "PGPASSFILE": "/nonexistent"}, timeout=30)
    return proc.stdout + proc.stderr if proc.returncode == 0 else "refused: " + proc.stderr


def test_bad_port_is_refused_before_initdb(home):
    one_line_error(cli(home, "db", "start", CNNSQL_PG_PORT="99999"), "CNNSQL_PG_PORT", "1024-65535")
    assert not (home / "pg" / "data" / "PG_VERSION").exists()  # nothing was created with it
    one_line_error(cli(home, "db", "start", CNNSQL_PG_PORT="not-a-port"), "CNNSQL_PG_PORT")


def test_a_half_made_cluster_is_repaired_never_served_with_trust(home):
    """initdb done with trust (as an interrupted set-up of an earlier version left it), nothing else."""
    cluster = PrivateCluster(home)
    cluster.root.mkdir(parents=True, exist_ok=True)
    os.chmod(cluster.root, 0o755 if cluster.run_as else 0o700)
    cluster._own(cluster.data, 0o700)
    cluster._run(pg_bin("initdb"), "-D", str(cluster.data), "-U", "cnnsql", "--auth=trust", "--no-instructions")
    assert cluster.exists and not cluster.initialized
    proc = cli(home, "db", "start")
    assert proc.returncode == 0, proc.stderr
    assert "repairing the private cluster" in proc.stderr
    assert cluster.initialized
    answer = tcp_without_password(cluster)
    assert answer.startswith("refused") and ("password" in answer), answer
    hba = [l.split() for l in (cluster.data / "pg_hba.conf").read_text().splitlines() if l and not l.startswith("#")]
    assert all(l[-1] != "trust" for l in hba if l[0].startswith("host")), hba
    with psycopg2.connect(**cluster.tcp_conninfo("postgres"), passfile=str(cluster.pgpass)) as conn:
        assert conn.server_version >= 150000  # the password in pgpass works


def test_port_taken_by_another_program_names_the_cause(home):
    assert cli(home, "db", "start").returncode == 0  # the cluster exists and has its port, whatever ran before
    cluster = PrivateCluster(home)
    cluster.stop()
    with socket.socket() as squatter:
        # the server just released the port: its connections' TIME_WAIT entries would refuse a plain bind
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", cluster.port))
        squatter.listen()
        line = one_line_error(cli(home, "db", "start"), "could not bind", "taken by another program",
                              "CNNSQL_PG_PORT")
    assert "database system is shut down" not in line


def test_stale_postmaster_pid_of_another_process_is_cleared(home):
    cluster = PrivateCluster(home)
    cluster.stop()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (cluster.data / "postmaster.pid").write_text(f"{other.pid}\n{cluster.data}\n0\n{cluster.port}\n")
        proc = cli(home, "db", "start")
        assert proc.returncode == 0, proc.stderr
        assert "stale postmaster.pid" in proc.stderr
        assert cli(home, "db", "status").returncode == 0
        assert cluster._postmaster_pid() not in (None, other.pid)
    finally:
        other.kill()
        other.wait()


def test_a_fresh_cluster_never_trusts_tcp(home):
    fresh = home.parent / "fresh"
    proc = cli(fresh, "db", "start")
    try:
        assert proc.returncode == 0, proc.stderr
        cluster = PrivateCluster(fresh)
        assert tcp_without_password(cluster).startswith("refused")
        assert "trust" not in [l.split()[-1] for l in (cluster.data / "pg_hba.conf").read_text().splitlines()
                               if l.startswith("host")]
    finally:
        PrivateCluster(fresh).stop()


def test_the_socket_asks_for_the_password_too(home):
    """As root the server runs as 'postgres': another process of that user (another cluster's PL/Python)
    reaches the socket folder, so the socket must not trust it."""
    assert cli(home, "db", "start").returncode == 0
    cluster = PrivateCluster(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run(cluster._cmd(pg_bin("psql"), "-w", "-h", str(cluster.socket_dir), "-p", str(cluster.port),
                                       "-U", "cnnsql", "-d", "postgres", "-c", "SELECT 1"),
                          capture_output=True, text=True, env={**env, "PGPASSFILE": "/nonexistent"}, timeout=30)
    assert proc.returncode != 0 and "password" in proc.stderr, proc.stdout + proc.stderr
    hba = [l.split() for l in (cluster.data / "pg_hba.conf").read_text().splitlines() if l and not l.startswith("#")]
    assert all(l[-1] == "scram-sha-256" for l in hba), hba
