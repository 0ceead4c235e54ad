"""The SQL path against the raw engine, measured in one process with interleaved repetitions.

    .venv/bin/python benchmarks/sql_path.py --weights W.npz [--engines torch,tensorflow] [--reps 5]

Per engine: the one-image query `SELECT id, F(img) FROM pg.cifar_test WHERE id = K` (p50/p99 over
--single queries, K cycling) against one raw one-image call; then the whole test split, raw and
through `SELECT id, F(img) FROM pg.cifar_test;`, alternated raw, SQL, raw, SQL... (--reps each,
after one warm-up of each) so drift hits both; the ratio is reported as the median of the
per-pair ratios with their min and max. `--stock` runs the one-image query on unpatched EvaDB in a
child process for comparison. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

FUNCTION = {"torch": "TorchCNN", "tensorflow": "TensorflowCNN", "velox": "VeloxCNN"}


def timed(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def one_image(cursor, function: str, n: int) -> dict:
    """Wall and CPU time (this process, all threads; the server's share is not in it) per query."""
    from cnnsql.placements import evadb_session

    walls, cpus = [], []
    for k in range(n + 1):
        c0, t0 = time.process_time(), time.perf_counter()
        evadb_session.run(cursor, f"SELECT id, {function}(img) FROM pg.cifar_test WHERE id = {k};")
        walls.append(1000 * (time.perf_counter() - t0))
        cpus.append(1000 * (time.process_time() - c0))
    walls, cpus = walls[1:], cpus[1:]
    return {"p50_ms": float(np.percentile(walls, 50)), "p99_ms": float(np.percentile(walls, 99)),
            "cpu_p50_ms": float(np.percentile(cpus, 50)), "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--engines", default="torch,tensorflow")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--single", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stock", action="store_true", help="also time the one-image query on unpatched EvaDB")
    ap.add_argument("--stock-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from cnnsql.data import cifar_table as data
    from cnnsql import db
    from cnnsql.placements import evadb_function
    from cnnsql.placements import evadb_patch
    from cnnsql.placements import evadb_session

    if args.stock_child:
        evadb_patch.install = lambda: False
    cursor = evadb_session.connect(weights=args.weights, threads=args.threads)
    if args.stock_child:
        print(json.dumps({e: one_image(cursor, FUNCTION[e], args.single) for e in args.engines.split(",")}))
        return
    conn = db.connect(db.resolve())
    ids, images, _ = data.fetch_split(conn, "test")
    out = {"images": len(ids), "threads": args.threads, "reps": args.reps, "engines": {}}
    for name in args.engines.split(","):
        engine = evadb_function.cached_engine(name, str(Path(args.weights).resolve()), "cpu", args.threads)
        bs, function = engine.default_batch_size, FUNCTION[name]
        query = f"SELECT id, {function}(img) FROM pg.cifar_test;"
        raw_one, raw_cpu = [], []
        for _ in range(args.single):
            c0 = time.process_time()
            raw_one.append(1000 * timed(lambda: engine.predict(images[:1], 1)))
            raw_cpu.append(1000 * (time.process_time() - c0))
        result = {"raw_one_image_p50_ms": float(np.median(raw_one)), "raw_one_image_cpu_ms": float(np.median(raw_cpu)),
                  **one_image(cursor, function, args.single)}
        evadb_session.run(cursor, query), engine.predict(images, bs)  # warm-up of each
        raw, sql = [], []
        for _ in range(args.reps):
            raw.append(timed(lambda: engine.predict(images, bs)))
            sql.append(timed(lambda: evadb_session.run(cursor, query)))
        ratios = [s / r for s, r in zip(sql, raw)]
        result.update(raw_s=statistics.median(raw), sql_s=statistics.median(sql),
                      sql_over_raw=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                      raw_range_s=[min(raw), max(raw)], sql_range_s=[min(sql), max(sql)])
        out["engines"][name] = result
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    if args.stock:
        child = subprocess.run([sys.executable, __file__, "--stock-child", "--weights", args.weights,
                                "--engines", args.engines, "--single", str(max(5, args.single // 5))],
                               capture_output=True, text=True, check=True)
        out["stock_one_image"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
