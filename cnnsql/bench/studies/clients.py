"""Many clients at once (MLPerf's server scenario), directly and through PgBouncer: one-image queries.

One-image queries to the functions inside PostgreSQL, each client on its own connection, directly to
the private cluster or through PgBouncer.

For each --via (direct: the cluster's socket; pooler: `cnnsql db pooler`, PgBouncer in transaction
pooling with --pool-size server connections) and each --clients count N, N clients, each on its own
connection, driven by --jobs processes (as pgbench's -c N -j J: a process drives its share of the
connections asynchronously; the default 1 keeps the load generator's own CPU cost the same at every N
on the machine the server shares; 0: one forked process per client), connect, send one warm-up query
each (its wall is the warm-up figure: a new backend imports its framework), wait at a barrier, then send
    SELECT (cnnsql.<Engine>CNN(img)).label FROM <test view> WHERE id = %s
for --seconds: back to back (closed loop), or, with --rates R1,R2,..., at each R queries/s in all
(open loop, the rates stepped up per client count), each client on a fixed schedule, latency counted
from the scheduled time (no coordinated omission); --rounds R runs every cell R times, round after
round, and per (via, jobs, clients) the best row is the highest rate whose median p99 over the
rounds stays within --p99-ms (best_rates). Every answer is
checked against the raw engine's label for that image; an error is counted with its first line.
Figures per cell: queries/s, p50/p99 latency (ms), wrong answers, errors, the warm-up wall of the
slowest client, and the server's memory: the peak sum of RssAnon over all its processes (backends
with a loaded framework dominate; measure.monitor.ServerSampler, every 0.2 s). Cells run in turn
(direct then pooler for each N), each once the previous cell's backends have exited; noise: the
Clock's rule (other processes' CPU share) per cell. Per (via, jobs, N) the best rate, and its share of
the best N's through the same way with the same --jobs.
Checks: no wrong answer, no error. The functions are installed with --weights (default weights).
Private cluster only (it installs functions and starts the pooler).
"""
from __future__ import annotations

import itertools
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
    ap.add_argument("--rounds", type=int, default=1, help="every cell this many times, round after round; "
                    "the best rate is judged on the medians")
    ap.add_argument("--jobs", default="1", help="load-generator processes driving the clients, comma-separated "
                    "settings each run (as pgbench's -j; 0: one process per client); default 1")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _Client:
    """One client: its own connection (psycopg2's asynchronous mode, so one process drives many), its
    schedule and its figures. `busy`: connecting or a query in flight; `wait`: the socket event that
    lets it advance (POLL_READ or POLL_WRITE)."""

    def __init__(self, k: int, n: int, conninfo: dict, rate):
        import psycopg2

        self.k, self.i, self.due, self.image = k, 0, 0.0, None
        self.interval = n / rate if rate else 0.0
        self.offset = self.interval * k / n if rate else 0.0
        self.out = {"lat": [], "wrong": 0, "errors": [], "warm_s": None}
        self.conn = psycopg2.connect(**conninfo, connect_timeout=30, application_name=f"cnnsql-client-{k}",
                                     async_=1)
        self.cur, self.busy, self.wait = None, True, None
        self.advance()  # connecting: polled until done (_wait_all)

    def send(self, query: str, image, due: float) -> None:
        self.image, self.due, self.busy = image, due, True
        try:
            self.cur = self.cur or self.conn.cursor()
            self.cur.execute(query, (image,))
        except Exception as exc:  # noqa: BLE001 - counted, never raised in a child
            self.fail(exc)
            return
        self.advance()

    def fail(self, exc: BaseException) -> None:
        """An error counted; a query in flight is over (the schedule moves on)."""
        self.out["errors"].append(_first_line(exc))
        self.i += self.busy
        self.busy = False

    def advance(self) -> bool:
        """Polls the connection once; -> True when its work is done (answered, connected or failed)."""
        import psycopg2.extensions as ext

        try:
            state = self.conn.poll()
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
            return True
        self.wait = None if state == ext.POLL_OK else state
        return self.wait is None


def _poll_once(busy: list[_Client], on_done, timeout) -> None:
    """Waits (at most `timeout` s; None: until one is ready) for the sockets the busy clients wait on,
    advances the ready ones, on_done(client) for each that finished its work (a client whose work
    finished without waiting is done at once)."""
    import select

    import psycopg2.extensions as ext

    reads, writes, by_fd = [], [], {}
    for c in busy:
        if c.wait is None:
            on_done(c) if c.busy else None
            continue
        (reads if c.wait == ext.POLL_READ else writes).append(c.conn.fileno())
        by_fd[c.conn.fileno()] = c
    if not by_fd:
        return
    ready_r, ready_w, _ = select.select(reads, writes, [], timeout)
    for fd in ready_r + ready_w:
        c = by_fd[fd]
        if c.advance() and c.busy:
            on_done(c)


def _wait_all(clients: list[_Client], on_done) -> None:
    while busy := [c for c in clients if c.busy]:
        _poll_once(busy, on_done, 1.0)


def _job(members: list[int], n: int, conninfo: dict, query: str, ids: list, expected: dict, seconds: float, rate,
         barrier, queue, release=None) -> None:
    """The clients `members` of n, driven by this one process (as pgbench's -j drives its share of -c):
    connect, one warm-up query each (all at once), the barrier, then each client's schedule for `seconds`:
    back to back (closed loop), or client k's i-th query due at start + (k/n + i) * n/rate (open loop;
    latency from the due time, so a late answer counts its wait)."""
    clients: list[_Client] = []
    for k in members:
        try:
            clients.append(_Client(k, n, conninfo, rate))
        except Exception as exc:  # noqa: BLE001 - counted, never raised in a child
            queue.put({"lat": [], "wrong": 0, "errors": [_first_line(exc)], "warm_s": None, "span": None})
    _wait_all(clients, lambda c: setattr(c, "busy", False))  # connected
    t0 = time.perf_counter()
    for c in clients:
        if not c.out["errors"]:
            c.send(query, ids[c.k % len(ids)], t0)

    def warmed(c):
        c.busy = False
        try:
            c.cur.fetchall()
            c.out["warm_s"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            c.fail(exc)
    _wait_all(clients, warmed)
    barrier.wait()
    start = time.perf_counter()

    def answered(c):
        c.busy = False
        c.i += 1
        try:
            label = c.cur.fetchone()[0]
            c.out["lat"].append(time.perf_counter() - c.due)
            c.out["wrong"] += int(label != expected[c.image])
        except Exception as exc:  # noqa: BLE001
            c.fail(exc)

    def due_of(c):
        return start + c.offset + c.i * c.interval if rate else time.perf_counter()

    active = [c for c in clients if c.out["warm_s"] is not None]
    while active:
        now = time.perf_counter()
        for c in list(active):
            if c.busy:
                continue
            due = due_of(c)
            if due - start >= seconds or len(c.out["errors"]) > 20:
                active.remove(c)
            elif due <= now:
                c.send(query, ids[(c.k * 7919 + c.i) % len(ids)], due)
        busy = [c for c in active if c.busy]
        next_due = min((due_of(c) for c in active if not c.busy), default=None)
        timeout = None if next_due is None else max(0.0, next_due - time.perf_counter())
        if busy:
            _poll_once(busy, answered, timeout)  # an answer, or the next idle client's due time
        elif timeout:
            time.sleep(timeout)
    end = time.perf_counter()
    for c in clients:
        c.conn.close()
        queue.put({**c.out, "span": (start, end) if c.out["warm_s"] is not None else None})
    if release is not None:  # alive until the parent has read this process's CPU (an exited one's is lost)
        release.wait(timeout=600)


def _cell(conninfo: dict, n: int, processes: int, query: str, ids: list, expected: dict, args, rate, postmaster,
          roots) -> dict:
    from cnnsql.measure import stats
    from cnnsql.measure.monitor import ServerSampler

    ctx = mp.get_context("fork")
    groups = [list(range(j, n, processes)) for j in range(processes)]
    barrier, queue, release = ctx.Barrier(processes + 1), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_job, args=(g, n, conninfo, query, ids, expected, args.seconds, rate,
                                             barrier, queue, release)) for g in groups]
    with ServerSampler(postmaster) as sampler:
        t_warm = time.perf_counter()
        for p in procs:
            p.start()
        barrier.wait(timeout=600)
        warm_wall = time.perf_counter() - t_warm
        try:
            with stats.Clock(roots) as clock:  # the server, PgBouncer, these clients: ours
                clock.time("cell", lambda: time.sleep(args.seconds))
                results = [queue.get(timeout=args.seconds + 600) for _ in range(n)]
        finally:
            release.set()
        for p in procs:
            p.join(timeout=60)
    lat = np.array([x for r in results for x in r["lat"]]) * 1000
    verdict = clock.verdict("cell", judge_spread=False)
    # answered queries over the time from the start to the last answer: a client that falls behind its
    # schedule sends its late queries after the window, so the rate it kept is below the one asked
    spans = [r["span"] for r in results if r["span"]]
    elapsed = max(s[1] for s in spans) - min(s[0] for s in spans) if spans else args.seconds
    return {"jobs": processes, "queries": int(len(lat)), "queries_per_s": len(lat) / max(elapsed, args.seconds),
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


def best_rates(rows: list[dict], vias: list[str], job_settings: list[int], rates: list[float], bound_ms: float):
    """Per (via, --jobs, clients): the highest rate answered within the latency bound over the rounds:
    its median p99 <= bound_ms and its median rate kept >= 95% of the rate asked (p99's min-max over the
    rounds beside); and its share of the best client count's through the same way with the same --jobs."""
    best = []
    for via, jobs, n in sorted({(r["via"], r["jobs_setting"], r["clients"]) for r in rows},
                               key=lambda t: (vias.index(t[0]), job_settings.index(t[1]), t[2])):
        cells = [r for r in rows if (r["via"], r["jobs_setting"], r["clients"]) == (via, jobs, n)]
        top = None
        for rate in rates:
            same = [r for r in cells if r["rate"] == rate]
            p99 = [r["p99_ms"] if r["p99_ms"] is not None else float("inf") for r in same]
            kept = float(np.median([r["queries_per_s"] for r in same]))
            if same and float(np.median(p99)) <= bound_ms and kept >= 0.95 * rate:
                top = {"best_rate": rate, "queries_per_s": kept, "p99_ms": float(np.median(p99)),
                       "p99_range_ms": [min(p99), max(p99)], "rounds": len(same)}
        best.append({"via": via, "jobs_setting": jobs, "jobs": cells[0]["jobs"], "clients": n,
                     **(top or {"best_rate": None, "queries_per_s": None, "p99_ms": None, "p99_range_ms": None,
                                "rounds": None}),
                     "top_rate_asked": top is not None and top["best_rate"] == max(rates),
                     "server_anon_sum_mb": max(r["server_anon_sum_mb"] for r in cells),
                     "warm_s": max(r["warm_s"] for r in cells)})
    for b in best:  # each count's share of the best count through the same way, with the same --jobs
        peers = [x["queries_per_s"] for x in best if (x["via"], x["jobs_setting"]) == (b["via"], b["jobs_setting"])
                 and x["queries_per_s"]]
        b["share_of_best"] = b["queries_per_s"] / max(peers) if b["queries_per_s"] and peers else None
    return best


def run(ctx, args) -> dict:
    from psycopg2 import sql

    from cnnsql import db
    from cnnsql.core import config
    from cnnsql.core.errors import CnnsqlError
    from cnnsql.data import datasets
    from cnnsql.db.pooler import Pooler
    from cnnsql.measure.monitor import server_processes, settle
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
        job_settings = [int(j) for j in args.jobs.split(",") if j.strip()] or [1]
    except ValueError:
        raise CnnsqlError(f"--jobs {args.jobs!r} is not a list of integers", "e.g. --jobs 1 or --jobs 1,0") from None
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()] or [None]
    except ValueError:
        raise CnnsqlError(f"--rates {args.rates!r} is not a list of numbers", "e.g. --rates 100,200,400") from None
    if args.rounds < 1:
        raise CnnsqlError("--rounds must be at least 1", "e.g. --rounds 3")
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
            baseline = server_processes(postmaster)  # the server's own processes (and the pool's backends)
            counts = [int(c) for c in args.clients.split(",")]
            for r, jobs, n in itertools.product(range(args.rounds), job_settings, counts):
                for rate in rates:
                    load = f"{rate:g} q/s" if rate else "closed loop"
                    processes = n if jobs <= 0 else min(jobs, n)  # --jobs 0: one process per client
                    driver = f"{processes} process(es)"
                    ctx.say(f"{via}, {n} client(s) in {driver}, {load}, {args.seconds:g} s, round {r + 1}/{args.rounds}")
                    roots = (postmaster, pooler._pid() or 0) if via == "pooler" else (postmaster,)
                    settle(postmaster, baseline)  # the previous cell's backends have exited
                    cell = _cell(conninfo, n, processes, query, ids.tolist(), expected, args, rate, postmaster, roots)
                    ctx.record_noise(f"{via} {n} clients in {driver} {load} round {r + 1}", cell.pop("verdict"))
                    rows.append({"via": via, "clients": n, "rate": rate, "jobs_setting": jobs, "round": r + 1, **cell})
                    checks.append(check(f"{via}, {n} clients in {driver}, {load}: every answer right",
                                        cell["wrong"] == 0 and cell["errors"] == 0,
                                        f"{cell['wrong']} wrong, {cell['errors']} errors ({cell['first_error']})"))
    finally:
        if "pooler" in vias:
            pooler.stop()
    best = best_rates(rows, vias, job_settings, rates, args.p99_ms) if rates != [None] else []
    return {"rows": rows, "best": best, "tables": ["best"] if best else [], "checks": checks, "engine": args.engine, "query": query,
            "pool_warm_s": pool_warm_s, "p99_bound_ms": args.p99_ms,
            "mode": "open loop, rates stepped up" if rates != [None] else "closed loop",
            "pool_size": args.pool_size, "dataset": ds.name}
