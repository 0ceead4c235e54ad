"""Load CIFAR-10 into PostgreSQL with binary COPY: both splits, the class names and the provenance
rows in ONE transaction, so a re-run replaces the dataset (no duplicates) and an interrupted load
leaves the previous dataset entirely (never one split of each)."""
from __future__ import annotations

import json
import struct
import sys
import time

import numpy as np
import psycopg2
from psycopg2 import sql
from cnnsql.core.progress import progress_bar

from cnnsql.data import cifar
from cnnsql import db
from cnnsql.data import synthetic as synthetic_data
from cnnsql.data.cifar import IMAGE_BYTES, Dataset, Split
from cnnsql.core.errors import CnnsqlError

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
CHUNK_ROWS = 2000


def _copy_rows(split: Split, start: int, stop: int) -> bytes:
    """Binary COPY tuples (split, id, label, img) for rows [start, stop), built with NumPy."""
    name = split.name.encode()
    dt = np.dtype([("nf", ">i2"), ("l_split", ">i4"), ("split", f"S{len(name)}"), ("l_id", ">i4"), ("id", ">i4"),
                   ("l_label", ">i4"), ("label", ">i2"), ("l_img", ">i4"), ("img", "u1", (IMAGE_BYTES,))])
    rows = np.empty(stop - start, dtype=dt)
    rows["nf"], rows["l_split"], rows["split"] = 4, len(name), name
    rows["l_id"], rows["id"] = 4, np.arange(start, stop)
    rows["l_label"], rows["label"] = 2, split.labels[start:stop]
    rows["l_img"], rows["img"] = IMAGE_BYTES, split.images[start:stop]
    return rows.tobytes()


class _CopyStream:
    """File-like object psycopg2's copy_expert reads: header, row chunks, trailer; updates a bar."""

    def __init__(self, split: Split, bar):  # bar: a progress.progress_bar()
        self.split, self.bar = split, bar
        self.chunks = self._gen()
        self.buf = b""

    def _gen(self):
        yield COPY_HEADER
        n = len(self.split.labels)
        for start in range(0, n, CHUNK_ROWS):
            stop = min(n, start + CHUNK_ROWS)
            yield _copy_rows(self.split, start, stop)
            self.bar.update(stop - start)
        yield COPY_TRAILER

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buf) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buf += chunk
        if size < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:size], self.buf[size:]
        return out


def load_dataset(conn, data: Dataset, progress: bool = True) -> dict[str, dict]:
    """Replace the whole dataset in one transaction; return per-split rows and seconds."""
    db.ensure_schema(conn)
    stats = {}
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('cnnsql.load'))")
            for name, split in data.splits.items():
                stats[name] = _load_split(cur, conn, data, name, split, progress)
            cur.execute("DELETE FROM cifar_class")
            cur.executemany("INSERT INTO cifar_class (label, name) VALUES (%s, %s)", list(enumerate(data.class_names)))
        conn.commit()
    except BaseException:
        if not conn.closed:  # nothing of the interrupted load stays (a dead server rolled back already)
            try:
                conn.rollback()
            except psycopg2.Error:
                pass
        raise
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in data.splits:
            cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(f"cifar_image_{name}")))
    conn.autocommit = False
    return stats


def _load_split(cur, conn, data: Dataset, name: str, split: Split, progress: bool) -> dict:
    t0 = time.perf_counter()
    n = len(split.labels)
    partition = sql.Identifier(f"cifar_image_{name}")
    with progress_bar(total=n, unit="img", unit_scale=True, desc=f"load {name}", disable=not progress) as bar:
        cur.execute(sql.SQL("TRUNCATE {}").format(partition))
        cur.copy_expert(sql.SQL("COPY {} (split, id, label, img) FROM STDIN (FORMAT binary)")
                        .format(partition).as_string(conn), _CopyStream(split, bar), size=1 << 20)
    cur.execute(
        """INSERT INTO cifar_dataset (split, kind, source, n_rows, md5) VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (split) DO UPDATE SET kind = EXCLUDED.kind, source = EXCLUDED.source,
           n_rows = EXCLUDED.n_rows, md5 = EXCLUDED.md5, loaded_at = now()""",
        (name, data.kind, data.source, n, json.dumps(split.md5)))
    return {"rows": n, "seconds": time.perf_counter() - t0}


def counts(conn) -> dict[str, int]:
    with conn.cursor() as cur:
        cur.execute("SELECT split, count(*) FROM cifar_image GROUP BY split")
        out = dict(cur.fetchall())
    conn.rollback()
    return out


def read_source(source: str | None = None, synthetic: int | None = None, seed: int = 0,
                download: bool = True, progress: bool = True) -> Dataset:
    """The dataset to load: synthetic (said loudly) or CIFAR-10 from the resolved source."""
    if synthetic:
        data = synthetic_data.dataset(synthetic, seed=seed)  # streamed: memory does not grow with N
        print(f"SYNTHETIC data ({synthetic} train images): not CIFAR-10, for smoke tests only", file=sys.stderr)
        return data
    path = cifar.resolve_source(source, download=download, progress=progress)
    print(f"reading {path}", file=sys.stderr)
    return cifar.read_dataset(path)


def _reachable(target: db.Target) -> bool:
    try:
        psycopg2.connect(target.dsn, connect_timeout=3).close()
        return True
    except psycopg2.Error:
        return False


def _lost_connection(target: db.Target, exc: Exception) -> CnnsqlError:
    """The connection broke mid-load: say why (server stopped?) rather than 'connection closed'."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    cause = next((l for l in lines if "terminating" in l or "shutting down" in l), lines[0] if lines else "")
    if "administrator command" in cause or "shutting down" in cause or not _reachable(target):
        cause = "the PostgreSQL server was stopped during the load" + (f" ({cause})" if cause else "")
    return CnnsqlError(f"the load was interrupted: {cause}; nothing of it was committed, the previous dataset is intact",
                       "start the server (`cnnsql db start`) and run `cnnsql load` again")


def load(target: db.Target | None = None, **source_options) -> dict[str, dict]:
    """Read and verify the source first (no database needed for that), then load it."""
    data = read_source(**source_options)
    target = target or db.resolve()
    with db.connection(target) as conn:
        try:
            stats = load_dataset(conn, data, progress=source_options.get("progress", True))
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            raise _lost_connection(target, exc) from None
    total = sum(s["rows"] for s in stats.values())
    secs = sum(s["seconds"] for s in stats.values())
    parts = ", ".join(f"{k} {v['rows']}" for k, v in stats.items())
    print(f"loaded {total} images ({parts}) in {secs:.1f} s ({total / secs:,.0f} images/s) [{data.kind}]")
    return stats
