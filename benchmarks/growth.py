"""Cost as the data grows: load, raw and SQL passes at N synthetic images, with every process's peak memory.

    .venv/bin/python benchmarks/growth.py --weights W.npz --sizes 10000,100000 [--engines torch]
        [--reps 1] [--max-pass M] [--session ID] [--plot docs/figures/growth.png]

For each N (in order), against the configured PostgreSQL (CNNSQL_HOME's private cluster or CNNSQL_DSN):
- load: `cnnsql load --quiet --synthetic N` (N train + N/5 test images; it replaces the dataset);
  images/s counts both splits; the table size is pg_total_relation_size of both partitions.
- raw: a child process streams `SELECT id, img FROM cifar_image_test [WHERE id < M]` through a psycopg2
  server-side cursor (2,048 rows per fetch) into the engine (its default batch): no EvaDB.
- sql: a child process runs, through cnnsql's EvaDB, `SELECT id, <F>(img).label FROM pg.cifar_test
  [WHERE id < M];` after a one-image warm-up query (the engine loaded). Every id must come back once.
  raw and sql alternate `--reps` times; the figure is the median, all walls are kept in `detail`.
The passes read the whole test split (N/5 images) unless `--max-pass M` caps them (said in the row).
Each phase runs in a fresh process: its peak RSS (ru_maxrss from wait4) is the client's figure. A sampler
reads /proc every 0.2 s for the PostgreSQL server's processes: the largest VmRSS and RssAnon of one
process (a backend's RSS includes the shared buffers it touched, RssAnon does not) and the largest sum
of RssAnon over all of them. The 1-minute load average is recorded before and after every phase.
Rows go to the table growth_point (sql/growth.sql) of the same database; the plot is drawn from the
session's rows, so a session can be extended by later calls with `--session`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FETCH_ROWS = 2048


# --- children ---------------------------------------------------------------------------------

def child_raw(engine_name: str, weights: str, threads: int, limit: int | None) -> dict:
    import numpy as np

    from cnnsql import db
    from cnnsql.engines import get_engine
    from cnnsql.models.weights import load_weights

    engine = get_engine(engine_name, load_weights(weights), threads=threads)
    engine.predict(np.zeros((2, 3, 32, 32), np.uint8))  # warm-up
    conn = db.connect()
    t0 = time.perf_counter()
    seen, count = 0, 0
    with conn.cursor(name="growth_raw") as cur:
        cur.itersize = FETCH_ROWS
        query = "SELECT id, img FROM cifar_image_test" + (" WHERE id < %s" if limit else "")
        cur.execute(query, (limit,) if limit else None)
        while rows := cur.fetchmany(FETCH_ROWS):
            images = np.frombuffer(b"".join(r[1] for r in rows), np.uint8).reshape(-1, 3, 32, 32)
            engine.predict(images, engine.default_batch_size)
            count += len(rows)
            seen ^= _xor_ids(r[0] for r in rows)
    wall = time.perf_counter() - t0
    conn.close()
    return {"rows": count, "wall_s": wall, "ids_xor": seen, "batch": engine.default_batch_size}


def _xor_ids(ids) -> int:
    out = 0
    for i in ids:
        out ^= int(i) * 2654435761 % (1 << 61)
    return out


def child_sql(engine_name: str, weights: str, threads: int, limit: int | None) -> dict:
    from cnnsql.placements import evadb_session
    from cnnsql.placements.pgfunctions import sql_name

    f = sql_name(engine_name)
    cursor = evadb_session.connect(weights=weights, threads=threads)
    evadb_session.run(cursor, f"SELECT id, {f}(img).label FROM pg.cifar_test WHERE id < 1;")
    query = f"SELECT id, {f}(img).label FROM pg.cifar_test" + (f" WHERE id < {int(limit)};" if limit else ";")
    t0 = time.perf_counter()
    out = evadb_session.run(cursor, query)
    wall = time.perf_counter() - t0
    ids = out[out.columns[0]]
    return {"rows": len(out), "distinct": int(ids.nunique()), "wall_s": wall, "ids_xor": _xor_ids(ids),
            "query": query}


# --- the parent: phases in fresh processes, the server sampled --------------------------------

class ServerSampler:
    """Peak VmRSS / RssAnon of one server process and peak sum of RssAnon, from /proc."""

    def __init__(self, postmaster: int | None, interval: float = 0.2):
        self.postmaster, self.interval = postmaster, interval
        self.peak_rss = self.peak_anon = self.peak_anon_sum = 0.0
        self.peak_anon_process = ""
        self._stop = threading.Event()

    def _pids(self) -> list[int]:
        if not self.postmaster:
            return []
        try:
            children = Path(f"/proc/{self.postmaster}/task/{self.postmaster}/children").read_text().split()
        except OSError:
            return []
        return [self.postmaster, *map(int, children)]

    @staticmethod
    def _title(pid: int) -> str:
        """The server process's title: 'postgres: autovacuum worker', 'postgres: cnnsql cnnsql 127.0.0.1 ...'."""
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60].strip()
        except OSError:
            return "?"

    @staticmethod
    def _status(pid: int) -> dict:
        out = {}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    out[key] = int(value.split()[0]) / 1024
        except OSError:
            pass
        return out

    def _run(self):
        while True:
            anon_sum = 0.0
            for pid in self._pids():
                s = self._status(pid)
                self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
                if s.get("RssAnon", 0) > self.peak_anon:
                    self.peak_anon, self.peak_anon_process = s["RssAnon"], self._title(pid)
                anon_sum += s.get("RssAnon", 0)
            self.peak_anon_sum = max(self.peak_anon_sum, anon_sum)
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"server_peak_rss_mb": self.peak_rss, "server_peak_anon_mb": self.peak_anon,
                "server_peak_anon_sum_mb": self.peak_anon_sum, "server_peak_anon_process": self.peak_anon_process}


def run_phase(cmd: list[str], postmaster: int | None) -> tuple[dict, str]:
    """Run one phase in a fresh process; its wall time, exit, peak RSS and the server's peaks."""
    load_before = os.getloadavg()[0]
    with ServerSampler(postmaster) as sampler:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()  # reaped through wait4 (see _patch_popen_rusage): ru_maxrss kept
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"growth: {' '.join(cmd[2:5])} failed ({proc.returncode}): {err.strip()[-400:]}")
    fig = {"wall_s": wall, "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0], **sampler.summary()}
    return fig, out


def child_cmd(kind: str, args, engine: str, limit: int | None) -> list[str]:
    """The child reports its own ru_maxrss (peak RSS) beside its result."""
    return [sys.executable, __file__, "--child", kind, "--engine", engine, "--weights", args.weights,
            "--threads", str(args.threads)] + (["--limit", str(limit)] if limit else [])


def postmaster_pid(conn) -> int | None:
    with conn.cursor() as cur:
        cur.execute("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
        (datadir,) = cur.fetchone()
    conn.rollback()
    try:
        return int(Path(datadir, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError, TypeError):
        return None  # a server elsewhere: no server-side memory figures


def table_bytes(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_total_relation_size('cifar_image_train') + pg_total_relation_size('cifar_image_test')")
        (size,) = cur.fetchone()
    conn.rollback()
    return int(size)


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


def measure_size(conn, args, session: str, n: int, postmaster: int | None) -> None:
    fig, out = run_phase([sys.executable, "-m", "cnnsql", "load", "--quiet", "--synthetic", str(n)], postmaster)
    fig["client_peak_rss_mb"] = _last_child_maxrss()
    n_test = max(1, n // 5)
    record(conn, session, n, "load", None, n + n_test, fig, {"table_bytes": table_bytes(conn), "stdout": out.strip(),
                                                          "server_peak_anon_process": fig["server_peak_anon_process"]})
    print(f"N={n}: load {n + n_test} images in {fig['wall_s']:.1f} s, client peak {fig['client_peak_rss_mb']:.0f} MB, "
          f"load avg {fig['loadavg_before']:.1f}-{fig['loadavg_after']:.1f}", file=sys.stderr, flush=True)
    limit = args.max_pass if args.max_pass and args.max_pass < n_test else None
    rows_expected = limit or n_test
    for engine in args.engines.split(","):
        figs = {"raw": [], "sql": []}
        for _ in range(args.reps):
            for kind in ("raw", "sql"):
                f, out = run_phase(child_cmd(kind, args, engine, limit), postmaster)
                res = json.loads(out.strip().splitlines()[-1])
                want_xor = _xor_ids(range(rows_expected))
                if res["rows"] != rows_expected or res["ids_xor"] != want_xor or res.get("distinct", res["rows"]) != res["rows"]:
                    raise SystemExit(f"growth: {kind} pass returned {res['rows']} rows, expected each of "
                                     f"{rows_expected} ids once")
                figs[kind].append({**f, **res, "wall_s": res["wall_s"], "process_wall_s": f["wall_s"]})
                print(f"N={n} {engine} {kind}: {res['rows']} images in {res['wall_s']:.2f} s "
                      f"({res['rows'] / res['wall_s']:.0f}/s), client peak {res['client_peak_rss_mb']:.0f} MB, "
                      f"server process peak {f['server_peak_rss_mb']:.0f} MB (anon {f['server_peak_anon_mb']:.0f}: {f['server_peak_anon_process']}), "
                      f"load avg {f['loadavg_before']:.1f}-{f['loadavg_after']:.1f}", file=sys.stderr, flush=True)
        for kind, runs in figs.items():
            med = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
            agg = {k: max(r[k] for r in runs) for k in ("client_peak_rss_mb", "server_peak_rss_mb",
                                                      "server_peak_anon_mb", "server_peak_anon_sum_mb")}
            fig = {**agg, "wall_s": med["wall_s"], "loadavg_before": runs[0]["loadavg_before"],
                   "loadavg_after": runs[-1]["loadavg_after"]}
            detail = {"walls": [r["wall_s"] for r in runs], "process_walls": [r["process_wall_s"] for r in runs],
                      "loadavg": [[r["loadavg_before"], r["loadavg_after"]] for r in runs], "threads": args.threads,
                      "limit": limit, "split_rows": n_test, "query": runs[0].get("query")
                      or "SELECT id, img FROM cifar_image_test" + (f" WHERE id < {limit}" if limit else ""),
                      "batch": runs[0].get("batch"),
                      "server_peak_anon_process": [r.get("server_peak_anon_process") for r in runs]}
            record(conn, session, n, kind, engine, rows_expected, fig, detail)


_CHILD_RUSAGE = {}


def _last_child_maxrss() -> float | None:
    return _CHILD_RUSAGE.get("maxrss")


def _patch_popen_rusage():
    """Popen's wait uses waitpid; use wait4 to keep the reaped child's ru_maxrss (KiB on Linux)."""
    orig = subprocess.Popen._try_wait

    def _try_wait(self, wait_flags):
        try:
            pid, sts, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return orig(self, wait_flags)
        if pid == self.pid:
            _CHILD_RUSAGE["maxrss"] = usage.ru_maxrss / 1024
        return pid, sts

    subprocess.Popen._try_wait = _try_wait


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
    series = sorted({(r[1], r[2]) for r in rows})
    for phase, engine in series:
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
    fig.suptitle(f"cnnsql growth (benchmarks/growth.py, session {session})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--engines", default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--max-pass", type=int, help="read at most M test images per pass (said in each row)")
    ap.add_argument("--session", help="add to this growth session (default: a new one)")
    ap.add_argument("--plot", default="docs/figures/growth.png")
    ap.add_argument("--child", choices=["raw", "sql"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import resource

        res = (child_raw if args.child == "raw" else child_sql)(args.engine, args.weights, args.threads, args.limit)
        res["client_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    _patch_popen_rusage()
    from cnnsql import db
    from cnnsql import results

    conn = db.connect()
    db.ensure_schema(conn)
    with conn.cursor() as cur:
        cur.execute(db.sql_file("growth.sql"))
    conn.commit()
    session = args.session or results.new_session_id()
    postmaster = postmaster_pid(conn)
    for n in map(int, args.sizes.split(",")):
        measure_size(conn, args, session, n, postmaster)
    plot(conn, session, REPO / args.plot)
    print(f"growth session {session}: rows in table growth_point", file=sys.stderr)
    conn.close()


if __name__ == "__main__":
    main()
