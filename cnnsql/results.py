"""Logging runs to PostgreSQL. A run is 'running' until `finish_run` commits its results and
marks it 'complete' in one transaction, so an interrupted run never looks complete."""
from __future__ import annotations

import json
import uuid

import psycopg2
from psycopg2 import sql

from . import db, envinfo
from .errors import CnnsqlError

RUN_FIELDS = ("kind", "scenario", "engine", "query", "split", "n_rows", "batch_size", "threads", "device",
              "warmup", "repetitions", "workers", "cluster", "dataset_kind", "weights", "detail")
RESULT_FIELDS = ("wall_s", "images_per_s", "latency_ms", "p50_ms", "p90_ms", "p99_ms", "accuracy", "agreement",
                 "peak_rss_mb", "cpu_pct", "gpu_pct", "detail")


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


def finish_run(conn, run_id: int, results: dict, repetitions: list[float] = (), epochs: list[dict] = ()) -> None:
    unknown = set(results) - set(RESULT_FIELDS)
    if unknown:
        raise ValueError(f"unknown result fields {unknown}")
    if not (results.get("images_per_s") or 1) > 0 or not (results.get("wall_s") or 1) > 0:
        raise CnnsqlError(f"run {run_id}: refusing to log {results.get('images_per_s')} images/s over "
                          f"{results.get('wall_s')} s", "check --limit and --repetitions")
    cols = list(results)
    sets = sql.SQL("").join(sql.SQL("{} = %s, ").format(sql.Identifier(c)) for c in cols)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO bench_repetition (run_id, rep, wall_s) VALUES (%s, %s, %s)",
                        [(run_id, i, w) for i, w in enumerate(repetitions)])
        cur.executemany("INSERT INTO train_epoch (run_id, epoch, seconds, loss, accuracy) VALUES (%s, %s, %s, %s, %s)",
                        [(run_id, e["epoch"], e["seconds"], e.get("loss"), e.get("accuracy")) for e in epochs])
        cur.execute(sql.SQL("UPDATE bench_run SET {}status = 'complete', finished_at = now() "
                            "WHERE run_id = %s AND status = 'running'").format(sets),
                    [_jsonify(c, results[c]) for c in cols] + [run_id])
        if cur.rowcount != 1:
            raise RuntimeError(f"run {run_id} is not running any more")
    conn.commit()


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


def dataset_info(conn) -> dict:
    """Kind and checksums of the loaded data, for manifests and run records."""
    db.require_tables(conn, "cifar_dataset", creator="cnnsql load")
    with conn.cursor() as cur:
        cur.execute("SELECT split, kind, source, n_rows, md5 FROM cifar_dataset ORDER BY split")
        rows = cur.fetchall()
    conn.rollback()
    return {r[0]: {"kind": r[1], "source": r[2], "n_rows": r[3], "md5": r[4]} for r in rows}


def dataset_version(conn) -> tuple:
    """What identifies the loaded dataset: every load rewrites these rows (loaded_at included)."""
    with conn.cursor() as cur:
        cur.execute("SELECT split, kind, md5::text, n_rows, loaded_at FROM cifar_dataset ORDER BY split")
        rows = tuple(cur.fetchall())
    conn.rollback()
    return rows


def check_dataset(conn, version: tuple, what: str) -> None:
    """Refuse to log a run whose data was replaced while it ran (a concurrent `cnnsql load`)."""
    if dataset_version(conn) != version:
        raise CnnsqlError(f"{what}: the dataset was reloaded while the run was going, so its figures would mix "
                          "two datasets; the run is marked failed", "rerun it when no `cnnsql load` is running")
