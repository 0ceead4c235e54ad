"""An EvaDB cursor with the PostgreSQL source `pg` and the CNN functions registered.

EvaDB's catalog (SQLite) is private to the process: two shells, a shell and a benchmark, or two
benchmarks never share one (EvaDB 0.3.9 fails on a catalog another process holds), and it is
removed when the process ends. No password ever reaches EvaDB: its catalog would store it in
plain text. libpq reads it at connect time (the private cluster's 0600 pgpass file, or the
password of CNNSQL_DSN in a 0600 pgpass file inside the process's 0700 catalog folder, removed
with it at exit).
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import shutil
import string
import warnings
from pathlib import Path

from cnnsql.core import config
from cnnsql import db
from cnnsql.placements import evadb_patch
from cnnsql.core.errors import CnnsqlError, first_line

UDF_DIR = config.UDF_DIR
_SAFE_VALUE = re.compile(r"^[^\"'\\\n;]*$")
DEFAULT_ENGINE = "torch"  # what Classify(img) runs unless CNNSQL_ENGINE names another


def evadb_params(target: db.Target, private_dir: Path) -> dict[str, str]:
    """Connection parameters for EvaDB's postgres source, without a password (libpq supplies it)."""
    if target.private:
        cluster = db.private_cluster()
        os.environ["PGPASSFILE"] = str(cluster.pgpass)  # libpq reads the password from there
        p = cluster.tcp_conninfo(config.database_name())
        return {"user": p["user"], "host": p["host"], "port": p["port"], "database": p["dbname"]}
    p = target.params()
    host = p.get("host") or os.environ.get("PGHOST") or "127.0.0.1"
    if host.startswith("/"):
        raise CnnsqlError("EvaDB's PostgreSQL source needs a TCP host, but the configured host is a Unix socket",
                          "give CNNSQL_DSN a host name and port, e.g. postgresql://user@127.0.0.1:5432/db")
    params = {"user": p.get("user") or os.environ.get("PGUSER") or os.environ.get("USER", ""),
              "host": host, "port": p.get("port") or os.environ.get("PGPORT") or "5432",
              "database": p.get("dbname") or os.environ.get("PGDATABASE") or ""}
    password = p.get("password") or os.environ.get("PGPASSWORD")  # EvaDB passes an explicit empty password,
    if password:                                                    # so libpq would not read PGPASSWORD itself
        os.environ["PGPASSFILE"] = str(_pgpass_file(private_dir, params, password))
    return params


def _pgpass_file(private_dir: Path, params: dict, password: str) -> Path:
    """The DSN's (or PGPASSWORD's) password as a libpq pgpass entry in this process's 0700 folder (file 0600, removed
    at exit with the folder). EvaDB connects with an empty password, which makes libpq read it."""
    def field(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    path = private_dir / "pgpass"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(":".join(field(params[k]) for k in ("host", "port", "database", "user")) + ":" + field(password) + "\n")
    return path


def function_options(weights: str | None = None, threads: int | None = None, engine: str | None = None) -> dict:
    """What the CNN functions get through CREATE FUNCTION metadata (EvaDB passes it to setup())."""
    from cnnsql.placements.evadb_function import default_weights

    return {"weights": str(weights or default_weights()), "threads": str(int(threads or 0)),
            "engine": engine or os.environ.get("CNNSQL_ENGINE") or DEFAULT_ENGINE}


def setup_statements(params: dict[str, str], options: dict[str, str] | None = None) -> list[str]:
    options = options or function_options()
    for key, value in {**params, **options}.items():
        if not _SAFE_VALUE.match(value):
            raise CnnsqlError(f"the {key} contains a quote, backslash, ';' or newline, which EvaDB's "
                              "CREATE statements cannot carry safely", f"use a {key} without such characters")
    text = "\n".join(line for line in db.sql_file("evadb_setup.sql").splitlines() if not line.startswith("--"))
    body = string.Template(text).substitute(params, **options, udf_dir=str(UDF_DIR))
    return [s.strip() + ";" for s in body.split(";\n") if s.strip().rstrip(";")]


def quiet() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"evadb\..*")
    warnings.filterwarnings("ignore", message=".*pandas only supports SQLAlchemy.*")
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    # EvaDB logs every failed statement itself; we report it once, as a CnnsqlError.
    logging.getLogger("evadb.utils.logging_manager").setLevel(logging.CRITICAL)
    logging.getLogger("ray").setLevel(logging.ERROR)


def private_catalog_dir() -> Path:
    """A catalog folder for this process only (mode 0700), removed at exit; stale ones are swept."""
    root = config.state_dir() / "evadb-sessions"
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for old in root.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    atexit.register(shutil.rmtree, path, True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def connect(target: db.Target | None = None, evadb_dir: Path | None = None, *, weights=None, threads=None,
            engine: str | None = None, plan_cache: bool = True):
    """An EvaDB cursor over a catalog in `evadb_dir` (default: one private to this process). plan_cache:
    repeated simple SELECTs skip EvaDB's planning (evadb_patch/plan_cache.py)."""
    quiet()
    import evadb

    evadb_patch.install()
    target = target or db.resolve()
    if evadb_dir is None:
        evadb_dir = private_catalog_dir()
    evadb_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(evadb_dir, 0o700)
    params = evadb_params(target, evadb_dir)
    cursor = evadb.connect(str(evadb_dir)).cursor()
    cursor._evadb._cnnsql_plan_cache_off = not plan_cache
    quiet()  # EvaDB sets its log level when it starts
    _no_fsync_catalog(cursor)
    for statement in setup_statements(params, function_options(weights, threads, engine)):
        run(cursor, statement)
    return cursor


def _no_fsync_catalog(cursor) -> None:
    """The catalog is private to the process and removed at exit: no fsync on its commits.

    EvaDB commits function-cost statistics to it after every query; with SQLite's default
    journal that cost one fsync, about 15 ms per query on the development machine."""
    from sqlalchemy import event

    engine = cursor._evadb.catalog()._sql_config.engine
    if engine.url.get_backend_name() == "sqlite" and not getattr(engine, "_cnnsql_no_fsync", False):
        event.listen(engine, "connect", lambda con, _: (con.execute("pragma synchronous=OFF"),
                                                        con.execute("pragma journal_mode=MEMORY")))
        engine.dispose()  # pooled connections reopen with the pragmas
        engine._cnnsql_no_fsync = True


def run(cursor, statement: str):
    """Execute one EvaDB statement; EvaDB's errors become one readable line."""
    try:
        return cursor.query(statement).df()
    except CnnsqlError:
        raise
    except Exception as exc:  # EvaDB raises bare Exceptions with long messages
        raise _failed("EvaDB query failed", exc, statement) from exc


def _failed(what: str, exc: BaseException, statement: str) -> CnnsqlError:
    """EvaDB's error (a bare Exception with a long message) as one line naming the statement."""
    return CnnsqlError(f"{what}: {first_line(exc)[:400]}", f"statement: {statement[:120]}")


def stream(cursor, statement: str):
    """DataFrames of one EvaDB SELECT (no aggregates, GROUP BY or ORDER BY), batch by batch as EvaDB
    computes them, for results too large to hold at once (`cnnsql predict --into`)."""
    from evadb.parser.parser import Parser

    from cnnsql.placements.evadb_patch.statement import stream_select

    try:
        statements = Parser().parse(statement)
    except Exception as exc:  # EvaDB's parser raises bare Exceptions
        raise _failed("EvaDB could not parse the statement", exc, statement) from exc
    if len(statements) != 1:
        raise CnnsqlError(f"one statement streams at a time, not {len(statements)}", f"statement: {statement[:120]}")
    try:
        for batch in stream_select(cursor._evadb, statements[0]):
            yield batch.frames
    except CnnsqlError:
        raise
    except Exception as exc:
        raise _failed("EvaDB query failed", exc, statement) from exc
