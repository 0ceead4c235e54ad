"""How fast one PostgreSQL hands out images: K concurrent readers, and one Ray-style worker per engine.

Readers: the first --rows images of the loaded dataset's --split (default all; the dataset API's binary view
cnnsql_bytes.<view>_bytes) are cut into K id ranges; K processes (forked, connected before the clock starts)
each stream theirs with `SELECT id, img FROM <view> WHERE id >= lo AND id < hi` through a server-side
cursor, 2,048 rows per fetch, into NumPy at the dataset's image shape (what a worker does before its
engine). Aggregate images/s = N / (last reader done - common start). The K values alternate within each of
--rounds rounds (1, 2, 4, 8, 1, 2, ...) so they see the same machine; medians [min-max] of the rounds.
Noise: the readers' window with the harness's rules (other processes' CPU share, the readers and the
private server counted as ours; the rounds' spread per K).
Worker (with --engines): cnnsql.placements.ray_worker.ShardWorker (the Ray actor's own class, here without
Ray) runs one shard of --worker-images test images: read, predict, upsert into a scratch table
`scaling_prediction`, committing per batch; beside it the engine alone on the same images in memory,
interleaved through the harness's loop (measure.stats.interleave) after one warm-up of each.
Checks: every reader round read exactly N rows; every worker shard returned its rows.
"""
from __future__ import annotations

import multiprocessing as mp
import statistics
import time

from cnnsql.bench.studies import check
from cnnsql.bench.studies._dbstudy import (ChildClock, add_weights_and_dataset, open_dataset, server_roots,
                                           weights_path)

NAME = "pg_readers"
NEEDS_DATABASE = True
SMOKE = ["--readers", "1,2", "--rounds", "2", "--rows", "256", "--engines", "torch", "--threads", "1",
         "--worker-images", "64"]
FETCH_ROWS = 2048


def arguments(ap) -> None:
    add_weights_and_dataset(ap)
    ap.add_argument("--readers", default="1,2,4,8", help="reader counts K (default 1,2,4,8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--split", choices=["test", "train"], default="test")
    ap.add_argument("--rows", type=int, help="read the first N images of the split (default: all)")
    ap.add_argument("--engines", default="", help="also measure one worker per engine (e.g. torch,tensorflow)")
    ap.add_argument("--threads", default="1,2", help="worker thread counts (default 1,2)")
    ap.add_argument("--worker-images", type=int, default=4000)


def _reader(target, relation, shape, lo: int, hi: int, barrier, queue) -> None:
    import numpy as np
    from psycopg2 import sql

    from cnnsql import db

    conn = db.connect(target)
    barrier.wait()
    rows = nbytes = 0
    with conn.cursor(name="reader") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(sql.SQL("SELECT id, img FROM {} WHERE id >= %s AND id < %s").format(sql.Identifier(*relation)),
                    (lo, hi))
        while batch := cur.fetchmany(FETCH_ROWS):
            images = np.frombuffer(b"".join(bytes(r[1]) for r in batch), np.uint8).reshape(-1, *shape)
            rows += len(batch)
            nbytes += images.nbytes
    queue.put((rows, nbytes, time.perf_counter()))
    conn.close()


def readers_once(target, relation, shape, n: int, k: int) -> dict:
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(k + 1), ctx.Queue()
    edges = [round(i * n / k) for i in range(k + 1)]
    procs = [ctx.Process(target=_reader, args=(target, relation, shape, edges[i], edges[i + 1], barrier, queue))
             for i in range(k)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    done = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    wall = max(d[2] for d in done) - t0
    return {"wall_s": wall, "rows": sum(d[0] for d in done), "mb": sum(d[1] for d in done) / 1e6}


def measure_worker(ctx, target, conn, ds, engine: str, weights, threads: int, n: int, rounds: int, roots) -> dict:
    from cnnsql.bench import ray_runner
    from cnnsql.data import datasets
    from cnnsql.engines import engine_class
    from cnnsql.models.weights import load_weights
    from cnnsql.placements import ray_local, ray_worker

    ray_runner.ensure_table(conn, "scaling_prediction")
    conn.commit()
    _, images, _ = datasets.fetch_split(conn, ds, "test", limit=n)
    n = len(images)
    worker = ray_worker.ShardWorker(engine, load_weights(weights), threads, ray_local.worker_dsn(target),
                                    ray_local.worker_secrets(target, None), ds.bytes_relation("test"))
    batch = engine_class(engine).default_batch_size
    worker.warmup()
    shards = []

    def shard():
        out = worker.run_shard(0, "scaling_prediction", 0, n, batch)
        shards.append(out["rows"])
        return out
    ctx.say(f"worker {engine} x{threads} thread(s): {rounds} rounds of (shard of {n} images, engine alone)")
    t = ctx.interleaved({"worker": shard, "engine alone": lambda: worker.engine.predict(images, batch)},
                        rounds, 1, n_items=n, roots=roots, label=f"worker {engine} x{threads}")
    with conn.cursor() as cur:
        cur.execute("DELETE FROM scaling_prediction WHERE run_id = 0")
    conn.commit()
    if worker.conn is not None:
        worker.conn.close()
    s, a = t["worker"]["wall_s"], t["engine alone"]["wall_s"]
    return {"engine": engine, "threads": threads, "images": n, "batch": batch, "worker_img_per_s": n / s,
            "engine_alone_img_per_s": n / a, "db_share_of_worker_time": max(0.0, (s - a) / s),
            "shard_rows": shards, "timing": t}


def run(ctx, args) -> dict:
    target, conn, ds = open_dataset(args, ctx)
    roots = server_roots(conn, target)
    available = ds.n_test if args.split == "test" else ds.n_train
    n = min(args.rows or available, available)
    relation = ds.bytes_relation(args.split)
    ks = [int(k) for k in args.readers.split(",") if k]
    runs = {k: [] for k in ks}
    checks = []
    with ChildClock(roots) as clock:
        for r in range(args.rounds):
            for k in ks:
                runs[k].append(readers_once(target, relation, ds.shape, n, k))
                ctx.say(f"round {r + 1}: {k} reader(s): {n / runs[k][-1]['wall_s']:,.0f} images/s")
    rows = []
    for k, v in runs.items():
        walls = [x["wall_s"] for x in v]
        ctx.record_noise(f"{k} reader(s)", clock.verdict(walls))
        bad = [x["rows"] for x in v if x["rows"] != n]
        checks.append(check(f"{k} reader(s) read every row", not bad, f"rounds read {[x['rows'] for x in v]} of {n}"))
        per_s = [n / w for w in walls]
        rows.append({"what": f"{k} reader(s)", "images": n, "images_per_s": statistics.median(per_s),
                     "range": [min(per_s), max(per_s)], "mb_per_s": statistics.median(x["mb"] / x["wall_s"] for x in v),
                     "engine_alone_img_per_s": None, "db_share": None})
    workers = []
    engines = [e for e in args.engines.split(",") if e]
    if engines:
        weights = weights_path(args)
        for e in engines:
            for th in (int(t) for t in args.threads.split(",") if t):
                w = measure_worker(ctx, target, conn, ds, e, weights, th, min(args.worker_images, ds.n_test),
                                   args.rounds, roots)
                checks.append(check(f"worker {e} x{th}: every shard returned its rows",
                                    all(x == w["images"] for x in w["shard_rows"]), f"{w['shard_rows']} of {w['images']}"))
                workers.append(w)
                rows.append({"what": f"worker {e} x{th} thread(s)", "images": w["images"],
                             "images_per_s": w["worker_img_per_s"], "range": w["timing"]["worker"]["per_s_range"],
                             "mb_per_s": None, "engine_alone_img_per_s": w["engine_alone_img_per_s"],
                             "db_share": w["db_share_of_worker_time"]})
    conn.close()
    return {"rows": rows, "checks": checks, "dataset": ds.name, "split": args.split, "relation": ".".join(relation),
            "fetch_rows": FETCH_ROWS, "readers": {str(k): v for k, v in runs.items()}, "workers": workers}
