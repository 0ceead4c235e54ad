"""An EvaDB cursor with the PostgreSQL source `pg` and the CNN functions registered."""
from __future__ import annotations

import logging
import os
import re
import string
import warnings
from pathlib import Path

from . import config, db, evadb_patch
from .errors import CnnsqlError

UDF_DIR = Path(__file__).resolve().parent.parent / "evadb_udfs"
_SAFE_VALUE = re.compile(r"^[^\"'\\\n;]*$")


def evadb_params(target: db.Target) -> dict[str, str]:
    """Connection parameters for EvaDB's postgres engine, which needs host:port (a SQLAlchemy URI)."""
    if target.private:
        cluster = db.private_cluster()
        os.environ["PGPASSFILE"] = str(cluster.pgpass)  # libpq reads the password from there
        p = cluster.tcp_conninfo(config.database_name())
        return {"user": p["user"], "password": "", "host": p["host"], "port": p["port"], "database": p["dbname"]}
    p = target.params()
    host = p.get("host") or os.environ.get("PGHOST") or "127.0.0.1"
    if host.startswith("/"):
        raise CnnsqlError("EvaDB's PostgreSQL source needs a TCP host, but the configured host is a Unix socket",
                          "give CNNSQL_DSN a host name and port, e.g. postgresql://user@127.0.0.1:5432/db")
    return {"user": p.get("user") or os.environ.get("PGUSER") or os.environ.get("USER", ""),
            "password": p.get("password") or os.environ.get("PGPASSWORD", ""),
            "host": host, "port": p.get("port") or os.environ.get("PGPORT") or "5432",
            "database": p.get("dbname") or os.environ.get("PGDATABASE") or ""}


def setup_statements(params: dict[str, str]) -> list[str]:
    for key, value in params.items():
        if not _SAFE_VALUE.match(value):
            raise CnnsqlError(f"the database {key} contains a quote, backslash, ';' or newline, which EvaDB's "
                              "CREATE DATABASE cannot carry safely", f"use a {key} without such characters for EvaDB")
    text = "\n".join(line for line in db.sql_file("evadb_setup.sql").splitlines() if not line.startswith("--"))
    body = string.Template(text).substitute(params, udf_dir=str(UDF_DIR))
    return [s.strip() + ";" for s in body.split(";\n") if s.strip().rstrip(";")]


def quiet() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"evadb\..*")
    warnings.filterwarnings("ignore", message=".*pandas only supports SQLAlchemy.*")
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    # EvaDB logs every failed statement itself; we report it once, as a CnnsqlError.
    logging.getLogger("evadb.utils.logging_manager").setLevel(logging.CRITICAL)
    logging.getLogger("ray").setLevel(logging.ERROR)


def connect(target: db.Target | None = None, evadb_dir: Path | None = None):
    """Return an EvaDB cursor over a catalog in `evadb_dir` (default: state dir/evadb), mode 0700."""
    quiet()
    import evadb

    evadb_patch.install()
    target = target or db.resolve()
    params = evadb_params(target)
    evadb_dir = evadb_dir or config.state_dir() / "evadb"
    evadb_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(evadb_dir, 0o700)
    cursor = evadb.connect(str(evadb_dir)).cursor()
    quiet()  # EvaDB sets its log level when it starts
    for statement in setup_statements(params):
        run(cursor, statement)
    return cursor


def run(cursor, statement: str):
    """Execute one EvaDB statement; EvaDB's errors become one readable line."""
    try:
        return cursor.query(statement).df()
    except Exception as exc:  # EvaDB raises bare Exceptions with long messages
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CnnsqlError(f"EvaDB query failed: {first[:400]}", f"statement: {statement[:120]}") from exc
