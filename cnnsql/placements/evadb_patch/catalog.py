"""EvaDB's catalog, asked once instead of dozens of times per query.

- One catalog manager per thread and catalog, instead of one per `db.catalog()` call: stock
  EvaDB builds a CatalogManager about a dozen times per query, each re-running `create_all` on
  the SQLite catalog. The managers share one SQLAlchemy engine and thread-local session anyway
  (`SQLConfig` is a singleton, the session a `scoped_session`), so the cache keeps EvaDB's thread
  separation and drops the repeated bootstrap. The cache never outlives the catalog it caches: the
  SQLite file is held open, and once it has been removed (an EvaDB folder deleted and made again
  at the same path) the cached managers and the singleton's engine are dropped, for cached and
  stock callers alike (`SQLConfig`'s constructor is checked too), and a fresh catalog is built.
- Data-source and function entries, function outputs and configuration values are cached in that
  manager and dropped by every call that can change them (the catalog is private to the process:
  see evadb_session). The function lookup alone cost 13 ms of CPU per query under load.
- A function's measured cost (EvaDB writes it to the SQLite catalog after every query that calls
  it, an upsert and commit: 8 ms of a one-image query's CPU under load) is written the first time
  and then at most every COST_WRITE_SECONDS per function; the optimizer reads it only to order
  predicates, so a cost up to that old changes no answer.
- Binding a table of a `postgres` source asks PostgreSQL for its columns once per statement
  (handler.py) instead of listing every table twice and then reading the columns.
"""
from __future__ import annotations

import os
import threading
import time

from evadb.binder import binder_utils
from evadb.binder import statement_binder_context as binder_context
from evadb.catalog import sql_config
from evadb.catalog.catalog_manager import CatalogManager
from evadb.database import EvaDBDatabase
from evadb.third_party.databases.interface import get_database_handler

_local = threading.local()
STOCK_BIND_NATIVE = binder_utils.bind_native_table_info
MEMOIZED = ("get_database_catalog_entry", "get_function_catalog_entry_by_name")
# Every call that can change a memoized answer (data sources, functions and their outputs, settings).
INVALIDATING = ("reset", "insert_database_catalog_entry", "drop_database_catalog_entry",
                "insert_function_catalog_entry", "delete_function_catalog_entry_by_name",
                "upsert_configuration_catalog_entry")
_STOCK = {name: getattr(CatalogManager, name) for name in (
    *MEMOIZED, *INVALIDATING, "get_configuration_catalog_value", "get_function_io_catalog_output_entries",
    "upsert_function_cost_catalog_entry")}
COST_WRITE_SECONDS = 30.0
STOCK_CHECK_SOURCE = binder_context.check_data_source_and_table_are_valid


STOCK_SINGLETON_CALL = sql_config.SingletonMeta.__call__
_files: dict[str, int] = {}        # catalog URI -> descriptor of its SQLite file, opened once it exists
_generation: dict[str, int] = {}   # catalog URI -> how many times its file was found removed
_files_lock = threading.Lock()


def _sqlite_path(uri: str) -> str | None:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def _hold(uri: str) -> None:
    """Keep the catalog's SQLite file open, to notice when it is removed (its link count drops to 0)."""
    path = _sqlite_path(uri)
    if path is None or uri in _files:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    with _files_lock:
        if uri in _files:
            os.close(fd)
        else:
            _files[uri] = fd


def _drop_if_removed(uri: str) -> None:
    """When the catalog file we hold was removed, forget everything bound to it: the held file, the
    SQLConfig singleton (its engine's connections write to the removed file) and, through the
    generation, every thread's cached managers."""
    fd = _files.get(uri)
    if fd is None:
        return
    try:
        removed = os.fstat(fd).st_nlink == 0
    except OSError:
        removed = True
    if not removed:
        return
    with _files_lock:
        if _files.get(uri) != fd:
            return
        del _files[uri]
        os.close(fd)
        _generation[uri] = _generation.get(uri, 0) + 1
        stale = sql_config.SingletonMeta._instances.pop((sql_config.SQLConfig, uri), None)
    if stale is not None:
        stale.engine.dispose()


def _singleton_call(cls, uri):
    """SQLConfig(uri) as stock, except that a config bound to a removed catalog file is not handed out."""
    if cls is sql_config.SQLConfig:
        _drop_if_removed(str(uri))
    return STOCK_SINGLETON_CALL(cls, uri)


def _catalog(self):
    uri = self.catalog_uri
    _drop_if_removed(uri)
    cache = _local.__dict__.setdefault("managers", {})
    key = (id(self.catalog_func), uri, _generation.get(uri, 0))
    manager = cache.get(key)
    if manager is None:
        for old in [k for k in cache if k[1] == uri]:  # an earlier generation of this catalog
            del cache[old]
        manager = cache[key] = self.catalog_func(uri)
        _hold(uri)
    return manager


def _memo(self) -> dict:
    return self.__dict__.setdefault("_cnnsql_memo", {})


def _memoized(name: str):
    def call(self, key):
        memo = _memo(self)
        if (name, key) not in memo:
            memo[(name, key)] = _STOCK[name](self, key)
        return memo[(name, key)]
    return call


def _get_function_outputs(self, function_obj):
    memo = _memo(self)
    key = ("outputs", function_obj.row_id)  # only what stock reads of the entry
    if key not in memo:
        memo[key] = _STOCK["get_function_io_catalog_output_entries"](self, function_obj)
    return list(memo[key])


def _get_configuration(self, key, default=None):
    memo = _memo(self)
    if ("config", key) not in memo:
        memo[("config", key)] = _STOCK["get_configuration_catalog_value"](self, key, None)
    value = memo[("config", key)]
    return default if value is None else value


def _upsert_function_cost(self, function_id, name, cost):
    written = _memo(self).setdefault(("cost_written",), {})  # cleared with the memo
    now = time.monotonic()
    if now - written.get(function_id, -COST_WRITE_SECONDS) >= COST_WRITE_SECONDS:
        written[function_id] = now
        _STOCK["upsert_function_cost_catalog_entry"](self, function_id, name, cost)


ON_CHANGE: list = []  # called after every catalog change (plan_cache.clear_all)


def _invalidating(name: str):
    def call(self, *args, **kwargs):
        _memo(self).clear()
        try:
            return _STOCK[name](self, *args, **kwargs)
        finally:
            for hook in ON_CHANGE:
                hook()
    return call


def _columns(catalog, database_name: str, table_name: str):
    """The table's columns from its postgres source (memoized per statement by the handler), or None
    when the source is not postgres."""
    entry = catalog.get_database_catalog_entry(database_name)
    if entry is None or entry.engine != "postgres":
        return None
    with get_database_handler(entry.engine, **entry.params) as handler:
        columns = handler.get_columns(table_name)
    if columns.error is not None:
        raise binder_utils.BinderError(columns.error)
    return columns.data


def _check_source_and_table(catalog, database_name: str, table_name: str):
    """Stock lists every table of the source (information_schema) to find one; this asks for its columns."""
    columns = _columns(catalog, database_name, table_name)
    if columns is None:
        return STOCK_CHECK_SOURCE(catalog, database_name, table_name)
    if columns.empty:
        raise binder_utils.BinderError(f"Table {table_name} does not exist in data source {database_name}. "
                                       "Create the table using native query.")


def _bind_native_table_info(catalog, table_info):
    columns = _columns(catalog, table_info.database_name, table_info.table_name)
    if columns is None:
        return STOCK_BIND_NATIVE(catalog, table_info)  # stock errors and other engines
    _check_source_and_table(catalog, table_info.database_name, table_info.table_name)
    table_info.table_obj = binder_utils.create_table_catalog_entry_for_data_source(
        table_info.table_name, table_info.database_name, columns)


def install() -> None:
    EvaDBDatabase.catalog = _catalog
    sql_config.SingletonMeta.__call__ = _singleton_call
    for name in MEMOIZED:
        setattr(CatalogManager, name, _memoized(name))
    CatalogManager.get_configuration_catalog_value = _get_configuration
    CatalogManager.get_function_io_catalog_output_entries = _get_function_outputs
    CatalogManager.upsert_function_cost_catalog_entry = _upsert_function_cost
    for name in INVALIDATING:
        setattr(CatalogManager, name, _invalidating(name))
    binder_utils.bind_native_table_info = _bind_native_table_info
    binder_context.check_data_source_and_table_are_valid = _check_source_and_table
