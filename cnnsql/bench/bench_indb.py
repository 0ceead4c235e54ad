"""The third placement of `cnnsql bench`: inference inside PostgreSQL (kind 'indb' in bench_run).

Beside raw (the engine in the benchmark's process) and sql (through EvaDB), the same engine runs
in the server backend as the PL/Python functions of `cnnsql db functions install`:
  offline: the test images through `cnnsql.<E>CNN_batch`, grouped at the engine's batch size, all
           rows fetched by the client (psycopg2), checked against the raw engine's probabilities;
  single-stream: one-image queries `... cnnsql.<E>CNN(img) ... WHERE id = k` (p50/p99).
Each engine gets its own connection (so its own backend: the memory figure is that engine's alone);
CPU% and RSS are sampled on that backend process, not on the client.
"""
from __future__ import annotations

import itertools
import sys

import numpy as np
import psycopg2
from psycopg2 import sql

from cnnsql import db
from cnnsql.placements import pgfunctions
from cnnsql.engines import engine_class
from cnnsql.core.errors import CnnsqlError

OFFLINE = """SELECT p.id, p.label, p.probs FROM (
    SELECT id / {batch} AS batch, array_agg(id ORDER BY id) AS ids, array_agg(img ORDER BY id) AS imgs
    FROM {relation} WHERE id < {n} GROUP BY 1) b,
  {function}(b.ids, b.imgs) p"""
SINGLE = "SELECT id, p.* FROM {relation}, {function}(img) p WHERE id = %s"
PROB_TOLERANCE = 1e-5


def query(template: str, conn, function: str, relation: tuple[str, str] = ("cnnsql_bytes", "cifar_test_bytes"),
          **ints: int) -> str:
    """A template on a dataset's stored test images (`relation`: DatasetInfo.bytes_relation)."""
    fn = sql.Identifier(pgfunctions.SCHEMA, function.lower())
    return sql.SQL(template).format(function=fn, relation=sql.Identifier(*relation),
                                    **{k: sql.Literal(int(v)) for k, v in ints.items()}).as_string(conn)


class InDatabase:
    """Installs the functions once per benchmark; `skipped` says why when it cannot."""

    def __init__(self, bench):
        self.bench = bench
        self.skipped: str | None = None
        if not bench.target.private:
            self.skipped = self._external_server(bench)
            if self.skipped:
                print(f"cnnsql bench: in-PostgreSQL placement skipped: {self.skipped}", file=sys.stderr, flush=True)
            return
        try:
            pgfunctions.install(bench.target, bench.cfg.engines, bench.weights, bench.cfg.threads)
            bench.say(f"[in PostgreSQL] functions cnnsql.<Engine>CNN installed with weights {bench.weights}, "
                      f"{bench.cfg.threads} threads per backend")
        except CnnsqlError as exc:
            self.skipped = str(exc)
            print(f"cnnsql bench: in-PostgreSQL placement skipped: {exc}", file=sys.stderr, flush=True)

    @staticmethod
    def _external_server(bench) -> str | None:
        """On a server of the user's (CNNSQL_DSN), the benchmark never installs code: it uses functions its
        administrator installed with `cnnsql db functions install`, when they run these weights."""
        try:
            with db.connection(bench.target) as conn:
                found = pgfunctions.installed(conn)
        except (psycopg2.Error, CnnsqlError):
            found = {}
        missing = [e for e in bench.cfg.engines if (found.get(e) or {}).get("weights") != str(bench.weights)]
        if missing:
            return (f"on a server given by CNNSQL_DSN the benchmark does not install functions; "
                    f"{', '.join(missing)} not installed there with weights {bench.weights} (its administrator "
                    f"runs `cnnsql db functions install --weights {bench.weights}`)")
        return None

    def run(self, name: str, n: int, single_calls: int, raw_probs: np.ndarray) -> dict:
        if self.skipped:
            return {}
        with db.connection(self.bench.target) as conn:
            conn.autocommit = True
            return self._measure(conn, name, n, single_calls, raw_probs)

    def _measure(self, conn, name, n, single_calls, raw_probs) -> dict:
        bench, cfg = self.bench, self.bench.cfg
        function = pgfunctions.sql_name(name)
        batch = engine_class(name).default_batch_size
        warm_n = min(n, engine_class(name).bench_warmup_images or n)  # a slow engine warms up on fewer images
        common = {"engine": name, "device": "cpu", "batch_size": batch}
        pid = conn.get_backend_pid() if self.bench.target.private else None
        rel = bench.ds.bytes_relation("test")
        q = query(OFFLINE, conn, function + "_batch", rel, batch=batch, n=n)
        bench.say(f"[{name}] in PostgreSQL offline: {n} images through cnnsql.{function}_batch, batch {batch}")

        def fetch(text, *params):
            with conn.cursor() as cur:
                cur.execute(text, params)
                return cur.fetchall()

        def evaluate(rows):
            ids = np.array([r[0] for r in rows])
            if len(rows) != n or not np.array_equal(np.sort(ids), bench.ids[:n]):
                raise CnnsqlError(f"{name}: in-database query returned {len(rows)} rows, expected ids 0..{n - 1}")
            order = np.argsort(ids)
            labels = np.array([rows[i][1] for i in order])
            probs = np.array([rows[i][2] for i in order], dtype=np.float32)
            diff = float(np.abs(probs - raw_probs[:n]).max())
            same = float((labels == raw_probs[:n].argmax(1)).mean())
            if same < 1.0 or not diff <= PROB_TOLERANCE:  # e.g. reinstalled with other weights meanwhile
                raise CnnsqlError(f"{name}: inside PostgreSQL the top-1 matches the raw engine on {same:.4f} of "
                                  f"the images, probabilities differ by up to {diff:.2e}",
                                  "check `cnnsql db functions status` (weights) and rerun")
            return {"accuracy": float((labels == bench.labels[:n]).mean()),
                    "detail": {"placement": "in PostgreSQL (PL/Python)",
                               "matches_raw": same,
                               "max_prob_diff_vs_raw": diff, "prob_tolerance": PROB_TOLERANCE,
                               **self._backend(conn)}}

        warm = query(OFFLINE, conn, function + "_batch", rel, batch=batch, n=warm_n)
        off = bench.phase({**common, "kind": "indb", "scenario": "offline", "query": q}, lambda: fetch(q),
                          cfg.reps(name, indb=True), cfg.warmup, n, evaluate, warm=lambda: fetch(warm),
                          monitor_pid=pid)
        q1 = query(SINGLE, conn, function, rel)
        ids = itertools.cycle(range(n))
        bench.say(f"[{name}] in PostgreSQL single-stream: {single_calls} x {q1}")
        one = bench.phase({**common, "batch_size": 1, "kind": "indb", "scenario": "single-stream", "query": q1},
                          lambda: fetch(q1, next(ids)), single_calls, 1, 1, monitor_pid=pid)
        return {"indb_ips": off["images_per_s"], "indb_p50_ms": one["p50_ms"], "indb_p99_ms": one["p99_ms"],
                "indb_matches_raw": off["detail"]["matches_raw"], "indb_max_prob_diff": off["detail"]["max_prob_diff_vs_raw"]}

    @staticmethod
    def _backend(conn) -> dict:
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("SELECT {}.runtime_info()").format(sql.Identifier(pgfunctions.SCHEMA)))
                info = cur.fetchone()[0]
        except psycopg2.Error:
            return {}
        return {"backend_vmrss_mb": info.get("vmrss_mb"), "backend_vmhwm_mb": info.get("vmhwm_mb")}
