"""A run never claims what did not happen: a benchmark whose data is replaced, or whose SQL output
stops matching the raw engine, ends as a failed run with its reason; a load is all or nothing."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from cnnsql import db
from conftest import REPO, run_cli
from test_bad_input import load_until_copy_runs, snapshot
from test_reliability import good_weights, start_bench_and_wait_for_running_run  # noqa: F401 (fixture)


def failed_runs(conn, session: str) -> list[tuple[str, str]]:
    with conn.cursor() as cur:
        cur.execute("SELECT status, detail->>'error' FROM bench_run WHERE session_id = %s AND status <> 'complete'",
                    (session,))
        rows = cur.fetchall()
    conn.rollback()
    return rows


def test_a_reload_during_a_benchmark_fails_the_run(loaded, conn, real_cifar, good_weights):  # noqa: F811
    source = ["--source", str(real_cifar)] if real_cifar else ["--synthetic", "20000"]
    proc, watcher, running = start_bench_and_wait_for_running_run(
        good_weights, "kind = 'raw' AND started_at > now() - interval '5 minutes'", ())
    watcher.close()
    assert running, "the benchmark finished before the reload"
    run_cli("load", "--quiet", *source)  # the same data again: a new version all the same
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, (out, err[-2000:])
    line = [l for l in err.splitlines() if l.startswith("cnnsql: error:")]
    assert len(line) == 1 and "dataset was reloaded" in line[0] and "Traceback" not in err, err[-2000:]
    rows = failed_runs(conn, running[1])
    assert any(status == "failed" and "dataset was reloaded" in (error or "") for status, error in rows), rows


def test_sql_output_that_differs_from_raw_fails_the_run(loaded, conn, good_weights):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-m", "cnnsql", "bench", "--engines", "torch", "--weights",
                             str(good_weights), "--limit", "1000", "--repetitions", "1", "--batch-sizes", "16",
                             "--single-stream", "2", "--sql-single-stream", "1", "--quiet"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = db.connect()
    watcher.autocommit = True
    running, deadline = None, time.monotonic() + 300
    while running is None and time.monotonic() < deadline and proc.poll() is None:
        with watcher.cursor() as cur:  # the fetch-only phase reads the view; the SQL phase its binary twin
            cur.execute("SELECT run_id, session_id FROM bench_run WHERE status = 'running' AND kind = 'sql' "
                        "AND scenario = 'fetch-only' AND started_at > now() - interval '5 minutes'")
            running = cur.fetchone()
        time.sleep(0.02)
    assert running, "the benchmark finished too early"
    with watcher.cursor() as cur:  # the SQL path (the view's binary twin) now sees each image's neighbour
        cur.execute("CREATE OR REPLACE VIEW cnnsql_bytes.cifar_test_bytes AS SELECT t.id, t.label, u.img "
                    "FROM cifar_image_test t JOIN cifar_image_test u ON u.id = (t.id + 1) % 1000 WHERE t.id < 1000")
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        db.ensure_schema(watcher)  # the twin as it was
        watcher.close()
    assert proc.returncode == 1, (out, err[-2000:])
    assert "SQL output differs from the raw engine's" in err and "Traceback" not in err, err[-2000:]
    rows = failed_runs(conn, running[1])
    assert any(status == "failed" and "differs from the raw" in (error or "") for status, error in rows), rows
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM bench_run WHERE session_id = %s AND kind = 'sql' AND scenario = 'offline' "
                    "AND status = 'complete'", (running[1],))
        assert cur.fetchone()[0] == 0
    conn.rollback()


def test_an_interrupted_load_leaves_the_whole_previous_dataset(loaded, conn, real_cifar):
    """Killed while COPYing the test split of another dataset, after its train split went in."""
    before = snapshot(conn)
    proc = subprocess.Popen([sys.executable, "-m", "cnnsql", "load", "--quiet", "--synthetic", "50000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = db.connect()
    watcher.autocommit = True
    killed = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with watcher.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY \"cifar_image_test\"%%' "
                            "AND state = 'active'")
                if cur.fetchone()[0]:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.01)
        proc.wait()
        assert killed, "the load finished before it could be interrupted"
        time.sleep(0.5)  # the server notices the dead client and rolls back
        after = snapshot(conn)
    finally:
        watcher.close()
        if snapshot(conn) != before:  # leave the session's data as it was for the other tests
            run_cli("load", "--quiet", *(["--source", str(real_cifar)] if real_cifar else ["--synthetic", "20000"]))
    assert after == before


def test_server_stopped_during_a_load_names_the_cause(loaded, conn, real_cifar):
    if not real_cifar:
        pytest.skip("needs the real archive (a COPY long enough to stop the server under)")
    before = snapshot(conn)
    conn.close()
    proc, stopped = load_until_copy_runs(real_cifar, 120, text=True)
    if stopped:
        db.private_cluster().stop()
    out, err = proc.communicate(timeout=120)
    db.private_cluster().start()
    assert stopped, "the load finished before the server could be stopped"
    lines = [l for l in err.splitlines() if l.startswith("cnnsql: error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "server was stopped during the load" in lines[0] and "cnnsql db start" in lines[0], lines[0]
    conn2 = db.connect()
    try:
        assert snapshot(conn2) == before
    finally:
        conn2.close()
