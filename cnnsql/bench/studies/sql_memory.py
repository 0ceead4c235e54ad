"""Peak memory of one SQL query as the rows it reads grow: streaming keeps the reading path flat.

Each size N of --rows runs in a fresh child process (`python -m cnnsql.bench.studies.sql_memory --child`): it
connects through cnnsql's EvaDB, runs `SELECT id, F(img).label FROM pg.<train view> WHERE id < 2` (the engine
loaded), reads its own peak RSS (VmHWM, measure/peak.py), runs `SELECT id, F(img).label FROM pg.<train view>
WHERE id < N` and reports rows returned, wall time of the query, and its peak RSS before and after: the
query's growth is the difference. F is --engine's SQL function; the train view is the loaded dataset's (the
dataset API). `--stock` repeats each size on unpatched EvaDB (which fetches the whole view at once). Each
child's window carries the harness's noise verdict: other processes' share of the machine's CPU, the child
(reaped, RUSAGE_CHILDREN) and the private server's processes counted as the measurement's own. Checks: every
child returned min(N, train rows) rows.
"""
from __future__ import annotations

import json
import subprocess
import sys

from cnnsql.bench.studies import check
from cnnsql.bench.studies._dbstudy import (ChildClock, add_weights_and_dataset, open_dataset, server_roots,
                                           weights_path)

NAME = "sql_memory"
NEEDS_DATABASE = True
SMOKE = ["--rows", "32"]


def arguments(ap) -> None:
    add_weights_and_dataset(ap)
    ap.add_argument("--rows", default="10000,50000", help="comma-separated row counts N (default 10000,50000)")
    ap.add_argument("--engine", default="torch", help="the function's engine (default torch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stock", action="store_true", help="also run each size on unpatched EvaDB")


def child(argv: list[str]) -> dict:
    import argparse
    import time

    from cnnsql.bench.studies import Context
    from cnnsql.measure import peak
    from cnnsql.placements import evadb_patch, evadb_session
    from cnnsql.placements.pgfunctions import sql_name

    ap = argparse.ArgumentParser()
    arguments(ap)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--child-stock", action="store_true")
    args = ap.parse_args(argv)
    if args.child_stock:
        evadb_patch.install = lambda: False
    target, conn, ds = open_dataset(args, Context(progress=False))
    conn.close()
    f, view = sql_name(args.engine), ds.view("train")
    cursor = evadb_session.connect(target, weights=weights_path(args), threads=args.threads)
    evadb_session.run(cursor, f"SELECT id, {f}(img).label FROM pg.{view} WHERE id < 2;")  # the engine loaded
    before = peak.own_peak_mb()
    query = f"SELECT id, {f}(img).label FROM pg.{view} WHERE id < {int(args.n)};"
    t0 = time.perf_counter()
    out = evadb_session.run(cursor, query)
    wall = time.perf_counter() - t0
    high = peak.own_peak_mb()
    return {"rows": len(out), "wall_s": wall, "rss_before_mb": before, "peak_rss_mb": high,
            "query_growth_mb": high - before, "query": query}


def run(ctx, args) -> dict:
    from cnnsql.engines import engine_class

    engine_class(args.engine)
    weights = weights_path(args)
    target, conn, ds = open_dataset(args, ctx)
    roots = server_roots(conn, target)
    conn.close()
    rows, checks = [], []
    base = [sys.executable, "-m", "cnnsql.bench.studies.sql_memory", "--child", "--weights", str(weights),
            "--engine", args.engine, "--threads", str(args.threads)] + (["--dataset", args.dataset] if args.dataset else [])
    for mode in ["patched"] + (["stock"] if args.stock else []):
        for n in (int(x) for x in args.rows.split(",") if x):
            cmd = base + ["--n", str(n)] + (["--child-stock"] if mode == "stock" else [])
            with ChildClock(roots) as clock:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            out, err = proc.stdout, proc.stderr
            ctx.record_noise(f"{mode} {n} rows (child process)", clock.verdict())
            if proc.returncode != 0:
                checks.append(check(f"{mode} {n}: child ran", False, (err.strip().splitlines() or ["?"])[-1][:300]))
                continue
            res = json.loads(out.strip().splitlines()[-1])
            want = min(n, ds.n_train)
            checks.append(check(f"{mode} {n}: rows returned", res["rows"] == want, f"{res['rows']} of {want}"))
            rows.append({"mode": mode, "n": n, "rows": res["rows"], "wall_s": res["wall_s"],
                         "rss_before_mb": res["rss_before_mb"], "peak_rss_mb": res["peak_rss_mb"],
                         "query_growth_mb": res["query_growth_mb"]})
            ctx.say(f"{mode} {n}: {res['rows']} rows in {res['wall_s']:.2f} s, query growth {res['query_growth_mb']:.1f} MB")
    patched = [r for r in rows if r["mode"] == "patched"]
    growth = (patched[-1]["query_growth_mb"] - patched[0]["query_growth_mb"]) if len(patched) > 1 else None
    return {"rows": rows, "checks": checks, "dataset": ds.name, "weights": str(weights),
            "growth_first_to_last_size_mb": growth,
            "query": f"SELECT id, <{args.engine}>(img).label FROM pg.{ds.view('train')} WHERE id < N;"}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2:])))
    else:
        raise SystemExit("run it as `cnnsql study sql_memory`")
