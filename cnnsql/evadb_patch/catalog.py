"""EvaDB's catalog, asked once instead of dozens of times per query.

- One catalog manager per thread and catalog, instead of one per `db.catalog()` call: stock
  EvaDB builds a CatalogManager about a dozen times per query, each re-running `create_all` on
  the SQLite catalog. The managers share one SQLAlchemy engine and thread-local session anyway
  (`SQLConfig` is a singleton, the session a `scoped_session`), so the cache keeps EvaDB's thread
  separation and drops the repeated bootstrap.
- Data-source entries and configuration values are cached in that manager and dropped by every
  call that changes them (the catalog is private to the process: see evadb_session).
- Binding a table of a `postgres` source asks PostgreSQL once (its columns, through the handler's
  search-path-aware query) instead of listing every table twice and then reading the columns.
"""
from __future__ import annotations

import threading

from evadb.binder import binder_utils
from evadb.catalog.catalog_manager import CatalogManager
from evadb.database import EvaDBDatabase
from evadb.third_party.databases.interface import get_database_handler

_local = threading.local()
STOCK_BIND_NATIVE = binder_utils.bind_native_table_info
_STOCK = {name: getattr(CatalogManager, name) for name in (
    "get_database_catalog_entry", "insert_database_catalog_entry", "drop_database_catalog_entry",
    "get_configuration_catalog_value", "upsert_configuration_catalog_entry")}


def _catalog(self):
    cache = _local.__dict__.setdefault("managers", {})
    key = (id(self.catalog_func), self.catalog_uri)
    if key not in cache:
        cache[key] = self.catalog_func(self.catalog_uri)
    return cache[key]


def _memo(self) -> dict:
    return self.__dict__.setdefault("_cnnsql_memo", {})


def _get_database(self, database_name):
    memo = _memo(self)
    key = ("database", database_name)
    if key not in memo:
        memo[key] = _STOCK["get_database_catalog_entry"](self, database_name)
    return memo[key]


def _get_configuration(self, key, default=None):
    memo = _memo(self)
    if ("config", key) not in memo:
        memo[("config", key)] = _STOCK["get_configuration_catalog_value"](self, key, None)
    value = memo[("config", key)]
    return default if value is None else value


def _invalidating(name: str):
    def call(self, *args, **kwargs):
        _memo(self).clear()
        return _STOCK[name](self, *args, **kwargs)
    return call


def _bind_native_table_info(catalog, table_info):
    entry = catalog.get_database_catalog_entry(table_info.database_name)
    if entry is None or entry.engine != "postgres":
        return STOCK_BIND_NATIVE(catalog, table_info)  # stock errors and other engines
    with get_database_handler(entry.engine, **entry.params) as handler:
        columns = handler.get_columns(table_info.table_name)
    if columns.error is not None:
        raise binder_utils.BinderError(columns.error)
    if columns.data is None or columns.data.empty:
        raise binder_utils.BinderError(f"Table {table_info.table_name} does not exist in data source "
                                       f"{table_info.database_name}. Create the table using native query.")
    table_info.table_obj = binder_utils.create_table_catalog_entry_for_data_source(
        table_info.table_name, table_info.database_name, columns.data)


def install() -> None:
    EvaDBDatabase.catalog = _catalog
    CatalogManager.get_database_catalog_entry = _get_database
    CatalogManager.get_configuration_catalog_value = _get_configuration
    for name in ("insert_database_catalog_entry", "drop_database_catalog_entry", "upsert_configuration_catalog_entry"):
        setattr(CatalogManager, name, _invalidating(name))
    binder_utils.bind_native_table_info = _bind_native_table_info
