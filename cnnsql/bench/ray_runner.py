"""`cnnsql bench --cluster ray`: any engine as Ray actors over id-range shards of the test split.

Each worker reads its own shard from PostgreSQL, predicts in batches and upserts the
predictions into a PostgreSQL table, committing per batch. Upserts on (run_id, id) make a
shard retried after a worker dies (Ray restarts the actor and retries its task) rewrite the
same rows: a completed run has exactly one prediction per image, which the driver checks
before it marks the run complete.
"""
from __future__ import annotations

import os
import statistics
import sys

import numpy as np
from psycopg2 import sql

from cnnsql.data import datasets
from cnnsql import db
from cnnsql.placements import ray_local
from cnnsql import results
from cnnsql.measure import stats
from cnnsql.engines import engine_class
from cnnsql.core.errors import CnnsqlError
from cnnsql.placements.ray_worker import ShardWorker, actor_args, shard_query, worker_env
from cnnsql.measure.monitor import ResourceMonitor


def _shards(n: int, count: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, count + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def ensure_table(conn, table: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE ray_prediction INCLUDING ALL)")
                    .format(sql.Identifier(table)))
    conn.commit()


def check_complete(conn, table: str, run_id: int, n: int) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {} WHERE run_id = %s")
                    .format(sql.Identifier(table)), (run_id,))
        count, distinct, lo, hi = cur.fetchone()
    conn.rollback()
    if not (count == distinct == n and lo == 0 and hi == n - 1):
        raise CnnsqlError(f"Ray run {run_id}: {count} predictions ({distinct} distinct ids) for {n} images",
                          "the run is marked failed; rerun it")


def run_ray(cfg, workers_list: list[int], address: str | None, table: str) -> list[dict]:
    from cnnsql.placements.evadb_session import quiet

    quiet()
    from cnnsql.engines import ENGINES
    from cnnsql.models.weights import check_weights_model, load_weights

    unknown = [e for e in cfg.engines if e not in ENGINES]
    if unknown:
        raise CnnsqlError(f"unknown engine {unknown[0]!r}", f"choose from: {', '.join(ENGINES)}")

    target = db.resolve()
    conn = db.connect(target)
    try:
        db.ensure_schema(conn)
        ensure_table(conn, table)
        try:
            ds = datasets.info(conn, cfg.dataset)
        except CnnsqlError as exc:
            raise CnnsqlError(f"the database holds no test images for the Ray workers: {exc.args[0]}",
                              "run `cnnsql load` first") from None
        n_avail = ds.n_test
        if not n_avail:
            raise CnnsqlError("the database holds no test images for the Ray workers", "run `cnnsql load` first")
        weights_path = cfg.weights_path(ds.name)
        if not weights_path.exists():
            raise CnnsqlError(f"no weights at {weights_path} for dataset {ds.name}",
                              f"run `cnnsql bench --dataset {ds.name}` (it trains them) or pass --weights")
        check_weights_model(weights_path, cfg.model, ds.shape, ds.num_classes)
    except BaseException:
        conn.close()
        raise
    weights = load_weights(weights_path)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    private_dir = ray_local.init(address, num_cpus=max(max(workers_list), os.cpu_count() or 1))
    import ray

    rows = []
    try:
        env = worker_env(target, private_dir)
        res = ray.cluster_resources()
        cluster = (f"{'ray ' + address if address else 'local ray'}: {len(ray.nodes())} node(s), "
                   f"{int(res.get('CPU', 0))} CPUs")
        session = results.new_session_id()
        weights_ref = ray.put(weights)
        Actor = ray.remote(max_restarts=3, max_task_retries=3)(ShardWorker)
        for engine in cfg.engines:
            n = cfg.n_images(engine, n_avail)
            for workers in workers_list:
                rows.append(_run_one(cfg, conn, session, Actor, weights_ref, (target, env), engine, workers, n,
                                     table, cluster, str(weights_path), ds))
    finally:
        ray.shutdown()
        ray_local.cleanup(private_dir)
        conn.close()
    for r in rows:
        print(f"ray {r['engine']:<11} workers {r['workers']}: {r['n']} images in {r['wall_s']:.2f} s "
              f"({r['images_per_s']:.1f} images/s), run {r['run_id']}")
    print(f"(session {session}; {cluster}; predictions in table {table})")
    return rows


def _run_one(cfg, conn, session, Actor, weights_ref, where, engine, workers, n, table, cluster, weights, ds):
    import ray
    from ray.util import ActorPool

    threads = max(1, cfg.threads // workers)
    batch = engine_class(engine).default_batch_size
    shards = _shards(n, workers * 4)
    # Warm-up: each actor predicts 2 blank images before the timed passes (the engine's first call pays
    # its compilation); no untimed pass over the shards, so the run records warmup = 0.
    spec = dict(kind="ray", scenario="offline", engine=engine, split="test", n_rows=n, batch_size=batch,
                threads=threads, device="cpu", warmup=0, repetitions=cfg.reps(), workers=workers,
                cluster=cluster, dataset_kind=ds.run_kind,
                weights=weights, query=shard_query(ds.bytes_relation("test")).as_string(conn))
    actors = []
    with results.logged_run(conn, session, **spec) as run:
        try:
            # SPREAD: one worker per node before two on one (the default packs the driver's node first)
            actors = [Actor.options(num_cpus=threads, scheduling_strategy="SPREAD")
                      .remote(*actor_args(engine, weights_ref, threads, *where, ds.bytes_relation("test")))
                      for _ in range(workers)]
            ray.get([a.warmup.remote() for a in actors])
            if cfg.progress:
                print(f"[ray {engine} x{workers}] {n} images in {len(shards)} shards, pids "
                      f"{ray.get([a.pid.remote() for a in actors])}", file=sys.stderr, flush=True)

            def one_pass():
                pool = ActorPool(actors)
                return list(pool.map_unordered(lambda a, s: a.run_shard.remote(run.id, table, s[0], s[1], batch),
                                               shards))

            server = db.private_server_pid(conn) if where[0].private else None  # its backends serve the actors
            with ResourceMonitor() as mon, stats.Clock((server,)) as clock:  # local Ray's workers: the driver's tree
                for _ in range(cfg.reps()):
                    done = clock.time("ray", one_pass)
            check_complete(conn, table, run.id, n)
            datasets.check_version(conn, ds, ds.version, f"Ray run {run.id}")
            walls = clock.walls["ray"]
            wall = stats.summary(walls)
            verdict = clock.verdict("ray")
            res = {"wall_s": wall["median"], "wall_min_s": wall["min"], "wall_max_s": wall["max"],
                   "images_per_s": n / wall["median"], "latency_ms": 1000 * wall["median"] / n, **mon.summary(),
                   "cpu_s": statistics.median(clock.cpus["ray"]), "noisy": verdict.pop("noisy"),
                   "load_1m": (stats.load_average() or [None])[0],
                   "detail": {"shards": len(shards), "workers_seen": sorted({d["worker"] for d in done}),
                              "actor_warmup": "one predict of 2 blank images per actor, untimed", **verdict,
                              "executed_batch": batch}}
            run.finish(res, repetitions=walls, cpus=clock.cpus["ray"])
        finally:
            for a in actors:
                ray.kill(a)
    wall = wall["median"]
    return {"engine": engine, "workers": workers, "n": n, "wall_s": wall, "images_per_s": n / wall, "run_id": run.id}
