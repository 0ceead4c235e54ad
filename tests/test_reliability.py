"""Reliability and security: weights errors, missing tables, hostile names, concurrency, restarts."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnsql import db
from cnnsql.models import weights as W
from conftest import REPO, run_cli, server_subdir
from test_bad_input import assert_clean_failure

HOSTILE = 'x"; DROP TABLE bench_run; --'


@pytest.fixture(scope="module")
def good_weights(server_tmp):
    path = server_subdir(server_tmp, "good") / "w.npz"  # readable by the server's user: in-database placement
    W.save_weights(path, W.random_weights(2).arrays, {"trained_by": "random"})
    return path


def predict(weights, *extra, env=None):
    return run_cli("predict", "--engine", "torch", "--weights", str(weights), "--limit", "20", "--quiet",
                   "--out", str(weights.parent / "p.csv"), *extra, env=env, check=False)


def test_predict_writes_csv(loaded, good_weights):
    proc = predict(good_weights)
    assert proc.returncode == 0, proc.stderr
    lines = (good_weights.parent / "p.csv").read_text().splitlines()
    assert lines[0] == "id,label,predicted," + ",".join(f"p{k}" for k in range(10)) and len(lines) == 21


def test_weights_errors_name_the_file_and_the_mismatch(loaded, tmp_path):
    assert_clean_failure(predict(tmp_path / "missing.npz"), "missing.npz not found", "cnnsql train")
    arrays = W.random_weights(1).arrays
    bad = tmp_path / "shape.npz"
    np.savez(bad, **{**arrays, "fc1.weight": arrays["fc1.weight"].reshape(12544, 512)})
    assert_clean_failure(predict(bad), "shape.npz", "fc1.weight has shape (12544, 512), expected (512, 12544)")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    assert_clean_failure(predict(corrupt), "corrupt.npz", "corrupt")
    manifest = tmp_path / "arch.npz"
    np.savez(manifest, **arrays)
    manifest.with_suffix(".json").write_text(json.dumps({"architecture": "resnet18"}))
    assert_clean_failure(predict(manifest), "arch.json", "architecture 'resnet18'")
    manifest.with_suffix(".json").write_text(json.dumps({"preprocessing": "imagenet-mean-std"}))
    assert_clean_failure(predict(manifest), "preprocessing 'imagenet-mean-std'")
    nan = tmp_path / "nan.npz"
    np.savez(nan, **{**arrays, "fc2.bias": np.full(10, np.nan, np.float32)})
    assert_clean_failure(predict(nan), "fc2.bias contains NaN")


def test_unknown_engine_and_cuda_without_gpu(loaded, good_weights):
    assert_clean_failure(run_cli("predict", "--engine", "caffe", "--weights", str(good_weights), "--out", "/tmp/x.csv",
                                 check=False), "unknown engine 'caffe'", "torch, tensorflow, velox")
    import torch

    if not torch.cuda.is_available():
        assert_clean_failure(predict(good_weights, "--device", "cuda"), "cuda")


def test_missing_tables_name_the_command_that_creates_them(target, good_weights, tmp_path):
    env = {"CNNSQL_DB": "empty_db"}
    run_cli("db", "start", env=env)
    assert_clean_failure(predict(good_weights, env=env), "cifar_image", "cnnsql load")
    proc = run_cli("report", "--out", str(tmp_path / "r"), env=env, check=False)
    assert_clean_failure(proc, "bench_run", "cnnsql bench")


def test_hostile_database_and_table_names_are_quoted(loaded, conn, good_weights):
    env = {"CNNSQL_DB": HOSTILE}
    run_cli("load", "--quiet", "--synthetic", "50", env=env)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (HOSTILE,))
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT to_regclass('bench_run') IS NOT NULL")
        assert cur.fetchone()[0]
    conn.rollback()
    url = run_cli("db", "url", env=env).stdout.strip()
    count = subprocess.run(["psql", url, "-XAtc", "SELECT count(*) FROM cifar_image"], capture_output=True, text=True)
    assert count.stdout.strip() == "60", count.stderr
    # EvaDB's CREATE DATABASE cannot carry such a name: a clear refusal, not an injection
    assert_clean_failure(run_cli("shell", "-c", "SELECT 1;", env=env, check=False), "quote")


def test_two_benchmarks_at_once_log_distinct_complete_sessions(loaded, conn, good_weights, plpython):
    args = [sys.executable, "-m", "cnnsql", "bench", "--engines", "torch", "--weights", str(good_weights),
            "--limit", "200", "--repetitions", "1", "--batch-sizes", "64", "--single-stream", "3",
            "--sql-single-stream", "1", "--quiet"]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    sessions = [o[0].rsplit("(session ", 1)[1].split(";")[0] for o in outs]
    assert sessions[0] != sessions[1]
    with conn.cursor() as cur:
        for s in sessions:
            cur.execute("SELECT kind, scenario, count(*), bool_and(status = 'complete') FROM bench_run "
                        "WHERE session_id = %s GROUP BY 1, 2 ORDER BY 1, 2", (s,))
            indb = [("indb", "offline", 1, True), ("indb", "single-stream", 1, True)] if plpython else []
            assert cur.fetchall() == indb + [("raw", "batch-sweep", 1, True), ("raw", "offline", 1, True),
                                             ("raw", "single-stream", 1, True), ("sql", "fetch-only", 1, True),
                                             ("sql", "offline", 1, True), ("sql", "single-stream", 1, True)]
            cur.execute("SELECT count(*) FROM bench_repetition JOIN bench_run USING (run_id) WHERE session_id = %s",
                        (s,))
            assert cur.fetchone()[0] == 3 + 1 + 1 + 1 + 1 + 1 + (1 + 3 if plpython else 0)
    conn.rollback()


def start_bench_and_wait_for_running_run(good_weights, condition: str, params: tuple):
    """Start `cnnsql bench` on torch; return (process, watcher connection, (run_id, session_id)) of the
    first run that matches `condition` while it is still 'running' (None if none appeared)."""
    proc = subprocess.Popen([sys.executable, "-m", "cnnsql", "bench", "--engines", "torch", "--weights",
                             str(good_weights), "--limit", "3000", "--repetitions", "3", "--quiet"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = db.connect()
    watcher.autocommit = True
    deadline = time.monotonic() + 300
    running = None
    while time.monotonic() < deadline and running is None and proc.poll() is None:
        with watcher.cursor() as cur:
            cur.execute("SELECT run_id, session_id FROM bench_run WHERE status = 'running' AND " + condition, params)
            running = cur.fetchone()
        time.sleep(0.05)
    return proc, watcher, running


def test_server_restart_during_a_benchmark_fails_clearly_and_leaves_no_complete_looking_run(loaded, conn,
                                                                                             good_weights):
    proc, watcher, running = start_bench_and_wait_for_running_run(
        good_weights, "kind = 'raw' AND started_at > now() - interval '5 minutes'", ())
    watcher.close()
    assert running, "the benchmark finished before the restart"
    cluster = db.private_cluster()
    cluster.stop()
    cluster.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, (out, err)
    assert "cnnsql: error:" in err and "Traceback" not in err
    conn.close()
    conn2 = db.connect()
    with conn2.cursor() as cur:
        cur.execute("SELECT status FROM bench_run WHERE run_id = %s", (running[0],))
        assert cur.fetchone()[0] in ("running", "failed")  # never 'complete'
        cur.execute("SELECT count(*) FROM bench_sql_overhead WHERE session_id = %s", (running[1],))
        assert cur.fetchone()[0] == 0
    conn2.close()


def test_benchmark_killed_mid_run_leaves_no_complete_looking_run(loaded, conn, good_weights):
    watcher = db.connect()
    watcher.autocommit = True
    with watcher.cursor() as cur:
        cur.execute("SELECT coalesce(max(run_id), 0) FROM bench_run")
        last_run = cur.fetchone()[0]
    proc, watcher2, running = start_bench_and_wait_for_running_run(
        good_weights, "kind = 'sql' AND scenario = 'offline' AND run_id > %s", (last_run,))
    watcher2.close()
    assert running, "the benchmark finished before it could be killed"
    proc.kill()
    proc.wait(timeout=60)
    with watcher.cursor() as cur:
        cur.execute("SELECT count(*) FROM bench_run WHERE session_id = %s AND status = 'complete' AND kind = 'sql' "
                    "AND scenario = 'offline'", (running[1],))
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT status FROM bench_run WHERE run_id = %s", (running[0],))
        assert cur.fetchone()[0] == "running"  # stays visibly unfinished
        cur.execute("SELECT count(*) FROM bench_sql_overhead WHERE session_id = %s", (running[1],))
        assert cur.fetchone()[0] == 0
    watcher.close()
