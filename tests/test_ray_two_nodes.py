"""A real two-node Ray cluster: `ray start --head` and a second `ray start --address`, both on 127.0.0.1 with
token authentication and their own temp folders, PostgreSQL reached over TCP, `cnnsql bench --cluster ray
--address ...` against it. Ray's GCS actor table shows that the work ran on both nodes; every image is
predicted exactly once; killing the second node mid-run ends complete (retried on the head) or fails clearly.

The nodes come from cnnsql/placements/ray_nodes.py; only their processes are stopped, by pid.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cnnsql.placements.ray_nodes import LoopbackCluster
from conftest import REPO

N = 3000

GCS_STATE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = {n["NodeID"]: {"alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes()}
actors = [{"pid": a["Pid"], "node": a["Address"]["NodeID"], "state": a["State"]}
          for a in state.actors().values() if a["ActorClassName"].endswith("ShardWorker")]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def gcs_state(nodes: LoopbackCluster) -> dict:
    """Ray's own record (the GCS actor and node tables; the `ray list` state API needs the dashboard)."""
    proc = subprocess.run([sys.executable, "-c", GCS_STATE, nodes.address], env=nodes.env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(loaded, target):
    """The two nodes, started once for this module (the kill test, last, ends the second one)."""
    from cnnsql.core import config
    from cnnsql import db

    p = db.private_cluster().tcp_conninfo(config.database_name())
    dsn = f"host={p['host']} port={p['port']} dbname={p['dbname']} user={p['user']}"  # TCP, no password
    env = {**os.environ, "CNNSQL_DSN": dsn, "PGPASSFILE": str(db.private_cluster().pgpass)}
    # a dead node is noticed in ~2 s instead of ~15 s (the kill test)
    env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4")
    nodes = LoopbackCluster(env, cpus=(2, 2))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def bench_cmd(nodes: LoopbackCluster, weights, n: int, table: str) -> list[str]:
    return [sys.executable, "-m", "cnnsql", "bench", "--cluster", "ray", "--address", nodes.address, "--engines",
            "torch", "--workers", "2", "--limit", str(n), "--repetitions", "1", "--weights", str(weights),
            "--table", table]


def predictions(conn, table: str, run_id: int) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(f'SELECT id, worker, attempt FROM "{table}" WHERE run_id = %s ORDER BY id', (run_id,))
        rows = cur.fetchall()
    conn.rollback()
    return rows


def test_two_nodes_share_the_work_and_predict_each_image_once(cluster, conn, random_weights_file):
    state = gcs_state(cluster)
    assert sum(n["alive"] for n in state["nodes"].values()) == 2
    listeners = cluster.listeners()
    assert {i for i, _, _ in listeners} == {0, 1}  # both nodes' raylets (and the head's GCS) listen ...
    assert {ip.removeprefix("::ffff:") for _, _, ip in listeners} == {"127.0.0.1"}, listeners  # ... on loopback
    proc = subprocess.run(bench_cmd(cluster, random_weights_file, N, "ray_two_nodes"), cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 node(s), 4 CPUs" in proc.stdout
    print(proc.stdout.strip())
    run_id = int(proc.stdout.split(", run ")[1].split()[0])
    rows = predictions(conn, "ray_two_nodes", run_id)
    assert [r[0] for r in rows] == list(range(N)) and {r[2] for r in rows} == {1}  # each image once, first try
    writer_pids = {int(r[1].rsplit(":", 1)[1]) for r in rows}
    actors = gcs_state(cluster)["actors"]
    node_of = {a["pid"]: a["node"] for a in actors}
    assert writer_pids <= set(node_of), (writer_pids, actors)
    assert len({node_of[p] for p in writer_pids}) == 2, actors  # both nodes wrote predictions
    with conn.cursor() as cur:
        cur.execute("SELECT status, workers, cluster FROM bench_run WHERE run_id = %s", (run_id,))
        assert cur.fetchone() == ("complete", 2, f"ray {cluster.address}: 2 node(s), 4 CPUs")
    conn.rollback()


def test_killing_the_second_node_mid_run_completes_or_fails_clearly(cluster, conn, random_weights_file):
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM cifar_image_test")
        n = min(cur.fetchone()[0], 4000)
    conn.rollback()
    proc = subprocess.Popen(bench_cmd(cluster, random_weights_file, n, "ray_two_nodes_kill"), cwd=REPO,
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "pids [" in line:
            break
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before the node could be killed"
    killed = cluster.kill(1)
    assert killed, "no process of the second node found"
    stdout, stderr = proc.communicate(timeout=240)
    with conn.cursor() as cur:
        cur.execute("SELECT run_id, status FROM bench_run WHERE kind = 'ray' ORDER BY run_id DESC LIMIT 1")
        run_id, status = cur.fetchone()
    conn.rollback()
    if proc.returncode != 0:
        assert "cnnsql: error:" in stderr and "Traceback" not in stderr, stderr[-2000:]
        assert status == "failed"
        return
    assert status == "complete"
    rows = predictions(conn, "ray_two_nodes_kill", run_id)
    assert [r[0] for r in rows] == list(range(n))  # none missing, none twice
    retried = sum(r[2] > 1 for r in rows)
    print(f"killed {len(killed)} processes of the second node; run complete, {retried} predictions rewritten")
    print(stdout.strip())
