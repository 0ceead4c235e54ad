"""One catalog manager per thread and catalog, instead of one per `db.catalog()` call.

Stock EvaDB builds a CatalogManager about a dozen times per query, each re-running `create_all`
on the SQLite catalog. The managers share one SQLAlchemy engine and thread-local session anyway
(`SQLConfig` is a singleton, the session a `scoped_session`), so a per-thread cache keeps
EvaDB's thread separation and drops the repeated bootstrap.
"""
from __future__ import annotations

import threading

from evadb.database import EvaDBDatabase

_local = threading.local()


def _catalog(self):
    cache = _local.__dict__.setdefault("managers", {})
    key = (id(self.catalog_func), self.catalog_uri)
    if key not in cache:
        cache[key] = self.catalog_func(self.catalog_uri)
    return cache[key]


def install() -> None:
    EvaDBDatabase.catalog = _catalog
