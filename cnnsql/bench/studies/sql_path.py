"""The SQL path (EvaDB) against the raw engine in one process, one image and the whole test split, interleaved.

Per engine, on the loaded dataset's test split (its first --limit images when given) with --weights:
  one image: the benchmark's one-image query (sql/queries/single_stream.sql, `SELECT id, F(img) FROM
    pg.<test view> WHERE id = K`, K cycling over the split) and one raw one-image call of the same engine
    object EvaDB's function uses, alternating, --single times each after one warm-up of each; p50/p99 wall
    and median CPU (this process's threads and the private server's processes) per call;
  offline: the benchmark's offline query (sql/queries/offline.sql) against the raw engine on the same
    images at its default batch, alternated raw, SQL, raw, SQL ... (--reps each after --warmup of each)
    so drift hits both; the SQL/raw ratio is the median of the per-pair ratios with their min and max.
Both run twice over: through cnnsql's EvaDB as users get it (the plan cache on: placements/evadb_patch/
plan_cache.py) and, interleaved with them, through a second EvaDB with the plan cache off (`uncached`,
the baseline); two warm-up rounds at least, since a shape runs directly from its third execution.
Timing and the noise verdict: measure.stats.interleave (the harness's loop). Checks: every SQL row's
label equals the raw engine's top-1 (near-ties, top-2 within 1e-3, excepted) and every id comes back once;
the one-image query answers its id. `--stock` times the one-image query on unpatched EvaDB in a child
process (`python -m cnnsql.bench.studies.sql_path --stock-child`), with the child's own noise verdict.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np

from cnnsql.bench.studies import check
from cnnsql.bench.studies._dbstudy import add_weights_and_dataset, open_dataset, query, server_roots, weights_path

NAME = "sql_path"
NEEDS_DATABASE = True
SMOKE = ["--engines", "torch", "--limit", "64", "--reps", "2", "--single", "3"]


def arguments(ap) -> None:
    add_weights_and_dataset(ap)
    ap.add_argument("--engines", default="torch,tensorflow", help="comma-separated (default: torch,tensorflow)")
    ap.add_argument("--limit", type=int, help="the first N test images (default: the whole split)")
    ap.add_argument("--reps", type=int, default=5, help="timed offline rounds (raw and SQL each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    ap.add_argument("--single", type=int, default=50, help="one-image calls of each side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stock", action="store_true", help="also time the one-image query on unpatched EvaDB")


def pct(walls, q) -> float:
    return float(np.percentile(np.asarray(walls) * 1000, q))


def one_image_queries(cursor, ds, ids, function: str):
    """A call running the one-image query for the next id (cycling) and checking the row it returns."""
    from cnnsql.placements import evadb_session

    order = itertools.cycle(ids)

    def call():
        k = int(next(order))
        df = evadb_session.run(cursor, query("single_stream", ds, function=function, id=k))
        if len(df) != 1 or int(df["id"].iloc[0]) != k:
            raise RuntimeError(f"the one-image query for id {k} returned {len(df)} row(s)")
        return df
    return call


def run(ctx, args) -> dict:
    from cnnsql.data import datasets
    from cnnsql.engines import engine_class
    from cnnsql.measure import stats
    from cnnsql.placements import evadb_function, evadb_session
    from cnnsql.placements.pgfunctions import sql_name

    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        engine_class(e)  # an unknown engine is one line
    weights = weights_path(args)
    target, conn, ds = open_dataset(args, ctx)
    ids, images, _ = datasets.fetch_split(conn, ds, "test", limit=args.limit)
    n = len(ids)
    where = f" WHERE id < {int(ids[-1]) + 1}" if args.limit and args.limit < ds.n_test else ""
    roots = server_roots(conn, target)
    cursor = evadb_session.connect(target, weights=weights, threads=args.threads)
    uncached = evadb_session.connect(target, weights=weights, threads=args.threads, plan_cache=False)
    rows, checks, detail = [], [], {}
    for name in engines:
        engine = evadb_function.cached_engine(name, str(weights), "cpu", args.threads)
        bs, function = engine.default_batch_size, sql_name(name)
        q = query("offline", ds, function=function, where=where)
        ctx.say(f"[{name}] one image: {args.single} x (raw call, `{query('single_stream', ds, function=function, id='K')}`)")
        cycle = itertools.cycle(range(n))
        one = ctx.interleaved({"raw": lambda: engine.predict(images[next(cycle)][None], 1),
                               "sql": one_image_queries(cursor, ds, ids, function),
                               "sql_uncached": one_image_queries(uncached, ds, ids, function)},
                              args.single, 2, roots=roots, judge_spread=False, label=f"{name} one image")
        ctx.say(f"[{name}] offline on {n} images: raw (batch {bs}) / `{q}`, {args.warmup} warm-up + {args.reps} rounds")
        off = ctx.interleaved({"raw": lambda: engine.predict(images, bs), "sql": lambda: evadb_session.run(cursor, q),
                               "sql_uncached": lambda: evadb_session.run(uncached, q)},
                              args.reps, max(2, args.warmup), n_items=n, roots=roots, label=f"{name} offline")
        raw_probs = engine.predict(images, bs)
        df = evadb_session.run(cursor, q)
        got = dict(zip(df["id"].astype(int), df["label"].astype(int)))
        top2 = np.sort(raw_probs, axis=1)[:, -2:]
        differ = sum(1 for i, k in enumerate(ids) if got.get(int(k)) != int(raw_probs[i].argmax())
                     and top2[i, 1] - top2[i, 0] >= 1e-3)
        checks.append(check(f"{name}: every id once", len(df) == n and set(got) == set(map(int, ids)),
                            f"{len(df)} rows, {len(set(got))} distinct ids, expected {n}"))
        checks.append(check(f"{name}: SQL labels equal the raw engine's top-1", differ == 0,
                            f"{differ} of {n} differ (near-ties excepted)"))
        ratio = stats.paired_ratio(off["sql"]["walls"], off["raw"]["walls"])
        base = stats.paired_ratio(off["sql_uncached"]["walls"], off["raw"]["walls"])
        rows.append({"engine": name, "images": n, "batch": bs,
                     "raw_img_per_s": off["raw"]["per_s"], "sql_img_per_s": off["sql"]["per_s"],
                     "sql_over_raw": ratio["median"], "ratio_range": [ratio["min"], ratio["max"]],
                     "uncached_over_raw": base["median"], "uncached_range": [base["min"], base["max"]],
                     "raw_one_p50_ms": pct(one["raw"]["walls"], 50), "sql_one_p50_ms": pct(one["sql"]["walls"], 50),
                     "sql_one_p99_ms": pct(one["sql"]["walls"], 99),
                     "uncached_one_p50_ms": pct(one["sql_uncached"]["walls"], 50)})
        detail[name] = {"query": q, "offline": off, "one_image": one,
                        "raw_one_image_cpu_ms": 1000 * one["raw"]["cpu_s"], "sql_one_image_cpu_ms": 1000 * one["sql"]["cpu_s"]}
    conn.close()
    out = {"rows": rows, "checks": checks, "detail": detail, "dataset": ds.name, "weights": str(weights),
           "threads": args.threads}
    if args.stock:
        cmd = [sys.executable, "-m", "cnnsql.bench.studies.sql_path", "--stock-child", "--weights", str(weights),
               "--engines", ",".join(engines), "--single", str(max(5, args.single // 5)), "--threads", str(args.threads)]
        if args.dataset:
            cmd += ["--dataset", args.dataset]
        ctx.say("stock EvaDB (unpatched) one-image query, in a child process")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            checks.append(check("stock EvaDB child ran", False, (proc.stderr.strip().splitlines() or ["?"])[-1][:300]))
        else:
            stock = json.loads(proc.stdout.strip().splitlines()[-1])
            for name, t in stock.items():
                ctx.record_noise(f"{name} stock one image (child)", t)
                for r in rows:
                    if r["engine"] == name:
                        r["stock_one_p50_ms"] = pct(t["walls"], 50)
            out["stock_one_image"] = stock
    return out


def stock_child(argv: list[str]) -> None:
    """The one-image query on unpatched EvaDB (its own process: the patch cannot be undone in one)."""
    import argparse

    from cnnsql.bench.studies import Context
    from cnnsql.data import datasets
    from cnnsql.placements import evadb_patch, evadb_session
    from cnnsql.placements.pgfunctions import sql_name

    ap = argparse.ArgumentParser()
    arguments(ap)
    args = ap.parse_args(argv)
    evadb_patch.install = lambda: False
    ctx = Context(progress=False)
    target, conn, ds = open_dataset(args, ctx)
    ids = [int(i) for i in datasets.fetch_split(conn, ds, "test", limit=64)[0]]
    roots = server_roots(conn, target)
    cursor = evadb_session.connect(target, weights=weights_path(args), threads=args.threads)
    out = {}
    for name in filter(None, args.engines.split(",")):
        t = ctx.interleaved({"sql": one_image_queries(cursor, ds, ids, sql_name(name))}, args.single, 1, roots=roots,
                            judge_spread=False)["sql"]
        out[name] = t
    conn.close()
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stock-child"]:
        stock_child(sys.argv[2:])
    else:
        raise SystemExit("run it as `cnnsql study sql_path`")
