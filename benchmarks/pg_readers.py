"""How fast one PostgreSQL hands out images: K concurrent readers, and one Ray-style worker per engine.

    .venv/bin/python benchmarks/pg_readers.py --readers 1,2,4,8 --rounds 3 [--split test] [--rows N]
        [--weights W.npz --engines torch,tensorflow --threads 1,2 --worker-images 4000]

Readers: the first N images of the split (default all) are cut into K id ranges; K processes (forked,
connected before the clock starts) each stream theirs with `SELECT id, img FROM cifar_image_<split>
WHERE id >= lo AND id < hi` through a server-side cursor, 2,048 rows per fetch, into NumPy (what a worker
does before its engine). Aggregate images/s = N / (last reader done - common start). The K values
alternate within each round (1, 2, 4, 8, 1, 2, ...) so they see the same machine; medians of the rounds.
Worker: `cnnsql.placements.ray_worker.ShardWorker` (the Ray actor's own class, here without Ray) runs one shard of
`--worker-images` test images: read, predict, upsert the predictions into a scratch table
`scaling_prediction`, committing per batch; beside it the engine alone on the same images in memory.
Prints one JSON object (and a table on stderr) with the 1-minute load average around every measurement.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time


FETCH_ROWS = 2048


def _reader(dsn_target, split: str, lo: int, hi: int, barrier, queue) -> None:
    import numpy as np

    from cnnsql import db

    conn = db.connect(dsn_target)
    barrier.wait()
    rows = nbytes = 0
    with conn.cursor(name="reader") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(f"SELECT id, img FROM cifar_image_{split} WHERE id >= %s AND id < %s", (lo, hi))
        while batch := cur.fetchmany(FETCH_ROWS):
            images = np.frombuffer(b"".join(r[1] for r in batch), np.uint8).reshape(-1, 3, 32, 32)
            rows += len(batch)
            nbytes += images.nbytes
    queue.put((rows, nbytes, time.perf_counter()))
    conn.close()


def readers_once(target, split: str, n: int, k: int) -> dict:
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(k + 1), ctx.Queue()
    edges = [round(i * n / k) for i in range(k + 1)]
    procs = [ctx.Process(target=_reader, args=(target, split, edges[i], edges[i + 1], barrier, queue))
             for i in range(k)]
    for p in procs:
        p.start()
    load = os.getloadavg()[0]
    barrier.wait()
    t0 = time.perf_counter()
    done = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    wall = max(d[2] for d in done) - t0
    rows = sum(d[0] for d in done)
    if rows != n:
        raise SystemExit(f"pg_readers: {k} readers read {rows} rows, expected {n}")
    return {"wall_s": wall, "images_per_s": rows / wall, "mb_per_s": sum(d[1] for d in done) / wall / 1e6,
            "loadavg": [load, os.getloadavg()[0]]}


def measure_readers(target, split: str, n: int, ks: list[int], rounds: int) -> dict:
    runs = {k: [] for k in ks}
    for r in range(rounds):
        for k in ks:
            runs[k].append(readers_once(target, split, n, k))
            print(f"round {r + 1}: {k} reader(s): {runs[k][-1]['images_per_s']:.0f} images/s "
                  f"(load avg {runs[k][-1]['loadavg'][0]:.1f})", file=sys.stderr, flush=True)
    return {str(k): {"images_per_s": statistics.median(x["images_per_s"] for x in v),
                     "mb_per_s": statistics.median(x["mb_per_s"] for x in v),
                     "min_max": [min(x["images_per_s"] for x in v), max(x["images_per_s"] for x in v)],
                     "loadavg": [x["loadavg"] for x in v]} for k, v in runs.items()}


def measure_worker(target, engine: str, weights: str, threads: int, n: int, rounds: int) -> dict:
    """ShardWorker.run_shard (read + predict + upsert) and the engine alone, alternating."""
    from cnnsql.data import cifar_table as data
    from cnnsql import db
    from cnnsql.placements import ray_local
    from cnnsql.bench import ray_runner
    from cnnsql.placements import ray_worker
    from cnnsql.engines import engine_class
    from cnnsql.models.weights import load_weights

    conn = db.connect(target)
    ray_runner.ensure_table(conn, "scaling_prediction")
    _, images, _ = data.fetch_split(conn, "test", limit=n)
    worker = ray_worker.ShardWorker(engine, load_weights(weights), threads, ray_local.worker_dsn(target),
                                    ray_local.worker_secrets(target, None), ("cnnsql_bytes", "cifar_test_bytes"))
    batch = engine_class(engine).default_batch_size
    worker.warmup()
    worker.run_shard(0, "scaling_prediction", 0, min(n, 2 * batch), batch)  # warm-up: connection, upsert plan
    shard, alone = [], []
    for _ in range(rounds):
        load = os.getloadavg()[0]
        out = worker.run_shard(0, "scaling_prediction", 0, n, batch)
        shard.append({"wall_s": out["seconds"], "loadavg": load})
        t0 = time.perf_counter()
        worker.engine.predict(images, batch)
        alone.append(time.perf_counter() - t0)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM scaling_prediction WHERE run_id = 0")
    conn.commit()
    conn.close()
    s, a = statistics.median(x["wall_s"] for x in shard), statistics.median(alone)
    return {"engine": engine, "threads": threads, "images": n, "batch": batch, "worker_images_per_s": n / s,
            "engine_alone_images_per_s": n / a, "db_share_of_worker_time": max(0.0, (s - a) / s),
            "walls": [x["wall_s"] for x in shard], "engine_walls": alone, "loadavg": [x["loadavg"] for x in shard]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readers", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--split", choices=["test", "train"], default="test")
    ap.add_argument("--rows", type=int, help="read the first N images of the split (default: all)")
    ap.add_argument("--weights", help="also measure one worker per engine with this weights file")
    ap.add_argument("--engines", default="torch,tensorflow")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--worker-images", type=int, default=4000)
    args = ap.parse_args()
    from cnnsql import db

    target = db.resolve()
    with db.connection(target) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM cifar_image_{args.split}")
        (available,) = cur.fetchone()
    n = min(args.rows or available, available)
    out = {"split": args.split, "images": n, "fetch_rows": FETCH_ROWS, "cpus": os.cpu_count(),
           "readers": measure_readers(target, args.split, n, [int(k) for k in args.readers.split(",")], args.rounds)}
    if args.weights:
        out["workers"] = [measure_worker(target, e, args.weights, int(t), min(args.worker_images, available),
                                         args.rounds)
                          for e in args.engines.split(",") for t in args.threads.split(",")]
    for k, r in out["readers"].items():
        print(f"{k} reader(s): {r['images_per_s']:,.0f} images/s ({r['mb_per_s']:.0f} MB/s), "
              f"rounds {r['min_max'][0]:,.0f}-{r['min_max'][1]:,.0f}", file=sys.stderr)
    for w in out.get("workers", []):
        print(f"worker {w['engine']} x{w['threads']} thread(s): {w['worker_images_per_s']:,.0f} images/s "
              f"(engine alone {w['engine_alone_images_per_s']:,.0f}; database share {w['db_share_of_worker_time']:.0%})",
              file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
