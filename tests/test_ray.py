"""Ray execution against real Ray and PostgreSQL: exactly one prediction per image, also when a
worker process is killed in the middle of a run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from cnnsql.engines import get_engine
from cnnsql.models.weights import load_weights
from conftest import REPO, run_cli

N = 1500
KILL_N = 4000  # enough work that the killed worker cannot have finished its shards


def predictions(conn, table, run_id):
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, label FROM "{table}" WHERE run_id = %s ORDER BY id', (run_id,))
        rows = cur.fetchall()
    conn.rollback()
    return rows


def single_process_labels(conn, random_weights_file):
    from cnnsql.data import cifar_table as data

    _, images, _ = data.fetch_split(conn, "test", limit=N)
    return get_engine("torch", load_weights(random_weights_file), threads=2).predict(images).argmax(1)


def test_two_workers_match_single_process(loaded, conn, random_weights_file):
    out = run_cli("bench", "--cluster", "ray", "--engines", "torch", "--workers", "2", "--limit", str(N),
                  "--repetitions", "1", "--weights", str(random_weights_file), "--table", "ray pred; test", "--quiet")
    run_id = int(out.stdout.split(", run ")[1].split()[0])
    rows = predictions(conn, "ray pred; test", run_id)
    assert [r[0] for r in rows] == list(range(N))
    assert np.array_equal(np.array([r[1] for r in rows]), single_process_labels(conn, random_weights_file))
    with conn.cursor() as cur:
        cur.execute("SELECT status, workers, kind, cluster FROM bench_run WHERE run_id = %s", (run_id,))
        status, workers, kind, cluster = cur.fetchone()
    assert (status, workers, kind) == ("complete", 2, "ray") and "CPUs" in cluster


def test_killed_worker_run_completes_without_duplicates(loaded, conn, random_weights_file):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnsql", "bench", "--cluster", "ray", "--engines", "torch", "--workers", "2",
         "--limit", str(KILL_N), "--repetitions", "1", "--weights", str(random_weights_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = None
    for line in proc.stderr:
        if "pids [" in line:
            pids = json.loads(line.split("pids ")[1])
            break
    assert pids, "no worker pids reported"
    time.sleep(0.3)  # each worker has 4 shards of KILL_N / 8 images, ~0.4 s each: kill it mid-way
    os.kill(pids[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode != 0:  # allowed: a clear failure, and a run marked failed
        assert "cnnsql: error:" in stderr and "Traceback" not in stderr
        status = "failed"
    else:
        status = "complete"
    with conn.cursor() as cur:
        cur.execute("SELECT run_id, status, detail FROM bench_run WHERE kind = 'ray' ORDER BY run_id DESC LIMIT 1")
        run_id, logged, detail = cur.fetchone()
    conn.rollback()
    assert logged == status
    if status == "complete":
        rows = predictions(conn, "ray_prediction", run_id)
        assert [r[0] for r in rows] == list(range(KILL_N))  # none missing, none twice
        seen = {int(w.rsplit(":", 1)[1]) for w in detail["workers_seen"]}
        assert seen - set(pids), (pids, detail)  # a restarted worker finished the killed one's work
