"""Predictions written back into a PostgreSQL table, at any size, in one transaction (`cnnsql predict --into`).

One output table whatever runs the CNN: `(id integer PRIMARY KEY, label integer, class_name text,
probability real, probs real[])`, one row per image of the split (a bad image: NULL outputs, as in the
SQL functions), its table comment a JSON record of what made it (engine, weights, dataset, split,
placement, rows). Three placements fill it:

- client: this process reads `SELECT id, img FROM <the split's binary view>` by binary COPY (a thread
  reads the next chunk while the engine works on this one), classifies each chunk through the predictor
  and COPYs the rows into the table.
- postgres: `INSERT INTO t SELECT p.* FROM generate_series(lo, hi, B) g, LATERAL (SELECT array_agg(id),
  array_agg(img) ... WHERE id >= g AND id < g + B) b, LATERAL cnnsql.<E>cnn_batch(b.ids, b.imgs) p`
  inside the server (one statement per span of ids, so progress shows): no image leaves PostgreSQL. The
  functions must be installed with the same weights (`cnnsql db functions install`).
- evadb: `SELECT id, <E>CNN(img) FROM pg.<view>` through cnnsql's EvaDB, its result read batch by batch
  as EvaDB's executor yields it (evadb_session.stream) and COPYed into the table.

Every placement holds at most a few chunks of images (memory does not grow with the split). The table
is built under a private name in one transaction (its primary key, there from the start, takes each id
once), checked (as many rows as the split has images), then renamed and committed: a run that fails
or is killed leaves no table, or with --replace the old one unchanged; other sessions see the new table only once it is complete.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

from cnnsql import db
from cnnsql.core.errors import CnnsqlError, first_line
from cnnsql.core.progress import progress_bar
from cnnsql.data import datasets
from cnnsql.placements.predictor import Predictor, bad_rows_message

PLACEMENTS = ("client", "postgres", "evadb")
COLUMNS = ("id", "label", "class_name", "probability", "probs")
# The primary key from the start: each id once is enforced row by row (ids arrive in ascending order, the
# index's cheap case), and no sort builds an index at the end (ADD PRIMARY KEY after the rows sorted 10^6
# ids in the backend that runs the CNN: its peak anonymous memory 291 -> 327 MB from 10^5 to 10^6 images).
TABLE_SQL = "(id integer PRIMARY KEY, label integer, class_name text, probability real, probs real[])"
NAME_RE = re.compile(r"^(?:([a-z_][a-z0-9_]{0,62})\.)?([a-z_][a-z0-9_]{0,62})$")
SPAN_BATCHES = 64  # postgres: ids per INSERT statement = SPAN_BATCHES x batch (progress between them)
CLIENT_CHUNK = 2048  # client: images per read and per COPY into the table
_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


@dataclass
class Written:
    table: str
    rows: int
    bad: int
    wall_s: float    # from the first image read to the commit
    warmup_s: float  # before it: loading the engine where it runs, one warm-up call
    placement: str
    engine: str
    statement: str

    @property
    def images_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else float("inf")


def parse_table(name: str) -> tuple[str | None, str]:
    """`[schema.]table` in lower-case letters, digits and underscores -> (schema or None, table)."""
    m = NAME_RE.match(name or "")
    if not m:
        raise CnnsqlError(f"--into {name!r} is not a table name cnnsql writes",
                          "use [schema.]table with lower-case letters, digits and underscores (at most 63 each)")
    return m.group(1), m.group(2)


def _ident(schema: str | None, table: str) -> sql.Identifier:
    return sql.Identifier(schema, table) if schema else sql.Identifier(table)


def _exists(cur, schema: str | None, table: str) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (_ident(schema, table).as_string(cur),))
    return bool(cur.fetchone()[0])


def copy_text(rows) -> str:
    """Rows (id, label, class_name, probability, probs) as COPY text (NULL outputs as \\N)."""
    out = []
    for i, label, name, prob, probs in rows:
        if label is None:
            out.append(f"{int(i)}\t\\N\t\\N\t\\N\t\\N\n")
            continue
        vec = ",".join("%.9g" % v for v in probs)
        out.append(f"{int(i)}\t{int(label)}\t{str(name).translate(_ESCAPE)}\t{float(prob):.9g}\t{{{vec}}}\n")
    return "".join(out)


class _Text:
    """A read()-able view of one string for copy_expert, without a second copy of it."""

    def __init__(self, text: str):
        self.data, self.pos = text.encode(), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size is None or size < 0 else self.pos + size
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk

    readline = read


def _copy_in(cur, table: sql.Composable, rows) -> None:
    text = copy_text(rows)
    if text:
        cur.copy_expert(sql.SQL("COPY {} (id, label, class_name, probability, probs) FROM STDIN").format(table)
                        .as_string(cur), _Text(text), size=1 << 20)


def write_back(*, into: str, engine: str, weights: Path, placement: str = "client", dataset: str | None = None,
               split: str = "test", limit: int | None = None, replace: bool = False, threads: int | None = None,
               batch_size: int | None = None, device: str = "cpu", progress: bool = True,
               target: db.Target | None = None) -> Written:
    """Classify a split and write the predictions into table `into` (see the module's text)."""
    if placement not in PLACEMENTS:
        raise CnnsqlError(f"unknown placement {placement!r}", f"choose from: {', '.join(PLACEMENTS)}")
    from cnnsql.models import model_spec
    from cnnsql.models.weights import load_weights

    schema, table = parse_table(into)
    weights = Path(weights).absolute()
    spec = load_weights(weights).spec  # a bad weights file is refused before anything is read or written
    target = target or db.resolve()
    conn = db.connect(target)
    try:
        ds = datasets.info(conn, dataset)
        model_spec.check_fits(spec, ds.shape, ds.num_classes)
        relation = sql.Identifier(*ds.bytes_relation(split))
        where = sql.SQL(" WHERE id < {}").format(sql.Literal(int(limit))) if limit else sql.SQL("")
        with conn.cursor() as cur:
            if schema and not _schema_exists(cur, schema):
                raise CnnsqlError(f"--into {into}: schema {schema} does not exist", f"CREATE SCHEMA {schema} first")
            if _exists(cur, schema, table) and not replace:
                raise CnnsqlError(f"table {into} exists", "choose another name, or pass --replace (the old table "
                                  "is replaced when the new one is complete; a failed run leaves it unchanged)")
            cur.execute(sql.SQL("SELECT count(*), min(id), max(id) FROM {}").format(relation) + where)
            n, lo, hi = cur.fetchone()
        conn.rollback()
        if placement == "postgres":
            _check_functions(conn, engine, weights)
        if n == 0:
            raise CnnsqlError(f"the {split} split of dataset {ds.name} has no images{' below id %d' % limit if limit else ''}",
                              "load data first (cnnsql load)")
        building = _ident(schema, f"cnnsql_build_{secrets.token_hex(6)}")
        with conn.cursor() as cur:  # the transaction that holds everything until the final commit
            cur.execute(sql.SQL("CREATE TABLE {} " + TABLE_SQL).format(building))
        fill = {"client": _fill_client, "postgres": _fill_postgres, "evadb": _fill_evadb}[placement]
        t0 = time.perf_counter()
        with progress_bar(total=n, unit="img", desc=f"{placement} {engine} -> {into}", disable=not progress) as bar:
            statement, bad, warm_s = fill(conn, target, building, ds, split, relation, where, lo, hi, engine=engine,
                                          weights=weights, threads=threads, batch_size=batch_size, device=device,
                                          on_rows=bar.update)
        _finish(conn, building, schema, table, n, replace, {
            "cnnsql": "predictions", "engine": engine, "weights": str(weights), "dataset": ds.name, "split": split,
            "placement": placement, "rows": n, "limit": limit, "statement": statement})
        wall = time.perf_counter() - t0 - warm_s
        return Written(into, n, bad, wall, warm_s, placement, engine, statement)
    except psycopg2.Error as exc:
        raise CnnsqlError(f"writing table {into} failed, nothing was written: {first_line(exc)}",
                          "see the server's message; a --replace'd table is unchanged") from None
    finally:
        if not conn.closed:
            conn.rollback()
            conn.close()


def _schema_exists(cur, schema: str) -> bool:
    cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
    return cur.fetchone() is not None


def _finish(conn, building, schema, table, n: int, replace: bool, comment: dict) -> None:
    """Check the rows (n of them; the primary key has kept each id once), put the table in place, commit."""
    final = _ident(schema, table)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(building))
        (rows,) = cur.fetchone()
        if rows != n:
            raise CnnsqlError(f"the run produced {rows} rows for {n} images: nothing was written",
                              "rerun; if it repeats, report it with the command line")
        if replace:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(final))
        cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(building, sql.Identifier(table)))
        cur.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
            _ident(schema, building.strings[-1] + "_pkey"), sql.Identifier(f"{table[:58]}_pkey")))
        cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(final, sql.Literal(json.dumps(comment))))
    conn.commit()


# --- the three placements ----------------------------------------------------------------------------

def _fill_client(conn, target, building, ds, split, relation, where, lo, hi, *, engine, weights, threads,
                 batch_size, device, on_rows):
    from cnnsql.placements.evadb_patch.transport import copy_rows

    t0 = time.perf_counter()
    predictor = Predictor.load(engine, weights, device=device, threads=threads)
    predictor.warmup()
    warm_s = time.perf_counter() - t0
    batch = batch_size or predictor.batch_size
    chunk = max(batch, CLIENT_CHUNK)  # rows per read and per COPY into the table
    select = sql.SQL("SELECT id, img FROM {}").format(relation) + where + sql.SQL(" ORDER BY id")
    reader = db.connect(target)
    reader.autocommit = True
    bad_total = 0
    try:
        text = select.as_string(reader)
        with conn.cursor() as cur:
            for rows in copy_rows(reader, text, ["int4", "bytea"], itertools.repeat(chunk)):
                dec = predictor.decode([r[1] for r in rows])
                probs = predictor.predict(dec.images, batch) if dec.ok.any() else None
                out, bad = predictor.rows(probs, dec, [r[0] for r in rows])
                bad_total += len(bad)
                _copy_in(cur, building, out)
                on_rows(len(rows))
    finally:
        reader.close()
    return f"COPY ({text}) TO STDOUT -> {engine} in this process -> COPY ... FROM STDIN", bad_total, warm_s


def _check_functions(conn, engine: str, weights: Path) -> None:
    """The engine's batched function is installed here, with these weights (before the transaction)."""
    from cnnsql.placements import pgfunctions

    with conn.cursor() as cur:
        funcs = pgfunctions.installed(conn) if _schema_exists(cur, pgfunctions.SCHEMA) else {}
    conn.rollback()
    have = funcs.get(engine)
    fix = f"cnnsql db functions install --engines {engine} --weights {weights}"
    if have is None:
        raise CnnsqlError(f"cnnsql.{pgfunctions.sql_name(engine)}_batch is not installed in this database", fix)
    if Path(have["weights"]).absolute() != weights:
        raise CnnsqlError(f"cnnsql.{pgfunctions.sql_name(engine)}_batch runs the weights {have['weights']}, "
                          f"not {weights}", fix)


def _fill_postgres(conn, target, building, ds, split, relation, where, lo, hi, *, engine, weights, threads,
                   batch_size, device, on_rows):
    from cnnsql.engines import engine_class
    from cnnsql.placements import pgfunctions

    batch = batch_size or engine_class(engine).default_batch_size
    function = sql.Identifier(pgfunctions.SCHEMA, pgfunctions.sql_name(engine).lower() + "_batch")
    statement = sql.SQL(
        "INSERT INTO {t} (id, label, class_name, probability, probs) "
        "SELECT p.id, p.label, p.class_name, p.probability, p.probs "
        "FROM generate_series(%(lo)s::integer, %(hi)s::integer, %(b)s::integer) AS g(lo) "
        "CROSS JOIN LATERAL (SELECT array_agg(id ORDER BY id) AS ids, array_agg(img ORDER BY id) AS imgs "
        "FROM {rel} WHERE id >= g.lo AND id < g.lo + %(b)s AND id <= %(hi)s HAVING count(*) > 0) b "
        "CROSS JOIN LATERAL {f}(b.ids, b.imgs) p").format(t=building, rel=relation, f=function)
    span = SPAN_BATCHES * batch
    t0 = time.perf_counter()
    with conn.cursor() as cur:  # this backend loads the engine: one image through the one-image function
        cur.execute(sql.SQL("SELECT ({}(%s)).label").format(
            sql.Identifier(pgfunctions.SCHEMA, pgfunctions.sql_name(engine).lower())), (bytes(math.prod(ds.shape)),))
    warm_s = time.perf_counter() - t0
    with conn.cursor() as cur:
        # No JIT for these statements (this transaction only): over a large table their cost estimate passes
        # jit_above_cost, and LLVM's code and heap then stay in the backend that runs the CNN, for a plan whose
        # time is the CNN's. Measured with the backend's RssAnon after 10^5 images of a 10^6-row table: 313 MB
        # with JIT (libLLVM loaded, 15 MB more heap in use), 282 MB without, as over a 10^5-row table.
        cur.execute("SET LOCAL jit = off")
        for start in range(lo, hi + 1, span):
            end = min(start + span - 1, hi)
            cur.execute(statement, {"lo": start, "hi": end, "b": batch})
            on_rows(cur.rowcount)
    return statement.as_string(conn) % {"lo": "<lo>", "hi": "<hi>", "b": batch}, 0, warm_s


def _fill_evadb(conn, target, building, ds, split, relation, where, lo, hi, *, engine, weights, threads,
                batch_size, device, on_rows):
    from cnnsql.placements import evadb_session
    from cnnsql.placements.pgfunctions import sql_name

    t0 = time.perf_counter()
    cursor = evadb_session.connect(target, weights=str(weights), threads=threads)
    function, view = sql_name(engine), ds.view(split)
    evadb_session.run(cursor, f"SELECT id, {function}(img).label FROM pg.{view} WHERE id < {int(lo) + 1};")
    warm_s = time.perf_counter() - t0
    query = f"SELECT id, {function}(img) FROM pg.{view}" + where.as_string(conn) + ";"
    bad_total = 0
    with conn.cursor() as cur:
        for frame in evadb_session.stream(cursor, query):
            cols = list(frame.columns)
            rows = list(zip(*(frame[c].tolist() for c in cols)))
            out = [(i, None, None, None, None) if _missing(rest[0]) else (i, *rest) for i, *rest in rows]
            bad_total += sum(1 for r in out if r[1] is None)
            _copy_in(cur, building, out)
            on_rows(len(out))
    return query, bad_total, warm_s


def _missing(label) -> bool:
    """A bad image's label in EvaDB's output frame: None, pandas' NA or NaN."""
    import pandas as pd

    return label is None or bool(pd.isna(label))
