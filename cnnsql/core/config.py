"""Settings from the environment. Nothing here prints or logs credentials."""
from __future__ import annotations

import os
from pathlib import Path

# libpq variables that mean "the user chose a server": then we use libpq's own resolution.
LIBPQ_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE", "PGSERVICEFILE")


# The installed tree: the package, and the project folder that holds it beside sql/ and evadb_udfs/
PACKAGE_DIR = Path(__file__).resolve().parent.parent
PROJECT_DIR = PACKAGE_DIR.parent
SQL_DIR = PACKAGE_DIR / "sql"              # package data: the top-level sql/ a psql user reads (a link)
UDF_DIR = PROJECT_DIR / "evadb_udfs"       # what EvaDB loads its functions from


# CIFAR-10's image shape (channels, height, width): the study's input and the only place the package
# knows it (the dataset's schema, sql/schema.sql, checks its byte size; tests/test_layers.py checks both agree).
CIFAR10_SHAPE = (3, 32, 32)
CIFAR10_IMAGE_BYTES = CIFAR10_SHAPE[0] * CIFAR10_SHAPE[1] * CIFAR10_SHAPE[2]


def state_dir() -> Path:
    """Project state (private cluster, downloads, EvaDB catalog, weights): $CNNSQL_HOME or ./.cnnsql."""
    return Path(os.environ.get("CNNSQL_HOME") or Path.cwd() / ".cnnsql").absolute()


def database_name() -> str:
    """Database created in the private cluster: $CNNSQL_DB or 'cnnsql'."""
    return os.environ.get("CNNSQL_DB") or "cnnsql"


def external_dsn() -> str | None:
    """The user's server: $CNNSQL_DSN, or '' (libpq defaults) when PG* variables are set, else None."""
    dsn = os.environ.get("CNNSQL_DSN")
    if dsn:
        return dsn
    if any(os.environ.get(v) for v in LIBPQ_VARS):
        return ""
    return None


def default_weights() -> Path:
    """The study CNN's weights on CIFAR-10: $CNNSQL_WEIGHTS or <state>/weights/default.npz."""
    return Path(os.environ.get("CNNSQL_WEIGHTS") or default_weights_dir() / "default.npz")


def default_weights_dir() -> Path:
    return state_dir() / "weights"
