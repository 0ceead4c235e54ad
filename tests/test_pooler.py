"""PgBouncer in front of the private cluster (`cnnsql db pooler`): loopback only, scram, transaction
pooling; its files private; the in-PostgreSQL function answers through it; many clients share the pool's
backends (the clients study, on a tiny setting). Needs Debian's pgbouncer (make test installs it)."""
from __future__ import annotations

import json
import os
import stat

import psutil
import psycopg2
import pytest

from conftest import run_cli, server_subdir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pooler(target):
    from cnnsql import db
    from cnnsql.db.pooler import Pooler, pgbouncer_bin

    try:
        pgbouncer_bin()
    except Exception:  # noqa: BLE001
        if os.environ.get("CNNSQL_REQUIRE_PGBOUNCER"):
            raise
        pytest.skip("PgBouncer is not installed: apt-get install pgbouncer (make test installs it as root)")
    p = Pooler(db.private_cluster())
    yield p
    p.stop()


def test_start_status_url_and_stop(pooler):
    out = run_cli("db", "pooler", "start")
    assert "PgBouncer running on 127.0.0.1:" in out.stdout and "transaction pooling" in out.stdout
    assert run_cli("db", "pooler", "status").stdout.startswith("pooler: running on 127.0.0.1:")
    url = run_cli("db", "pooler", "url").stdout.strip()
    assert url.startswith("postgresql://cnnsql@127.0.0.1/") and "password" not in url
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, inet_server_addr() IS NULL")  # the server side: the Unix socket
            assert cur.fetchone() == ("cnnsql", True)
    finally:
        conn.close()
    assert run_cli("db", "pooler", "stop").stdout.strip() == "pooler stopped"
    assert run_cli("db", "pooler", "status", check=False).returncode == 3


def test_loopback_only_private_files_and_no_clear_text_password(pooler):
    pooler.start()
    try:
        proc = psutil.Process(pooler._pid())
        listens = [c.laddr for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listens and all(a.ip == "127.0.0.1" for a in listens)
        assert stat.S_IMODE(os.stat(pooler.dir).st_mode) == 0o700
        for f in (pooler.ini, pooler.auth_file, pooler.pgpass):
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
        secret = pooler.auth_file.read_text()
        assert "SCRAM-SHA-256$" in secret and pooler.cluster._stored_password() not in secret
        assert "auth_type = scram-sha-256" in pooler.ini.read_text()
        assert "pool_mode = transaction" in pooler.ini.read_text()
        # a wrong password is refused
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(host="127.0.0.1", port=pooler.port, user="cnnsql", dbname="cnnsql", password="wrong",
                             connect_timeout=10)
    finally:
        pooler.stop()


@pytest.mark.usefixtures("need_plpython")
def test_clients_study_through_the_pool(pooler, loaded, server_tmp, tmp_path):
    from cnnsql.models import weights as W

    path = server_subdir(server_tmp, "clients") / "w.npz"
    W.save_weights(path, W.random_weights(4).arrays, {"trained_by": "random", "seed": 4})
    out = tmp_path / "clients.json"
    proc = run_cli("study", "clients", "--weights", str(path), "--clients", "1,3", "--seconds", "1", "--images", "8",
                   "--pool-size", "1", "--rates", "30", "--jobs", "1,0", "--out", str(out), "--quiet", check=False)
    assert proc.returncode in (0, 3), proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["checks"] and all(c["ok"] for c in doc["checks"]), doc["checks"]
    cells = {(r["via"], r["clients"], r["jobs"]): r for r in doc["rows"]}
    # clients driven by one process (--jobs 1) and by one process each (--jobs 0)
    assert set(cells) == {(v, n, j) for v in ("direct", "pooler") for n, j in ((1, 1), (3, 1), (3, 3))}
    assert len(doc["rows"]) == 8
    assert all(r["queries"] > 0 and r["wrong"] == 0 and r["rate"] == 30 for r in cells.values())
    # open loop at 30 q/s in all for 1 s: about 30 answers per cell, never more than scheduled
    assert all(r["queries"] <= 31 for r in cells.values()), cells
    assert {(b["via"], b["clients"], b["jobs"]) for b in doc["best"]} == set(cells)
    # three clients through a pool of one: no client waits for a framework to load
    assert cells[("pooler", 3, 1)]["warm_s"] < 1.0 <= doc["pool_warm_s"] + 1.0
    assert not pooler.status()  # the study stops the pooler it started


@pytest.mark.parametrize("via", ["direct", "pooler"])
def test_a_client_killed_mid_query_leaves_no_busy_backend(pooler, via):
    """A client killed (SIGKILL) while its query runs: the backend stops the query within seconds
    (client_connection_check_interval; through PgBouncer, the pooler drops the server connection),
    and the pool serves the next client."""
    import signal
    import subprocess
    import sys
    import time

    from cnnsql import db
    from cnnsql.core import config

    pooler.start(pool_size=1)
    try:
        info = (pooler if via == "pooler" else pooler.cluster).conninfo(config.database_name())
        tag = f"cnnsql-killed-{via}"
        code = ("import psycopg2, sys; c = psycopg2.connect(**eval(sys.argv[1])); c.autocommit = True; "
                f"c.cursor().execute(\"SELECT /* {tag} */ pg_sleep(60)\")")
        child = subprocess.Popen([sys.executable, "-c", code, repr(info)])

        def running() -> int:
            with db.connection() as c, c.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
                            "AND pid <> pg_backend_pid()",
                            (f"%/* {tag} */%",))
                return cur.fetchone()[0]

        deadline = time.monotonic() + 30
        while running() == 0:
            assert time.monotonic() < deadline and child.poll() is None, "the query never started"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = time.monotonic()
        while running():
            assert time.monotonic() - killed < 10, "the backend still runs the killed client's query"
            time.sleep(0.2)
        conn = psycopg2.connect(**info, connect_timeout=10)  # the pool (of one) serves the next client
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        finally:
            conn.close()
    finally:
        pooler.stop()
