"""A PostgreSQL handler for EvaDB that streams, pushes WHERE and LIMIT down, and reuses connections.

Stock `PostgresHandler.select` runs `SELECT * FROM table` through SQLAlchemy with `fetchall`.
This one reads through a server-side cursor in growing chunks (64, 256, then 512 rows), so a
LIMIT 1 query stops after one round trip and memory does not grow with the table, and keeps
its connection for the next handler of the same source in this process (EvaDB opens about six
per query). No password is needed here: libpq reads it from PGPASSFILE/PGPASSWORD at connect time.
EvaDB looks the handler class up on its module at every call, so replacing it takes effect at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import select
import threading

import pandas as pd
import psycopg2
from psycopg2 import sql as psql

from evadb.third_party.databases.postgres import postgres_handler as pg_module
from evadb.third_party.databases.types import DBHandlerResponse, DBHandlerStatus

from cnnsql.placements.evadb_patch.transport import DECODERS, copy_rows, read_ahead

STOCK_HANDLER = pg_module.PostgresHandler
# 512: EvaDB's executor holds several copies of a chunk and its outputs while the function runs (the
# EvaDB client's peak RSS over 150,000 synthetic images written back: 716-726 MB in 3 runs at 2,048
# rows, 553-554 MB in 2 at 512; the pass took as long, 10,000 images 5.2-7.1 s at 512 against 5.4-11.2 s
# at 2,048 in one process, 5 passes each, interleaved, on a noisy machine).
FIRST_CHUNK, MAX_CHUNK = 64, 512
STATS = {"streams": 0, "binary": 0, "copies": 0, "rows": 0, "chunks": 0, "connects": 0, "reused": 0, "queries": []}
BINARY_SCHEMA = "cnnsql_bytes"  # sql/schema.sql
COLUMNS_QUERY = """
    SELECT a.attname,
           CASE WHEN t.typnamespace = 'pg_catalog'::regnamespace THEN format_type(a.atttypid, NULL)
                ELSE 'USER-DEFINED' END,
           t.typname
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = to_regclass(quote_ident(%s)) AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum"""
_columns_memo: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cnnsql_columns", default=None)


@contextlib.contextmanager
def one_statement():
    """Within one statement, a table's columns are asked once (EvaDB's binder asks twice)."""
    token = _columns_memo.set({})
    try:
        yield
    finally:
        _columns_memo.reset(token)


_twins: dict[tuple, psql.Composable | None] = {}
_idle = threading.local()  # per thread: connection key -> idle connections


def _pool() -> dict:
    return _idle.__dict__.setdefault("pool", {})


class StreamingPostgresHandler(STOCK_HANDLER):
    def _key(self) -> tuple:
        return (self.host, str(self.port), self.user, self.database)

    def connect(self) -> DBHandlerStatus:
        idle = _pool().get(self._key()) or []
        while idle:
            conn = idle.pop()
            if _usable(conn):
                self.connection = conn
                STATS["reused"] += 1
                return DBHandlerStatus(status=True)
        STATS["connects"] += 1
        return super().connect()

    def disconnect(self) -> None:
        conn, self.connection = self.connection, None
        if conn is None or conn.closed:
            return
        if conn.status == psycopg2.extensions.STATUS_READY and conn.autocommit:
            _pool().setdefault(self._key(), []).append(conn)
        else:
            conn.close()

    def binary_twin(self, table: str) -> psql.Composable | None:
        """`cnnsql_bytes.<table>_bytes` when it exists: the same rows with the image column as bytea.
        Looked up once per source and table in this process (a twin dropped later fails loudly)."""
        key = (*self._key(), table)
        if key not in _twins:
            name = psql.Identifier(BINARY_SCHEMA, f"{table}_bytes")
            with self.connection.cursor() as cursor:
                cursor.execute("SELECT to_regclass(%s)", (name.as_string(self.connection),))
                _twins[key] = name if cursor.fetchone()[0] else None
        return _twins[key]

    def stream(self, table: str, columns: list[str], where=None, params=(), limit: int | None = None,
               binary: bool = False, whole: bool = False):
        """DataFrames of at most MAX_CHUNK rows of `SELECT columns FROM table [WHERE] [LIMIT]`.

        binary: read the table's binary twin (bytea images arrive as memoryview) when it has one.
        whole: the caller reads every row (no LIMIT left to EvaDB): a binary read then goes by COPY."""
        query, twin = self._select(table, columns, where, limit, binary)
        conn = self.connection
        STATS["streams"] += 1
        with conn.cursor() as cursor:
            text = cursor.mogrify(query, list(params)).decode()
        types = self._copy_types(table, columns) if twin is not None and whole else None
        STATS["queries"] = (STATS["queries"] + [("COPY " if types else "") + text])[-20:]
        if types is not None:
            STATS["copies"] += 1
            for rows in copy_rows(conn, text, types, _chunk_sizes()):
                yield _frame(rows, columns)
            return
        with conn.cursor() as cursor:
            yield from _chunks(conn, cursor, query, list(params), columns)

    def rows(self, table: str, columns: list[str], where=None, params=(), limit: int = 1,
             binary: bool = False) -> list[tuple]:
        """The rows of `SELECT columns FROM table [WHERE] LIMIT limit` as tuples, in one round trip (a
        plain statement, no cursor): for a result known to be small (the plan cache's one-image query)."""
        query, _ = self._select(table, columns, where, int(limit), binary)
        STATS["streams"] += 1
        with self.connection.cursor() as cursor:
            cursor.execute(query, list(params))
            rows = cursor.fetchall()
        STATS["rows"] += len(rows)
        return rows

    def _select(self, table: str, columns: list[str], where, limit: int | None, binary: bool):
        """(`SELECT columns FROM table-or-its-binary-twin [WHERE] [LIMIT]`, the twin or None)."""
        twin = self.binary_twin(table) if binary else None
        STATS["binary"] += twin is not None
        query = psql.SQL("SELECT {} FROM {}").format(psql.SQL(", ").join(map(psql.Identifier, columns)),
                                                     twin or psql.Identifier(table))
        if where is not None:
            query = psql.SQL("{} WHERE {}").format(query, where)
        if limit is not None:
            query = psql.SQL("{} LIMIT {}").format(query, psql.Literal(int(limit)))
        return query, twin

    def _copy_types(self, table: str, columns: list[str]) -> list[str] | None:
        """Type names of `columns` in the binary twin (img is bytea there; the others are the
        view's), or None when one has no exact binary decoder (the cursor path then reads it)."""
        known = self.get_columns(table).data
        if known is None:
            return None
        udt = dict(zip(known["name"], known["udt_name"]))
        types = ["bytea" if c == "img" else udt.get(c) for c in columns]
        return types if all(t in DECODERS for t in types) else None

    def get_columns(self, table_name: str) -> DBHandlerResponse:
        """Stock asks information_schema (about 35 ms of planning per call on the loaded 2-core
        machine, twice per query) by string formatting, in every schema. This asks pg_catalog (under
        1 ms) with a parameter, for the relation `SELECT ... FROM table` reads (the search path), with
        information_schema's type names, once per statement (see statement.py)."""
        if not self.connection:
            return DBHandlerResponse(data=None, error="Not connected to the database.")
        memo = _columns_memo.get()
        key = (*self._key(), table_name)
        if memo is not None and key in memo:
            return DBHandlerResponse(data=memo[key].copy())
        try:
            with self.connection.cursor() as cursor:
                cursor.execute(COLUMNS_QUERY, (table_name,))
                frame = pd.DataFrame(cursor.fetchall(), columns=["name", "dtype", "udt_name"])
        except psycopg2.Error as exc:
            return DBHandlerResponse(data=None, error=str(exc).strip())
        frame["dtype"] = [self._pg_to_python_types(d, u) for d, u in zip(frame["dtype"], frame["udt_name"])]
        if memo is not None:
            memo[key] = frame.copy()
        return DBHandlerResponse(data=frame)

    def select(self, table_name: str) -> DBHandlerResponse:
        """Stock read path (`NativeStorageEngine.read`): the same stream, as row dicts."""
        columns = list(self.get_columns(table_name).data["name"])
        rows = (row for df in self.stream(table_name, columns) for row in df.to_dict("records"))
        return DBHandlerResponse(data=None, data_generator=rows)

    def is_sqlalchmey_compatible(self) -> bool:
        return False  # rows come as dicts already (native_storage_engine.read asks this)


def _chunks(conn, cursor, query: psql.Composable, params: list, columns: list[str]):
    """The rows of `query` through a server-side cursor, sent as `BEGIN; DECLARE; FETCH` in one round
    trip and ended by one `ROLLBACK` (which also closes the cursor): two round trips for a result
    that fits the first chunk, where psycopg2's named cursor takes five (BEGIN, DECLARE, FETCH, CLOSE,
    ROLLBACK). Each one waits for the server's backend to be scheduled, 2-5 ms on the loaded 2-core
    machine. The connection stays in autocommit mode, so the pool's checks hold. After a full first
    chunk, the next ones are fetched one ahead by a thread while the caller works on the current one."""
    try:
        cursor.execute(psql.SQL("BEGIN; DECLARE {} NO SCROLL CURSOR FOR {}; {}").format(
            CURSOR, query, _fetch(FIRST_CHUNK)), params)
        first = _frame(cursor.fetchall(), columns)
        if len(first):
            yield first
        if len(first) == FIRST_CHUNK:
            yield from read_ahead(_more_chunks(cursor, columns))
    finally:
        _end_transaction(conn)


CURSOR = psql.Identifier("cnnsql_stream")


def _fetch(size: int) -> psql.Composable:
    return psql.SQL("FETCH FORWARD {} FROM {}").format(psql.Literal(size), CURSOR)


def _frame(rows: list[tuple], columns: list[str]) -> pd.DataFrame:
    STATS["rows"] += len(rows)
    STATS["chunks"] += 1
    return pd.DataFrame.from_records(rows, columns=columns)


def _chunk_sizes():
    """64, 256, then 512 rows: the first answer comes soon, later chunks amortise the calls."""
    size = FIRST_CHUNK
    while True:
        yield size
        size = min(size * 4, MAX_CHUNK)


def _more_chunks(cursor, columns: list[str]):
    """The cursor's chunks after the first, growing to MAX_CHUNK; a short chunk is the last."""
    sizes = _chunk_sizes()
    next(sizes)
    for size in sizes:
        cursor.execute(_fetch(size))
        rows = cursor.fetchall()
        if rows:
            yield _frame(rows, columns)
        if len(rows) < size:
            return


def _end_transaction(conn) -> None:
    """ROLLBACK (a read-only transaction; also the way out of an aborted one). A connection the
    server has dropped is closed, so the pool never hands it out again."""
    if conn.closed:
        return
    try:
        with conn.cursor() as cursor:
            cursor.execute("ROLLBACK")
    except psycopg2.Error:
        conn.close()


def _usable(conn) -> bool:
    """An idle connection with nothing to read: a server that ended it (restart, terminate) has sent
    EOF or an error, which makes the socket readable. Checked without a round trip."""
    if conn.closed or conn.status != psycopg2.extensions.STATUS_READY:
        return False
    if select.select([conn.fileno()], [], [], 0)[0]:
        conn.close()
        return False
    return True


def close_idle() -> None:
    for conns in _pool().values():
        for conn in conns:
            conn.close()
    _pool().clear()


def install() -> None:
    pg_module.PostgresHandler = StreamingPostgresHandler
