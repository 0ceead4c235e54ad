"""The Ray placement: a worker actor that reads an id-range shard of a dataset's stored images from
PostgreSQL, classifies it through the one predictor and upserts the predictions, committing per batch
(run by `cnnsql bench --cluster ray`, cnnsql/bench/ray_runner.py)."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from psycopg2 import sql

from cnnsql import db
from cnnsql.core.errors import CnnsqlError
from cnnsql.placements import ray_local


class ShardWorker:
    """The Ray actor body (wrapped with ray.remote at run time): an adapter over the one predictor."""

    def __init__(self, engine: str, weights, threads: int, dsn: str, env: dict, relation: tuple[str, str]):
        os.environ.update(env)
        from cnnsql.placements.predictor import Predictor

        self.predictor = Predictor.load(engine, weights, threads=threads)
        self.engine = self.predictor.engine
        self.relation = relation  # (schema, view) of the split's stored images: Dataset.bytes_relation
        self.dsn = dsn
        self.conn = None
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _connect(self):
        if self.conn is None or self.conn.closed:
            self.conn = db.connect(db.Target(self.dsn, private=False))
        return self.conn

    def pid(self) -> int:
        return os.getpid()

    def warmup(self, n: int = 2) -> None:
        self.predictor.warmup(n)

    def run_shard(self, run_id: int, table: str, lo: int, hi: int, batch: int) -> dict:
        conn = self._connect()
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(shard_query(self.relation), (lo, hi))
            rows = cur.fetchall()
        conn.rollback()
        ids = [r[0] for r in rows]
        upsert = sql.SQL("INSERT INTO {} (run_id, id, label, probability, probs, worker) VALUES %s "
                         "ON CONFLICT (run_id, id) DO UPDATE SET label = EXCLUDED.label, "
                         "probability = EXCLUDED.probability, probs = EXCLUDED.probs, worker = EXCLUDED.worker, "
                         "attempt = {}.attempt + 1").format(sql.Identifier(table), sql.Identifier(table))
        from psycopg2.extras import execute_values

        for i in range(0, len(ids), batch):
            out, bad = self.predictor.classify([r[1] for r in rows[i:i + batch]], ids[i:i + batch])
            if bad:  # the stored images are checked at load: a bad one here is corruption, never a guess
                raise CnnsqlError(f"Ray worker: {bad[0][1]} (id {bad[0][0]}) in {'.'.join(self.relation)}",
                                  "reload the dataset")
            values = [(run_id, i_, label, prob, probs, self.name) for i_, label, _, prob, probs in out]
            with conn.cursor() as cur:
                execute_values(cur, upsert.as_string(conn), values, page_size=len(values))
            conn.commit()
        return {"lo": lo, "hi": hi, "rows": len(ids), "seconds": time.perf_counter() - t0, "worker": self.name}


def shard_query(relation: tuple[str, str]) -> sql.Composed:
    return sql.SQL("SELECT id, img FROM {} WHERE id >= %s AND id < %s ORDER BY id").format(sql.Identifier(*relation))


def worker_env(target: db.Target, private_dir: Path | None) -> dict:
    return {"OMP_NUM_THREADS": "1", **ray_local.worker_secrets(target, private_dir)}


def actor_args(engine: str, weights_ref, threads: int, target: db.Target, env: dict,
               relation: tuple[str, str] = ("cnnsql_bytes", "cifar_test_bytes")) -> tuple:
    """ShardWorker's arguments. They are pickled into Ray's GCS: no password in them (see ray_local)."""
    return engine, weights_ref, threads, ray_local.worker_dsn(target), env, relation
