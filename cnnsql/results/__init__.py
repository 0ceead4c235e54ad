"""Logging runs to PostgreSQL. A run is 'running' until `finish_run` commits its results and
marks it 'complete' in one transaction, so an interrupted run never looks complete."""
from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg2
from psycopg2 import sql

from cnnsql import db
from cnnsql.core import envinfo
from cnnsql.core.errors import CnnsqlError
# the loaded CIFAR-10's provenance belongs to the data layer; kept importable from here for callers
from cnnsql.data.cifar_table import check_dataset, dataset_info, dataset_version  # noqa: F401

RUN_FIELDS = ("kind", "scenario", "engine", "query", "split", "n_rows", "batch_size", "threads", "device",
              "warmup", "repetitions", "workers", "cluster", "dataset_kind", "weights", "detail")
RESULT_FIELDS = ("wall_s", "images_per_s", "latency_ms", "p50_ms", "p90_ms", "p99_ms", "accuracy", "agreement",
                 "peak_rss_mb", "cpu_pct", "gpu_pct", "detail", "cpu_s", "wall_min_s", "wall_max_s", "noisy",
                 "load_1m")


def new_session_id() -> str:
    return uuid.uuid4().hex[:12]


def _jsonify(key, value):
    return json.dumps(value, default=str) if key in ("agreement", "detail", "versions") and value is not None else value


def start_run(conn, session_id: str, **fields) -> int:
    unknown = set(fields) - set(RUN_FIELDS)
    if unknown:
        raise ValueError(f"unknown run fields {unknown}")
    fields = {**fields, "session_id": session_id, "host": envinfo.host(), "versions": envinfo.versions(),
              "git_commit": envinfo.git_commit()}
    cols = list(fields)
    with conn.cursor() as cur:
        query = sql.SQL("INSERT INTO bench_run ({}) VALUES ({}) RETURNING run_id").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(sql.Placeholder() * len(cols)))
        cur.execute(query, [_jsonify(k, fields[k]) for k in cols])
        run_id = cur.fetchone()[0]
    conn.commit()
    return run_id


def finish_run(conn, run_id: int, results: dict, repetitions: list[float] = (), epochs: list[dict] = (),
               cpus: list[float] = ()) -> None:
    unknown = set(results) - set(RESULT_FIELDS)
    if unknown:
        raise ValueError(f"unknown result fields {unknown}")
    if not (results.get("images_per_s") or 1) > 0 or not (results.get("wall_s") or 1) > 0:
        raise CnnsqlError(f"run {run_id}: refusing to log {results.get('images_per_s')} images/s over "
                          f"{results.get('wall_s')} s", "check --limit and --repetitions")
    cols = list(results)
    sets = sql.SQL("").join(sql.SQL("{} = %s, ").format(sql.Identifier(c)) for c in cols)
    with conn.cursor() as cur:
        cpus = list(cpus) or [None] * len(repetitions)
        cur.executemany("INSERT INTO bench_repetition (run_id, rep, wall_s, cpu_s) VALUES (%s, %s, %s, %s)",
                        [(run_id, i, w, c) for i, (w, c) in enumerate(zip(repetitions, cpus))])
        cur.executemany("INSERT INTO train_epoch (run_id, epoch, seconds, loss, accuracy) VALUES (%s, %s, %s, %s, %s)",
                        [(run_id, e["epoch"], e["seconds"], e.get("loss"), e.get("accuracy")) for e in epochs])
        cur.execute(sql.SQL("UPDATE bench_run SET {}status = 'complete', finished_at = now() "
                            "WHERE run_id = %s AND status = 'running'").format(sets),
                    [_jsonify(c, results[c]) for c in cols] + [run_id])
        if cur.rowcount != 1:
            raise RuntimeError(f"run {run_id} is not running any more")
    conn.commit()


class Run:
    """One row of bench_run in the making: `finish` logs its results and marks it complete."""

    def __init__(self, conn, session_id: str, **fields):
        self.conn = conn
        self.id = start_run(conn, session_id, **fields)
        self.finished = False

    def finish(self, results: dict, **series) -> None:
        finish_run(self.conn, self.id, results, **series)
        self.finished = True


@contextmanager
def logged_run(conn, session_id: str, **fields) -> Iterator[Run]:
    """The one run lifecycle (bench, Ray, training): 'running' on entry; `run.finish(...)` inside the
    block marks it complete; an exception, or leaving the block unfinished, marks it failed."""
    run = Run(conn, session_id, **fields)
    try:
        yield run
    except BaseException as exc:
        fail_run(conn, run.id, repr(exc))
        raise
    if not run.finished:
        fail_run(conn, run.id, "the run ended without results")


def fail_run(conn, run_id: int, error: str) -> None:
    """Mark a run failed, best effort: if the database is gone, the run stays 'running' (never complete)."""
    try:
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("UPDATE bench_run SET status = 'failed', finished_at = now(), "
                        "detail = coalesce(detail, '{}'::jsonb) || jsonb_build_object('error', %s::text) "
                        "WHERE run_id = %s AND status = 'running'", (error[:500], run_id))
        conn.commit()
    except psycopg2.Error:
        pass


SESSION_FORMAT = "cnnsql-bench-session/1"


def export_session(conn, session_id: str, out_dir, settings=None) -> "Path":
    """One JSON file for a complete benchmark session (in the spirit of ClickBench's committed results):
    machine, versions, commit, settings and every run with every repetition. Returns its path."""
    import dataclasses
    import os
    import platform
    from pathlib import Path

    import psutil

    with conn.cursor() as cur:
        cur.execute("SELECT * FROM bench_run WHERE session_id = %s AND status = 'complete' ORDER BY run_id",
                    (session_id,))
        cols = [d[0] for d in cur.description]
        runs = [dict(zip(cols, r)) for r in cur.fetchall()]
        cur.execute("SELECT p.run_id, p.rep, p.wall_s, p.cpu_s FROM bench_repetition p JOIN bench_run r "
                    "USING (run_id) WHERE r.session_id = %s ORDER BY p.run_id, p.rep", (session_id,))
        reps = cur.fetchall()
    conn.rollback()
    if not runs:
        raise CnnsqlError(f"session {session_id} has no complete run to export", "run `cnnsql bench`")
    by_run: dict[int, list] = {}
    for run_id, rep, wall, cpu in reps:
        by_run.setdefault(run_id, []).append({"wall_s": wall, "cpu_s": cpu})
    first = runs[0]
    shared = ("session_id", "host", "versions", "git_commit")
    doc = {
        "format": SESSION_FORMAT,
        "session": session_id,
        "started_at": first["started_at"].isoformat(),
        "finished_at": max(r["finished_at"] for r in runs).isoformat(),
        "machine": {"host": _anonymous_host(first["host"]), "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "load_at_start": (first["detail"] or {}).get("load_at_start")},
        "versions": first["versions"],
        "git_commit": first["git_commit"],
        "settings": _plain(dataclasses.asdict(settings)) if dataclasses.is_dataclass(settings) else settings,
        "runs": [{**{k: _plain(_file_name(v) if k == "weights" else v) for k, v in r.items() if k not in shared},
                  "repetition_values": by_run.get(r["run_id"], [])} for r in runs],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{first['started_at']:%Y%m%dT%H%M%S}-{session_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def _anonymous_host(host: str | None) -> str | None:
    """The machine line without its host name (committed files say what the machine is, not its name):
    'name (x86_64, AMD EPYC, 2 cpus, Linux)' -> 'x86_64, AMD EPYC, 2 cpus, Linux'."""
    if not host or "(" not in host:
        return host
    return host[host.index("(") + 1:].rstrip(")")


def _file_name(path):
    """A weights path as its file name: no user's folder layout in a committed file."""
    return Path(path).name if isinstance(path, str) and path else path


def _plain(value):
    """JSON-ready: paths and timestamps as text, numpy/Decimal numbers as floats."""
    import datetime
    import decimal
    from pathlib import PurePath

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value
