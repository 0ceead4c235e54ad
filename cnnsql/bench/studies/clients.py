"""Many clients at once (MLPerf's server scenario), directly and through PgBouncer: one-image queries.

One-image queries to the functions inside PostgreSQL, each client on its own connection, directly to
the private cluster or through PgBouncer.

For each --via (direct: the cluster's socket; pooler: `cnnsql db pooler`, PgBouncer in transaction
pooling with --pool-size server connections) and each --clients count N, N client processes (forked)
connect, send one warm-up query each (its wall is the warm-up figure: a new backend imports its
framework), wait at a barrier, then send
    SELECT (cnnsql.<Engine>CNN(img)).label FROM <test view> WHERE id = %s
for --seconds: back to back (closed loop), or, with --rates R1,R2,..., at each R queries/s in all
(open loop, the rates stepped up per client count), each client on a fixed schedule, latency counted
from the scheduled time (no coordinated omission); per (via, clients) the best row is the highest
answered rate whose p99 stays within --p99-ms. Every answer is
checked against the raw engine's label for that image; an error is counted with its first line.
Figures per cell: queries/s, p50/p99 latency (ms), wrong answers, errors, the warm-up wall of the
slowest client, and the server's memory: the peak sum of RssAnon over all its processes (backends
with a loaded framework dominate; measure.monitor.ServerSampler, every 0.2 s). Cells run in turn
(direct then pooler for each N); noise: the Clock's rule (other processes' CPU share) per cell.
Checks: no wrong answer, no error. The functions are installed with --weights (default weights).
Private cluster only (it installs functions and starts the pooler).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from cnnsql.bench.studies import check

NAME = "clients"
NEEDS_DATABASE = True
SMOKE = ["--clients", "1,2", "--seconds", "1", "--images", "8", "--via", "direct,pooler"]


def arguments(ap) -> None:
    ap.add_argument("--weights", type=Path, help="weights file (default: the benchmark's default weights)")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--via", default="direct,pooler", help="direct, pooler or both")
    ap.add_argument("--seconds", type=float, default=15.0, help="timed seconds per cell")
    ap.add_argument("--rates", default="", help="queries/s in all, stepped up (open loop), e.g. 100,200,300,400; "
                    "default: closed loop")
    ap.add_argument("--p99-ms", type=float, default=50.0, help="latency bound of the best open-loop rate (ms)")
    ap.add_argument("--pool-size", type=int, default=None, help="PgBouncer's server connections (default: cores)")
    ap.add_argument("--images", type=int, default=200, help="the test images the queries cycle over")


def _client(k: int, n: int, conninfo: dict, query: str, ids: list, expected: dict, seconds: float, rate, barrier,
            queue) -> None:
    import psycopg2

    out = {"lat": [], "wrong": 0, "errors": [], "warm_s": None}
    try:
        conn = psycopg2.connect(**conninfo, connect_timeout=30, application_name=f"cnnsql-client-{k}")
        conn.autocommit = True
        cur = conn.cursor()
        t0 = time.perf_counter()
        cur.execute(query, (ids[k % len(ids)],))
        cur.fetchall()
        out["warm_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - reported, never raised in a child
        out["errors"].append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        conn = None
    barrier.wait()
    start = time.perf_counter()
    i = 0
    interval = n / rate if rate else 0.0
    offset = interval * k / n if rate else 0.0
    while conn is not None:
        due = start + offset + i * interval if rate else time.perf_counter()
        if due - start >= seconds:
            break
        if rate:
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        image = ids[(k * 7919 + i) % len(ids)]
        try:
            cur.execute(query, (image,))
            label = cur.fetchone()[0]
            out["lat"].append(time.perf_counter() - due)
            out["wrong"] += int(label != expected[image])
        except Exception as exc:  # noqa: BLE001
            out["errors"].append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            if len(out["errors"]) > 20:
                break
        i += 1
    if conn is not None:
        conn.close()
    out["span"] = (start, time.perf_counter())  # CLOCK_MONOTONIC: comparable across the forked clients
    queue.put(out)


def _cell(conninfo: dict, n: int, query: str, ids: list, expected: dict, args, rate, postmaster, roots) -> dict:
    from cnnsql.measure import stats
    from cnnsql.measure.monitor import ServerSampler

    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(k, n, conninfo, query, ids, expected, args.seconds, rate,
                                                 barrier, queue)) for k in range(n)]
    with ServerSampler(postmaster) as sampler:
        t_warm = time.perf_counter()
        for p in procs:
            p.start()
        barrier.wait(timeout=600)
        warm_wall = time.perf_counter() - t_warm
        with stats.Clock(roots) as clock:  # the server, PgBouncer, these clients: ours
            clock.time("cell", lambda: time.sleep(args.seconds))
            results = [queue.get(timeout=args.seconds + 600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    lat = np.array([x for r in results for x in r["lat"]]) * 1000
    verdict = clock.verdict("cell", judge_spread=False)
    # answered queries over the time from the start to the last answer: a client that falls behind its
    # schedule sends its late queries after the window, so the rate it kept is below the one asked
    elapsed = max(r["span"][1] for r in results) - min(r["span"][0] for r in results)
    return {"queries": int(len(lat)), "queries_per_s": len(lat) / max(elapsed, args.seconds),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "wrong": sum(r["wrong"] for r in results), "errors": sum(len(r["errors"]) for r in results),
            "first_error": next((r["errors"][0] for r in results if r["errors"]), None),
            "warm_s": max((r["warm_s"] or 0) for r in results), "warm_wall_s": warm_wall,
            "server_anon_sum_mb": sampler.summary()["server_peak_anon_sum_mb"], "verdict": verdict}


def warm_pool(conninfo: dict, query: str, image: int, size: int) -> float:
    """`size` clients at once, each holding its transaction open for a moment, so that PgBouncer opens
    (and each backend loads its engine on) every server connection of the pool. -> seconds."""
    import threading

    import psycopg2

    def one():
        conn = psycopg2.connect(**conninfo, connect_timeout=60)
        try:
            with conn.cursor() as cur:  # one transaction: the server connection stays this client's
                cur.execute(query, (image,))
                cur.execute("SELECT pg_sleep(0.5)")
            conn.commit()
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0


def run(ctx, args) -> dict:
    from psycopg2 import sql

    from cnnsql import db
    from cnnsql.core import config
    from cnnsql.core.errors import CnnsqlError
    from cnnsql.data import datasets
    from cnnsql.db.pooler import Pooler
    from cnnsql.engines import engine_class, get_engine
    from cnnsql.models.weights import load_weights
    from cnnsql.placements import pgfunctions

    if config.external_dsn() is not None:
        raise CnnsqlError("the clients study runs on the private cluster only (it installs functions and starts "
                          "the pooler)", "unset CNNSQL_DSN and PG* variables")
    engine_class(args.engine)
    path = Path(args.weights or config.default_weights())
    if not path.exists():
        raise CnnsqlError(f"no weights at {path}", "run `cnnsql bench` or `cnnsql train` first, or give --weights")
    target = db.resolve()
    cluster = db.private_cluster()
    pgfunctions.install(target, [args.engine], path.absolute(), 1)
    with db.connection(target) as conn:
        ds = datasets.info(conn)
        ids, images, _ = datasets.fetch_split(conn, ds, "test", limit=args.images)
        postmaster = db.private_server_pid(conn)
    expected = dict(zip(ids.tolist(), get_engine(args.engine, load_weights(path), threads=1)
                        .predict(images).argmax(1).tolist()))
    with db.connection(target) as conn:
        query = sql.SQL("SELECT ({}.{}(img)).label FROM {} WHERE id = %s").format(
            sql.Identifier(pgfunctions.SCHEMA), sql.Identifier(pgfunctions.sql_name(args.engine).lower()),
            sql.Identifier(*ds.bytes_relation("test"))).as_string(conn)
    vias = [v for v in args.via.split(",") if v]
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()] or [None]
    except ValueError:
        raise CnnsqlError(f"--rates {args.rates!r} is not a list of numbers", "e.g. --rates 100,200,400") from None
    if any(r is not None and r <= 0 for r in rates):
        raise CnnsqlError("--rates must be positive", "e.g. --rates 100,200,400")
    if not set(vias) <= {"direct", "pooler"}:
        raise CnnsqlError(f"unknown --via {args.via!r}", "use direct, pooler or direct,pooler")
    pooler = Pooler(cluster)
    if "pooler" in vias and pooler.status():
        raise CnnsqlError("a pooler is already running on this cluster (its backends would count in the direct "
                          "cells' memory)", "stop it first: cnnsql db pooler stop")
    rows, checks, pool_warm_s = [], [], None
    try:
        for via in vias:  # all direct cells, then the pooler's: its backends never count in the direct cells
            if via == "pooler":
                pooler.start(pool_size=args.pool_size)
                # every server connection of the pool loads its engine once, before any cell
                pool_warm_s = warm_pool(pooler.conninfo(config.database_name()), query, int(ids[0]),
                                        args.pool_size or os.cpu_count() or 1)
                ctx.say(f"pooler on 127.0.0.1:{pooler.port}, pool warmed in {pool_warm_s:.1f} s")
            conninfo = (pooler if via == "pooler" else cluster).conninfo(config.database_name())
            for n in [int(c) for c in args.clients.split(",")]:
                for rate in rates:
                    load = f"{rate:g} q/s" if rate else "closed loop"
                    ctx.say(f"{via}, {n} client(s), {load}, {args.seconds:g} s")
                    roots = (postmaster, pooler._pid() or 0) if via == "pooler" else (postmaster,)
                    cell = _cell(conninfo, n, query, ids.tolist(), expected, args, rate, postmaster, roots)
                    ctx.record_noise(f"{via} {n} clients {load}", cell.pop("verdict"))
                    rows.append({"via": via, "clients": n, "rate": rate, **cell})
                    checks.append(check(f"{via}, {n} clients, {load}: every answer right",
                                        cell["wrong"] == 0 and cell["errors"] == 0,
                                        f"{cell['wrong']} wrong, {cell['errors']} errors ({cell['first_error']})"))
    finally:
        if "pooler" in vias:
            pooler.stop()
    best = []
    if rates != [None]:  # per (via, clients): the highest answered rate within the latency bound
        for via in vias:
            for n in sorted({r["clients"] for r in rows}):
                ok = [r for r in rows if r["via"] == via and r["clients"] == n and r["p99_ms"] is not None
                      and r["p99_ms"] <= args.p99_ms and r["queries_per_s"] >= 0.95 * r["rate"]]
                top = max(ok, key=lambda r: r["queries_per_s"], default=None)
                best.append({"via": via, "clients": n, "best_rate": top["rate"] if top else None,
                             "queries_per_s": top["queries_per_s"] if top else None,
                             "p99_ms": top["p99_ms"] if top else None,
                             "server_anon_sum_mb": max(r["server_anon_sum_mb"] for r in rows
                                                       if r["via"] == via and r["clients"] == n)})
    return {"rows": rows, "best": best, "tables": ["best"] if best else [], "checks": checks, "engine": args.engine, "query": query,
            "pool_warm_s": pool_warm_s, "p99_bound_ms": args.p99_ms,
            "mode": "open loop, rates stepped up" if rates != [None] else "closed loop",
            "pool_size": args.pool_size, "dataset": ds.name}
