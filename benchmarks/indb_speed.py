"""Inference inside PostgreSQL against the raw engine, interleaved, on the loaded test split.

    python benchmarks/indb_speed.py --weights W.npz [--engines torch] [--rounds 5] [--threads 2]

Installs the cnnsql.<Engine>CNN functions with W and THREADS (as `cnnsql db functions install`),
then per engine, after one untimed warm-up of each:
  offline: ROUNDS x (raw engine.predict on the test images already in this process, then the
           batched SQL function over the same images, every row fetched through psycopg2),
           alternating so that both see the same machine load; medians and the ratio;
  one image: SINGLE queries `SELECT ... cnnsql.<E>CNN(img) ... WHERE id = k` timed by psql's own
           \\timing (a real psql, one connection), and the same through psycopg2; p50/p99;
  memory: the backend's VmRSS/VmHWM after the runs (runtime_info()).
Results must equal the raw engine's (top-1 all equal, probabilities within 1e-5) or it stops.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from cnnsql.data import cifar_table as data
from cnnsql import db
from cnnsql.placements import pgfunctions
from cnnsql.engines import engine_class, get_engine
from cnnsql.models.weights import load_weights

BATCH_QUERY = """SELECT p.id, p.label, p.probs FROM (
    SELECT id / %(batch)s AS b, array_agg(id ORDER BY id) AS ids, array_agg(img ORDER BY id) AS imgs
    FROM cifar_image_test WHERE id < %(n)s GROUP BY 1) g, cnnsql.{fn}_batch(g.ids, g.imgs) p"""
ONE_QUERY = "SELECT id, p.* FROM cifar_image_test, cnnsql.{fn}(img) p WHERE id = {k};"


def pct(values, q):
    return float(np.percentile(np.asarray(values), q))


def psql_single(url: str, fn: str, n: int, count: int) -> list[float]:
    """Times (ms) of `count` one-image queries as psql's \\timing reports them; one warm-up query first."""
    lines = ["\\timing off", ONE_QUERY.format(fn=fn, k=0), "\\timing on"]
    lines += [ONE_QUERY.format(fn=fn, k=(7 * i) % n) for i in range(count)]
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        out = subprocess.run(["psql", url, "-X", "-q", "-o", "/dev/null", "-v", "ON_ERROR_STOP=1", "-f", f.name],
                             capture_output=True, text=True, check=True)
    times = [float(m) for m in re.findall(r"^Time: ([0-9.]+) ms", out.stdout + out.stderr, re.M)]
    assert len(times) == count, out.stderr[-500:]
    return times


def bench_engine(target, name: str, weights: Path, threads: int, rounds: int, single: int, ids, images) -> dict:
    n = len(ids)
    batch = engine_class(name).default_batch_size
    eng = get_engine(name, load_weights(weights), threads=threads)
    conn = db.connect(target)
    conn.autocommit = True
    fn = pgfunctions.sql_name(name)
    q = BATCH_QUERY.format(fn=fn)

    def indb():
        with conn.cursor() as cur:
            cur.execute(q, {"batch": batch, "n": n})
            return cur.fetchall()

    ref = eng.predict(images, batch)  # warm-up of the raw engine
    rows = indb()                    # warm-up of the backend (loads the engine there)
    order = np.argsort([r[0] for r in rows])
    probs = np.array([rows[i][2] for i in order], dtype=np.float32)
    same, diff = float((probs.argmax(1) == ref.argmax(1)).mean()), float(np.abs(probs - ref).max())
    if same < 1.0 or diff > 1e-5:
        raise SystemExit(f"{name}: in-database results differ from the raw engine (top-1 {same}, max diff {diff})")
    raw_s, indb_s = [], []
    for _ in range(rounds):  # raw, then in the database: the same load for both
        t = time.perf_counter(); eng.predict(images, batch); raw_s.append(time.perf_counter() - t)
        t = time.perf_counter(); indb(); indb_s.append(time.perf_counter() - t)
    one_py, one_raw = [], []
    with conn.cursor() as cur:
        for i in range(single):  # alternating: a one-image query, then the raw engine on one image
            k = (7 * i) % n
            t = time.perf_counter()
            cur.execute(ONE_QUERY.format(fn=fn, k=k))
            cur.fetchall()
            one_py.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            eng.predict(images[k:k + 1], 1)
            one_raw.append(1000 * (time.perf_counter() - t))
        cur.execute("SELECT cnnsql.runtime_info()")
        info = cur.fetchone()[0]
    conn.close()
    one_psql = psql_single(target.url(), fn, n, single)
    raw_m, indb_m = (statistics.median(raw_s), statistics.median(indb_s)) if rounds else (float("nan"),) * 2
    return {"engine": name, "images": n, "batch": batch, "threads": threads, "rounds": rounds,
            "raw_images_per_s": n / raw_m, "indb_images_per_s": n / indb_m, "indb_over_raw_speed": raw_m / indb_m,
            "raw_s": raw_s, "indb_s": indb_s, "top1_equal": same, "max_prob_diff": diff,
            "psql_one_image_ms": {"p50": pct(one_psql, 50), "p99": pct(one_psql, 99), "n": single},
            "psycopg2_one_image_ms": {"p50": pct(one_py, 50), "p99": pct(one_py, 99), "n": single},
            "raw_one_image_ms": {"p50": pct(one_raw, 50), "p99": pct(one_raw, 99), "n": single},
            "backend_vmrss_mb": info.get("vmrss_mb"), "backend_vmhwm_mb": info.get("vmhwm_mb")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--engines", default="torch")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5, help="alternating offline rounds (0: one-image part only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single", type=int, default=200)
    args = ap.parse_args()
    engines = args.engines.split(",")
    target = db.resolve()
    pgfunctions.install(target, engines, args.weights, args.threads)
    with db.connection(target) as conn:
        ids, images, _ = data.fetch_split(conn, "test")
    ids, images = ids[:args.images], images[:args.images]
    for name in engines:
        r = bench_engine(target, name, args.weights.absolute(), args.threads, args.rounds, args.single, ids, images)
        print(json.dumps(r))
        print(f"{name}: raw {r['raw_images_per_s']:.0f} img/s, inside PostgreSQL {r['indb_images_per_s']:.0f} img/s "
              f"({100 * r['indb_over_raw_speed']:.0f}% of raw; medians of {r['rounds']} alternating rounds, "
              f"{r['images']} images, batch {r['batch']}, {r['threads']} threads); one image from psql p50 "
              f"{r['psql_one_image_ms']['p50']:.2f} ms p99 {r['psql_one_image_ms']['p99']:.2f} ms, psycopg2 p50 "
              f"{r['psycopg2_one_image_ms']['p50']:.2f} ms (raw engine, one image, alternating with those: p50 "
              f"{r['raw_one_image_ms']['p50']:.2f} ms); backend RSS {r['backend_vmrss_mb']} MB "
              f"(peak {r['backend_vmhwm_mb']} MB); top-1 equal {r['top1_equal']}, max prob diff {r['max_prob_diff']:.1e}")


if __name__ == "__main__":
    main()
