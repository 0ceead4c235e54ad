"""Inference inside PostgreSQL (PL/Python) against the raw engine, interleaved, on the loaded test split.

Installs the cnnsql.<Engine>CNN functions with --weights and --threads (as `cnnsql db functions install`),
then per engine, on the first --images test images of the loaded dataset (the dataset API: its binary view
cnnsql_bytes.<test view>_bytes), after one untimed warm-up of each side:
  offline: --rounds x (raw engine.predict on the images already in this process, then the batched SQL
    function `cnnsql.<e>cnn_batch(ids, imgs)` over the same images grouped per the engine's batch, every
    row fetched through psycopg2), alternating so both see the same load (measure.stats.interleave, its
    noise verdict; the private server's processes count as the measurement's own); medians and the
    median of the per-round ratios;
  one image: --single x (`SELECT id, p.* FROM <view>, cnnsql.<e>cnn(img) p WHERE id = k` through psycopg2,
    then the raw engine on that image), alternating; p50/p99; then the same query --single times by a real
    psql (one connection, its own \\timing), run as a child process (its window's noise verdict recorded, psql's
    CPU counted as ours);
  memory: the backend's VmRSS/VmHWM after the runs (cnnsql.runtime_info()).
Checks: the in-database results equal the raw engine's (top-1 all equal, probabilities within 1e-5).
Needs PL/Python on the server (plpython3u).
"""
from __future__ import annotations

import re
import subprocess
import tempfile

import numpy as np

from cnnsql.bench.studies import check
from cnnsql.bench.studies._dbstudy import (ChildClock, add_weights_and_dataset, open_dataset, server_roots,
                                           weights_path)

NAME = "indb_speed"
NEEDS_DATABASE = True
SMOKE = ["--engines", "torch", "--images", "32", "--rounds", "2", "--single", "3"]


def arguments(ap) -> None:
    add_weights_and_dataset(ap)
    ap.add_argument("--engines", default="torch", help="comma-separated (default torch)")
    ap.add_argument("--images", type=int, default=10000, help="the first N test images (default 10000)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating offline rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single", type=int, default=200, help="one-image queries of each kind")


def pct(values_s, q) -> float:
    return float(np.percentile(np.asarray(values_s) * 1000, q))


def queries(ds, engine: str):
    from psycopg2 import sql

    from cnnsql.placements.pgfunctions import SCHEMA, sql_name

    schema, view = ds.bytes_relation("test")
    rel = sql.Identifier(schema, view)
    fn = sql.Identifier(SCHEMA, sql_name(engine).lower())
    batch_fn = sql.Identifier(SCHEMA, sql_name(engine).lower() + "_batch")
    batch = sql.SQL("SELECT p.id, p.label, p.probs FROM (SELECT id / %(batch)s AS b, array_agg(id ORDER BY id) AS ids, "
                    "array_agg(img ORDER BY id) AS imgs FROM {} WHERE id < %(n)s GROUP BY 1) g, {}(g.ids, g.imgs) p"
                    ).format(rel, batch_fn)
    one = sql.SQL("SELECT id, p.* FROM {}, {}(img) p WHERE id = %(k)s").format(rel, fn)
    return batch, one


def psql_single(ctx, conn, target, one_query, ids, count: int, roots) -> list[float]:
    """Seconds of `count` one-image queries as psql's \\timing reports them (one warm-up query first)."""

    def text(k):
        with conn.cursor() as cur:
            return cur.mogrify(one_query, {"k": int(k)}).decode() + ";"
    lines = ["\\timing off", text(ids[0]), "\\timing on"] + [text(ids[(7 * i) % len(ids)]) for i in range(count)]
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        with ChildClock(roots) as clock:
            proc = subprocess.run(["psql", target.url(), "-X", "-q", "-o", "/dev/null", "-v", "ON_ERROR_STOP=1",
                                   "-f", f.name], capture_output=True, text=True)
        out, err = proc.stdout, proc.stderr
    ctx.record_noise("psql one-image queries (child process)", clock.verdict())
    times = [float(m) / 1000 for m in re.findall(r"^Time: ([0-9.]+) ms", out + err, re.M)]
    if proc.returncode != 0 or len(times) != count:
        raise RuntimeError(f"psql: {len(times)} timings of {count} (exit {proc.returncode}): {err.strip()[-300:]}")
    return times


def run(ctx, args) -> dict:
    from cnnsql import db
    from cnnsql.data import datasets
    from cnnsql.engines import engine_class, get_engine
    from cnnsql.measure import stats
    from cnnsql.models.weights import load_weights
    from cnnsql.placements import pgfunctions

    engines = [e for e in args.engines.split(",") if e]
    weights = weights_path(args)
    target, conn, ds = open_dataset(args, ctx)
    ctx.say(f"installing cnnsql functions for {', '.join(engines)} (weights {weights}, {args.threads} threads)")
    pgfunctions.install(target, engines, weights, args.threads)
    ids, images, _ = datasets.fetch_split(conn, ds, "test", limit=args.images)
    conn.close()
    n = len(ids)
    rows, checks, detail = [], [], {}
    for name in engines:
        batch = engine_class(name).default_batch_size
        eng = get_engine(name, load_weights(weights), threads=args.threads)
        c = db.connect(target)
        c.autocommit = True
        roots = server_roots(c, target)
        batch_q, one_q = queries(ds, name)

        def indb():
            with c.cursor() as cur:
                cur.execute(batch_q, {"batch": batch, "n": int(ids[-1]) + 1})
                return cur.fetchall()

        ref = eng.predict(images, batch)
        got = indb()
        order = np.argsort([r[0] for r in got])
        probs = np.array([got[i][2] for i in order], dtype=np.float32)
        same = float((probs.argmax(1) == ref.argmax(1)).mean()) if len(probs) == n else 0.0
        diff = float(np.abs(probs - ref).max()) if len(probs) == n else float("inf")
        checks.append(check(f"{name}: in-database rows equal the raw engine's", same == 1.0 and diff <= 1e-5,
                            f"{len(got)} rows of {n}, top-1 equal {same:.4f}, max |dp| {diff:.1e}"))
        ctx.say(f"[{name}] offline: {args.rounds} alternating rounds of raw and in-database on {n} images (batch {batch})")
        off = ctx.interleaved({"raw": lambda: eng.predict(images, batch), "indb": indb}, args.rounds, 1, n_items=n,
                              roots=roots, label=f"{name} offline")
        it = iter(range(10 ** 9))
        at = {"k": 0}

        def one_sql():
            at["k"] = (7 * next(it)) % n
            with c.cursor() as cur:
                cur.execute(one_q, {"k": int(ids[at["k"]])})
                return cur.fetchall()
        ctx.say(f"[{name}] one image: {args.single} x (psycopg2 query, raw call), then {args.single} psql queries")
        one = ctx.interleaved({"psycopg2": one_sql, "raw": lambda: eng.predict(images[at["k"]][None], 1)},
                              args.single, 1, roots=roots, judge_spread=False, label=f"{name} one image")
        with c.cursor() as cur:
            cur.execute("SELECT cnnsql.runtime_info()")
            info = cur.fetchone()[0]
        one_psql = psql_single(ctx, c, target, one_q, ids, args.single, roots)
        c.close()
        ratio = stats.paired_ratio(off["raw"]["walls"], off["indb"]["walls"])
        rows.append({"engine": name, "images": n, "batch": batch, "raw_img_per_s": off["raw"]["per_s"],
                     "indb_img_per_s": off["indb"]["per_s"], "indb_over_raw_speed": ratio["median"],
                     "ratio_range": [ratio["min"], ratio["max"]], "psql_one_p50_ms": pct(one_psql, 50),
                     "psql_one_p99_ms": pct(one_psql, 99), "psycopg2_one_p50_ms": pct(one["psycopg2"]["walls"], 50),
                     "raw_one_p50_ms": pct(one["raw"]["walls"], 50), "backend_vmrss_mb": info.get("vmrss_mb"),
                     "backend_vmhwm_mb": info.get("vmhwm_mb")})
        detail[name] = {"offline": off, "one_image": one, "psql_one_image_s": one_psql, "top1_equal": same,
                        "max_prob_diff": diff, "threads": args.threads}
    return {"rows": rows, "checks": checks, "detail": detail, "dataset": ds.name, "weights": str(weights)}
