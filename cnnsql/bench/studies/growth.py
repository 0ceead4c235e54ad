"""Cost as the data grows: load, raw and SQL passes at N synthetic images, with every process's peak memory.

For each N of --sizes (in order), against the configured PostgreSQL (CNNSQL_HOME's private cluster or
CNNSQL_DSN). It REPLACES the loaded CIFAR-10 dataset with synthetic data (run it in a CNNSQL_HOME of its own):
- load: `cnnsql load --quiet --synthetic N` (N train + N/5 test images); images/s counts both splits; the
  table size is the stored images' relations (pg_partition_tree of cifar_image). Then, untimed,
  `VACUUM (FREEZE, ANALYZE) cifar_image` and `CHECKPOINT`, as after any bulk load (otherwise the
  first pass alone pays for setting the new rows' hint bits, autovacuum and flushing those pages).
Passes over the --split (test: N/5 images; train: N), each in a child process
(`python -m cnnsql.bench.studies.growth --child KIND`), --phases of:
- raw: `SELECT id, img FROM <the dataset's binary view of the split> [WHERE id < M]` read by binary COPY
  (a thread reads the next 2,048 rows while the engine works on these) into the engine at its default
  batch; the predictions are dropped: no EvaDB, nothing written.
- sql: through cnnsql's EvaDB, `SELECT id, <F>(img).label FROM pg.<view> [WHERE id < M];` after a
  one-image warm-up query (the engine loaded); the result is a DataFrame in the client.
- client, postgres, evadb: `cnnsql predict --into growth_<kind> --placement <kind>` (placements/writeback):
  every image's (id, label, class_name, probability, probs) written into a new table in one transaction,
  by this process, inside PostgreSQL (INSERT ... SELECT through the batched function, installed here with
  the study's weights and --threads) or through EvaDB (its result streamed into COPY). The figure is the
  time from the first image read to the commit; loading the engine and one warm-up call come before it
  (`warmup_s` in detail). The table is checked (each id once) and dropped after the phase.
  The phases alternate --reps times; the figure is the median, all walls are kept in `detail`.
--max-pass M caps a pass at the images with id < M (said in the row). Each phase runs in a fresh
process: its own peak RSS (VmHWM, cnnsql/measure/peak.py: not ru_maxrss, which starts a child at its
parent's size) is the client's figure, with the predictor's heap trims (cnnsql/core/heap.py) in `detail`.
With --reps above 1, a memory figure is the median of the repetitions' peaks, all of them in `detail`.
cnnsql.measure.monitor.ServerSampler reads /proc every 0.2 s for the PostgreSQL server's processes: the
largest VmRSS and RssAnon of one process and the largest sum of RssAnon over all of them. Every phase's
window carries the harness's noise verdict (other processes' CPU share; the child and the private server
counted as ours; the spread of the --reps walls). Checks: every pass returned each expected id once.
Rows also go to the table growth_point (sql/growth.sql) of the same database; --plot PNG draws the
session's rows, so a session can be extended by later runs with --session.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnnsql.bench.studies import check
from cnnsql.bench.studies._dbstudy import ChildClock, weights_path
from cnnsql.measure.monitor import server_processes, settle

NAME = "growth"
NEEDS_DATABASE = True
SMOKE = ["--sizes", "200", "--reps", "1", "--max-pass", "40"]
FETCH_ROWS = 2048
PASSES = ("raw", "sql", "client", "postgres", "evadb")
WRITES = ("client", "postgres", "evadb")


def arguments(ap) -> None:
    ap.add_argument("--weights", type=Path, help="weights file (default: the default weights file)")
    ap.add_argument("--sizes", default="10000,100000", help="synthetic train images N per step (default 10000,100000)")
    ap.add_argument("--engines", default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--max-pass", type=int, help="read at most M images per pass (said in each row)")
    ap.add_argument("--split", default="test", choices=["test", "train"],
                    help="the split each pass reads (default test: N/5 images; train: N)")
    ap.add_argument("--phases", default="raw,sql", help=f"passes per size, of {','.join(PASSES)} (default raw,sql)")
    ap.add_argument("--session", help="add to this growth session (default: a new one)")
    ap.add_argument("--plot", type=Path, help="draw the session's rows into this PNG")


# --- children ---------------------------------------------------------------------------------

def _xor_ids(ids) -> int:
    out = 0
    for i in ids:
        out ^= int(i) * 2654435761 % (1 << 61)
    return out


def child_raw(engine_name: str, weights: str, threads: int, limit: int | None, split: str) -> dict:
    import itertools

    import numpy as np
    from psycopg2 import sql

    from cnnsql import db
    from cnnsql.data import datasets
    from cnnsql.engines import get_engine
    from cnnsql.models.weights import load_weights
    from cnnsql.placements.evadb_patch.transport import copy_rows

    engine = get_engine(engine_name, load_weights(weights), threads=threads)
    conn = db.connect()
    conn.autocommit = True
    ds = datasets.info(conn)
    engine.predict(np.zeros((2, *ds.shape), np.uint8))  # warm-up
    query = sql.SQL("SELECT id, img FROM {}").format(sql.Identifier(*ds.bytes_relation(split)))
    if limit:
        query += sql.SQL(" WHERE id < {}").format(sql.Literal(int(limit)))
    text = query.as_string(conn)
    t0 = time.perf_counter()
    seen, count = 0, 0
    for rows in copy_rows(conn, text, ["int4", "bytea"], itertools.repeat(FETCH_ROWS)):
        images = np.frombuffer(b"".join(r[1] for r in rows), np.uint8).reshape(-1, *ds.shape)
        engine.predict(images, engine.default_batch_size)
        count += len(rows)
        seen ^= _xor_ids(r[0] for r in rows)
    wall = time.perf_counter() - t0
    conn.close()
    return {"rows": count, "wall_s": wall, "ids_xor": seen, "batch": engine.default_batch_size,
            "query": f"COPY ({text}) TO STDOUT (FORMAT binary)"}


def child_sql(engine_name: str, weights: str, threads: int, limit: int | None, split: str) -> dict:
    from cnnsql import db
    from cnnsql.data import datasets
    from cnnsql.placements import evadb_session
    from cnnsql.placements.pgfunctions import sql_name

    with db.connection() as conn:
        view = datasets.info(conn).view(split)
    f = sql_name(engine_name)
    cursor = evadb_session.connect(weights=weights, threads=threads)
    evadb_session.run(cursor, f"SELECT id, {f}(img).label FROM pg.{view} WHERE id < 1;")
    query = f"SELECT id, {f}(img).label FROM pg.{view}" + (f" WHERE id < {int(limit)};" if limit else ";")
    t0 = time.perf_counter()
    out = evadb_session.run(cursor, query)
    wall = time.perf_counter() - t0
    ids = out[out.columns[0]]
    return {"rows": len(out), "distinct": int(ids.nunique()), "wall_s": wall, "ids_xor": _xor_ids(ids), "query": query}


def child_write(kind: str, engine_name: str, weights: str, threads: int, limit: int | None, split: str) -> dict:
    from psycopg2 import sql

    from cnnsql import db
    from cnnsql.placements import writeback

    table = f"growth_{kind}"
    done = writeback.write_back(into=table, engine=engine_name, weights=Path(weights), placement=kind, split=split,
                                limit=limit, replace=True, threads=threads, progress=False)
    with db.connection() as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*), count(DISTINCT id), coalesce(bit_xor(id::bigint * 2654435761 %% %s), 0) "
                            "FROM {}").format(sql.Identifier(table)), (1 << 61,))
        rows, distinct, xor = cur.fetchone()
        cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
        conn.commit()
    return {"rows": rows, "distinct": distinct, "wall_s": done.wall_s, "warmup_s": done.warmup_s,
            "ids_xor": int(xor), "query": done.statement}


def child_main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=PASSES)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--split", default="test")
    a = ap.parse_args(argv)
    if a.kind in WRITES:
        res = child_write(a.kind, a.engine, a.weights, a.threads, a.limit, a.split)
    else:
        res = (child_raw if a.kind == "raw" else child_sql)(a.engine, a.weights, a.threads, a.limit, a.split)
    from cnnsql.core import heap
    from cnnsql.measure import peak

    res["client_peak_rss_mb"] = peak.own_peak_mb()  # this process image's own peak (not ru_maxrss)

    res["client_heap"] = heap.KEEPER.stats()  # the predictor's heap trims in this process (core/heap.py)
    print(json.dumps(res))


# --- the parent: phases in fresh processes, the server sampled --------------------------------

def run_phase(ctx, label: str, module: list[str], postmaster: int | None, baseline: set[int]) -> tuple[dict, str]:
    """Run `python -m MODULE ARGS` (`module`) in a fresh process, once the server has only the `baseline`
    processes: wall, exit, the process's own peak RSS (measure/peak.py), the server's peaks, the noise verdict."""
    from cnnsql.measure import peak
    from cnnsql.measure.monitor import ServerSampler

    cmd = [sys.executable, "-m", "cnnsql.measure.peak", "-m", *module]

    settled_s = settle(postmaster, baseline)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        with ChildClock((postmaster,) if postmaster else ()) as clock, ServerSampler(postmaster) as sampler:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
            proc.wait()
            wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    ctx.record_noise(label, clock.verdict())
    if proc.returncode != 0:
        raise RuntimeError(f"growth: {label} failed ({proc.returncode}): {stderr.strip()[-400:]}")
    return {"wall_s": wall, "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
            "process_peak_rss_mb": peak.read_reported(stderr), "settled_s": settled_s, **sampler.summary()}, stdout


def table_bytes(conn) -> int:
    """The stored images' size on disk: every partition of cifar_image (where `cnnsql load` writes)."""
    with conn.cursor() as cur:
        cur.execute("SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree('cifar_image')")
        (size,) = cur.fetchone()
    conn.rollback()
    return int(size)


def settle_table(conn) -> float:
    """VACUUM (FREEZE, ANALYZE) the loaded images, as after any bulk load, then CHECKPOINT: the first
    scan of freshly COPYed rows otherwise sets their hint bits (writing every page), autovacuum starts
    on them and a checkpoint flushes them, costs only the first pass after the load would pay."""
    import psycopg2

    t0 = time.perf_counter()
    conn.rollback()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("VACUUM (FREEZE, ANALYZE) cifar_image")
            try:  # and the pages it wrote flushed now, not by a checkpoint during the first pass
                cur.execute("CHECKPOINT")
            except psycopg2.errors.InsufficientPrivilege:
                pass  # a server of the user's where this role may not: the passes then share that cost
    finally:
        conn.autocommit = False
    return time.perf_counter() - t0


def record(conn, session: str, n: int, phase: str, engine: str | None, rows: int, fig: dict, detail: dict) -> None:
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO growth_point (session_id, n_images, phase, engine, rows_read, wall_s, images_per_s, "
            "client_peak_rss_mb, server_peak_rss_mb, server_peak_anon_mb, server_peak_anon_sum_mb, "
            "loadavg_before, loadavg_after, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (session, n, phase, engine, rows, fig["wall_s"], rows / fig["wall_s"], fig.get("client_peak_rss_mb"),
             fig["server_peak_rss_mb"], fig["server_peak_anon_mb"], fig["server_peak_anon_sum_mb"],
             fig["loadavg_before"], fig["loadavg_after"], json.dumps(detail)))
    conn.commit()


def measure_size(ctx, conn, args, weights: Path, session: str, n: int, postmaster: int | None, baseline: set[int],
                 rows: list, checks: list) -> None:
    fig, out = run_phase(ctx, f"N={n} load (child process)",
                         ["cnnsql", "load", "--quiet", "--synthetic", str(n)], postmaster, baseline)
    fig["client_peak_rss_mb"] = fig["process_peak_rss_mb"]
    n_test = max(1, n // 5)
    n_split = n_test if args.split == "test" else n
    record(conn, session, n, "load", None, n + n_test, fig, {"table_bytes": table_bytes(conn), "stdout": out.strip(),
                                                           "server_peak_anon_process": fig["server_peak_anon_process"]})
    rows.append({"n": n, "phase": "load", "engine": "", "rows": n + n_test, "wall_s": fig["wall_s"],
                 "images_per_s": (n + n_test) / fig["wall_s"], "client_peak_mb": fig["client_peak_rss_mb"],
                 "server_peak_mb": fig["server_peak_rss_mb"], "server_anon_sum_mb": fig["server_peak_anon_sum_mb"]})
    ctx.say(f"N={n}: load {n + n_test} images in {fig['wall_s']:.1f} s, client peak {fig['client_peak_rss_mb']:.0f} MB")
    settled = settle_table(conn)
    ctx.say(f"N={n}: VACUUM (FREEZE, ANALYZE) and CHECKPOINT after the load in {settled:.1f} s (untimed: no pass "
            f"pays for settling freshly loaded pages)")
    limit = args.max_pass if args.max_pass and args.max_pass < n_split else None
    expected = limit or n_split
    want_xor = _xor_ids(range(expected))
    for engine in (e for e in args.engines.split(",") if e):
        if "postgres" in args.phases:
            install_functions(engine, weights, args.threads)
        figs = {kind: [] for kind in args.phases}
        for _ in range(args.reps):
            for kind in args.phases:
                cmd = ["cnnsql.bench.studies.growth", "--child", kind, "--engine", engine,
                       "--weights", str(weights), "--threads", str(args.threads), "--split", args.split] + (
                    ["--limit", str(limit)] if limit else [])
                f, out = run_phase(ctx, f"N={n} {engine} {kind} (child process)", cmd, postmaster, baseline)
                res = json.loads(out.strip().splitlines()[-1])
                ok = res["rows"] == expected and res["ids_xor"] == want_xor and res.get("distinct", res["rows"]) == res["rows"]
                checks.append(check(f"N={n} {engine} {kind}: each of {expected} ids once", ok, f"{res['rows']} rows"))
                figs[kind].append({**f, **res, "process_wall_s": f["wall_s"], "wall_s": res["wall_s"]})
                ctx.say(f"N={n} {engine} {kind}: {res['rows']} images in {res['wall_s']:.2f} s, client peak "
                        f"{res['client_peak_rss_mb']:.0f} MB, server process peak {f['server_peak_rss_mb']:.0f} MB")
        for kind, runs in figs.items():
            walls = [r["wall_s"] for r in runs]
            med = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
            if len(runs) > 1:
                from cnnsql.measure import stats

                sp = stats.spread(walls)
                noisy = statistics_judged(walls) and sp > stats.NOISY_SPREAD
                ctx.record_noise(f"N={n} {engine} {kind} repetitions", {
                    "noisy": noisy, "noise_reasons": [f"repetitions spread {100 * sp:.0f}% (max-min over median; "
                                                      f"threshold {100 * stats.NOISY_SPREAD:.0f}%)"] if noisy else []})
            memory = ("client_peak_rss_mb", "server_peak_rss_mb", "server_peak_anon_mb", "server_peak_anon_sum_mb")
            agg = {k: statistics.median(r[k] for r in runs) for k in memory}  # each figure's median repetition
            fig = {**agg, "wall_s": med["wall_s"], "loadavg_before": runs[0]["loadavg_before"],
                   "loadavg_after": runs[-1]["loadavg_after"]}
            detail = {"walls": walls, "process_walls": [r["process_wall_s"] for r in runs], "split": args.split,
                      "warmup_s": [r.get("warmup_s") for r in runs],
                      "loadavg": [[r["loadavg_before"], r["loadavg_after"]] for r in runs], "threads": args.threads,
                      "limit": limit, "split_rows": n_split, "query": runs[0].get("query"), "batch": runs[0].get("batch"),
                      "server_peak_anon_process": [r.get("server_peak_anon_process") for r in runs],
                      "client_heap": [r.get("client_heap") for r in runs],
                      "memory_mb": {k: [r[k] for r in runs] for k in memory}}
            record(conn, session, n, kind, engine, expected, fig, detail)
            raw = figs.get("raw")
            of_raw = (sorted(r["wall_s"] for r in raw)[len(raw) // 2] / fig["wall_s"]) if raw else None
            rows.append({"n": n, "phase": kind, "engine": engine, "rows": expected, "wall_s": fig["wall_s"],
                         "images_per_s": expected / fig["wall_s"], "of_raw": of_raw,
                         "client_peak_mb": fig["client_peak_rss_mb"], "server_peak_mb": fig["server_peak_rss_mb"],
                         "server_anon_max_mb": fig["server_peak_anon_mb"],
                         "server_anon_sum_mb": fig["server_peak_anon_sum_mb"]})


def install_functions(engine: str, weights: Path, threads: int) -> None:
    """The in-PostgreSQL functions of `engine` with the study's weights and threads (the postgres phase)."""
    from cnnsql import db
    from cnnsql.placements import pgfunctions

    pgfunctions.install(db.resolve(), [engine], weights, threads)


def statistics_judged(walls) -> bool:
    import statistics

    from cnnsql.measure import stats

    return statistics.median(walls) >= stats.MIN_JUDGE_S


def plot(conn, session: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with conn.cursor() as cur:
        cur.execute("SELECT n_images, phase, coalesce(engine, ''), rows_read, wall_s, client_peak_rss_mb, "
                    "server_peak_anon_mb FROM growth_point WHERE session_id = %s ORDER BY n_images", (session,))
        rows = cur.fetchall()
    conn.rollback()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for phase, engine in sorted({(r[1], r[2]) for r in rows}):
        pts = [r for r in rows if (r[1], r[2]) == (phase, engine)]
        label = f"{phase} {engine}".strip()
        ax1.plot([r[0] for r in pts], [r[4] for r in pts], "o-", label=f"{label} ({pts[-1][3]:,} images at largest N)")
        ax2.plot([r[0] for r in pts], [r[5] for r in pts], "o-", label=f"{label}: client")
        if phase != "load":
            ax2.plot([r[0] for r in pts], [r[6] for r in pts], "x--", label=f"{label}: server process (anon)")
    for ax, title, ylabel in ((ax1, "wall time", "seconds"), (ax2, "peak memory", "MB")):
        ax.set_xscale("log")
        ax.set_xlabel("N (train images; test = N/5)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    fig.suptitle(f"cnnsql growth (cnnsql study growth, session {session})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx, args) -> dict:
    from cnnsql import db, results

    weights = weights_path(args)
    conn = db.connect()
    db.ensure_schema(conn)
    with conn.cursor() as cur:
        cur.execute(db.sql_file("growth.sql"))
    conn.commit()
    args.phases = [k.strip() for k in args.phases.split(",") if k.strip()]
    unknown = [k for k in args.phases if k not in PASSES]
    if unknown or not args.phases:
        from cnnsql.core.errors import CnnsqlError

        raise CnnsqlError(f"--phases {','.join(args.phases)}: unknown {unknown or 'none given'}",
                          f"choose from {','.join(PASSES)}")
    session = args.session or results.new_session_id()
    postmaster = db.private_server_pid(conn)  # None: a server elsewhere, no server-side figures
    baseline = server_processes(postmaster)  # the server's own processes and this connection's backend
    rows, checks = [], []
    for n in (int(x) for x in args.sizes.split(",") if x):
        measure_size(ctx, conn, args, weights, session, n, postmaster, baseline, rows, checks)
    if args.plot:
        plot(conn, session, args.plot)
        ctx.say(f"plot: {args.plot}")
    conn.close()
    return {"rows": rows, "checks": checks, "session": session, "table": "growth_point", "weights": str(weights),
            "server_sampled": postmaster is not None, "plot": str(args.plot) if args.plot else None}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
    else:
        raise SystemExit("run it as `cnnsql study growth`")
