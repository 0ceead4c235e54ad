"""Connections: the user's server ($CNNSQL_DSN or libpq's PG* variables) or the private cluster."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from urllib.parse import quote

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from cnnsql.core import config
from cnnsql.core.errors import CnnsqlError
from cnnsql.db.pgcluster import PrivateCluster

SECRET_KEYS = ("password", "sslpassword")


@dataclass
class Target:
    """Where to connect. `dsn` may hold a password: never print it, print `display()`."""

    dsn: str
    private: bool

    def params(self) -> dict:
        return parse_dsn(self.dsn) if self.dsn else {}

    def display(self) -> str:
        shown = {k: v for k, v in self.params().items() if k not in SECRET_KEYS}
        if not shown:
            return "libpq defaults (PG* variables)"
        return " ".join(f"{k}={v}" for k, v in shown.items())

    def url(self) -> str:
        """A postgresql:// URL that psql accepts (without any password: use .pgpass/PGPASSWORD)."""
        p = {k: v for k, v in self.params().items() if k not in SECRET_KEYS}
        user = quote(p.pop("user", ""), safe="")
        dbname = quote(p.pop("dbname", ""), safe="")
        host = p.pop("host", "")
        netloc = f"{user}@" if user else ""
        query = []
        if host.startswith("/"):
            query.append(f"host={quote(host, safe='/')}")
        else:
            netloc += host
        if "port" in p:
            query.append(f"port={quote(p.pop('port'), safe='')}")
        query += [f"{k}={quote(v, safe='')}" for k, v in p.items()]
        return f"postgresql://{netloc}/{dbname}" + ("?" + "&".join(query) if query else "")


def private_cluster() -> PrivateCluster:
    return PrivateCluster(config.state_dir())


def resolve(autostart: bool = True) -> Target:
    """The external server if configured, else the private cluster (started on demand)."""
    dsn = config.external_dsn()
    if dsn is not None:
        try:
            parse_dsn(dsn) if dsn else None
        except psycopg2.ProgrammingError:
            raise CnnsqlError("CNNSQL_DSN is not a valid libpq connection string or URL",
                              "e.g. postgresql://user@host:5432/dbname") from None
        return Target(dsn, private=False)
    cluster = private_cluster()
    if autostart:
        cluster.start()
    dbname = config.database_name()
    target = Target(make_dsn(**cluster.conninfo(dbname)), private=True)
    if autostart:
        _ensure_database(cluster, dbname)
    return target


def _ensure_database(cluster: PrivateCluster, dbname: str) -> None:
    conn = psycopg2.connect(**cluster.conninfo("postgres"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    finally:
        conn.close()


def connect(target: Target | None = None, **kwargs):
    """psycopg2 connection with one readable error when the server cannot be reached."""
    target = target or resolve()
    try:
        return psycopg2.connect(target.dsn, connect_timeout=10, application_name="cnnsql", **kwargs)
    except psycopg2.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
        for secret in (target.params().get(k) for k in SECRET_KEYS):
            if secret:
                first = first.replace(secret, "***")
        hint = ("check CNNSQL_DSN / PG* variables, that the server runs, and the password (.pgpass or PGPASSWORD)"
                if not target.private else "run `cnnsql db start`; see .cnnsql/pg/postgres.log")
        raise CnnsqlError(f"cannot connect to PostgreSQL ({target.display()}): {first}", hint) from None


@contextlib.contextmanager
def connection(target: Target | None = None):
    conn = connect(target)
    try:
        yield conn
    finally:
        conn.close()


SQL_DIR = config.SQL_DIR


def private_server_pid(conn) -> int | None:
    """The postmaster of a server on this machine (the parent of this connection's backend), or None
    (a server elsewhere: the backend's pid then names no postgres process here)."""
    import psutil

    try:
        backend = psutil.Process(conn.get_backend_pid())
        parent = backend.parent()
        if parent is None or not all("postgres" in (p.name() + " ".join(p.cmdline()[:1])) for p in (backend, parent)):
            return None
        return parent.pid
    except psutil.Error:
        return None


def sql_file(name: str) -> str:
    return (SQL_DIR / name).read_text()


def ensure_schema(conn) -> None:
    """Create the data and results tables if missing (idempotent)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('cnnsql.schema'))")
        # A schema of ours that another role made first would own the views cnnsql reads: refuse it
        cur.execute("SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'cnnsql_bytes' "
                    "AND nspowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)")
        other = cur.fetchone()
        if other:
            conn.rollback()
            raise CnnsqlError(f"schema {other[0]!r} belongs to role {other[1]!r}, not to {conn.info.user!r}: its "
                              "views would be read as this role", f"drop or reassign schema {other[0]} as the "
                              "server's administrator, or use another database (CNNSQL_DB)")
        for name in ("schema.sql", "results.sql", "datasets.sql"):
            cur.execute(sql_file(name))
    conn.commit()


def require_tables(conn, *tables: str, creator: str) -> None:
    """Fail clearly when tables are missing, naming the command that creates them."""
    with conn.cursor() as cur:
        missing = []
        for t in tables:
            cur.execute("SELECT to_regclass(%s)", (sql.Identifier(t).as_string(conn),))
            if cur.fetchone()[0] is None:
                missing.append(t)
    conn.rollback()
    if missing:
        raise CnnsqlError(f"table(s) {', '.join(missing)} missing in the database", f"run `{creator}` first")
