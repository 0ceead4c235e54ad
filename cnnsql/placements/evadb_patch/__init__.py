"""What cnnsql changes inside EvaDB 0.3.9 (installed in-process by `evadb_session.connect`).

EvaDB 0.3.9 reads a `postgres` source with `SELECT * FROM table` and `fetchall` (no WHERE or
LIMIT pushdown), opens a connection per catalog or handler call, builds a catalog manager about a
dozen times per query, and gives wrong answers or tracebacks for part of plain SQL (pandas 3 broke
AND/OR, NOT has no parser action, aggregates run per internal batch, GROUP BY keeps only its last
column and HAVING is dropped). Each patch below is narrow and named; `install()` checks first that
this is exactly the EvaDB it was written for (version and the source of every function it
replaces) and otherwise installs nothing and warns once: stock EvaDB stays correct where it is
correct, only slower. Measured effects are in the README ("The SQL path").
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings

EVADB_VERSION = "0.3.9"
# sha256 (first 16 hex digits) of the stock source of everything replaced or relied on.
STOCK_SOURCES = {
    "evadb.models.storage.batch:Batch.all_true": "1869b0f56b81269e",
    "evadb.models.storage.batch:Batch.all_false": "7cc14f601d657e00",
    "evadb.database:EvaDBDatabase.catalog": "3c97aac3966e91e8",
    "evadb.catalog.catalog_manager:CatalogManager.get_database_catalog_entry": "a302224749cc19bf",
    "evadb.catalog.catalog_manager:CatalogManager.insert_database_catalog_entry": "9dc32147bcbbac5d",
    "evadb.catalog.catalog_manager:CatalogManager.drop_database_catalog_entry": "937c4cc80203d3f2",
    "evadb.catalog.catalog_manager:CatalogManager.get_configuration_catalog_value": "3280989add3a7e6b",
    "evadb.catalog.catalog_manager:CatalogManager.upsert_configuration_catalog_entry": "e0503350656e340a",
    "evadb.catalog.catalog_manager:CatalogManager.get_function_catalog_entry_by_name": "b6264eedde2c6f62",
    "evadb.catalog.catalog_manager:CatalogManager.get_function_io_catalog_output_entries": "47f2da62fde11602",
    "evadb.catalog.catalog_manager:CatalogManager.insert_function_catalog_entry": "d8c5d5f95d21f544",
    "evadb.catalog.catalog_manager:CatalogManager.delete_function_catalog_entry_by_name": "509ed1e3dd6494d5",
    "evadb.catalog.catalog_manager:CatalogManager.reset": "6fadfdeb4f011942",
    "evadb.catalog.catalog_manager:CatalogManager.upsert_function_cost_catalog_entry": "e9f1369b25b65929",
    "evadb.binder.statement_binder_context:StatementBinderContext.add_table_alias": "8ce0247ca744e468",
    "evadb.binder.binder_utils:check_data_source_and_table_are_valid": "c0a69c42167867b5",
    "evadb.binder.binder_utils:bind_native_table_info": "6244cd05c015ad80",
    "evadb.third_party.databases.postgres.postgres_handler:PostgresHandler.connect": "139af34c247d54e5",
    "evadb.third_party.databases.postgres.postgres_handler:PostgresHandler.get_columns": "ee9e705543cfec3a",
    "evadb.third_party.databases.types:DBHandler.select": "68bc22b88bfda5b7",
    "evadb.third_party.databases.interface:get_database_handler": "34da2608a87f7b6f",
    "evadb.optimizer.rules.rules:EmbedFilterIntoGet.check": "cfdf4c53afe0a424",
    "evadb.optimizer.rules.rules:LogicalGetToSeqScan.apply": "2e34bcdedc4055ae",
    "evadb.executor.storage_executor:StorageExecutor.exec": "f15d2432035ecbb9",
    "evadb.parser.lark_visitor._table_sources:TableSources.from_clause": "7b73dab41508b2c2",
    "evadb.parser.lark_visitor._functions:Functions.aggregate_windowed_function": "e913f7cb7c6c0195",
    "evadb.expression.logical_expression:LogicalExpression.__str__": "eab6fa88f0e28585",
    "evadb.server.command_handler:execute_statement": "08a8a7ae19573ad2",
    "evadb.catalog.sql_config:SingletonMeta.__call__": "4e2ab1b1bc0b7623",
    "evadb.interfaces.relational.db:EvaDBCursor.query": "347c640ddd723e07",
    "evadb.interfaces.relational.relation:EvaDBQuery.execute": "79a25f18e9abf2d6",
    "evadb.parser.utils:parse_query": "553dbf629db0fc8e",
}
_state = {"installed": False, "checked": None}


# --------------------------------------------------------------------------- the version guard
def _resolve(dotted: str):
    module, _, attr = dotted.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def source_digest(dotted: str) -> str:
    return hashlib.sha256(inspect.getsource(_resolve(dotted)).encode()).hexdigest()[:16]


def mismatches() -> list[str]:
    """What differs from the EvaDB these patches were written for (empty: safe to install)."""
    import evadb

    version = getattr(evadb, "__version__", None) or getattr(getattr(evadb, "version", None), "VERSION", "?")
    if version != EVADB_VERSION:
        return [f"EvaDB {version} (written for {EVADB_VERSION})"]
    out = []
    for dotted, digest in STOCK_SOURCES.items():
        try:
            if source_digest(dotted) != digest:
                out.append(f"{dotted} changed")
        except (ImportError, AttributeError, OSError, TypeError):
            out.append(f"{dotted} missing")
    return out


def install() -> bool:
    """Install every patch once per process; False (and one warning) when EvaDB is not the expected one."""
    if _state["installed"]:
        return True
    if _state["checked"] is None:
        _state["checked"] = mismatches()
    if _state["checked"]:
        warnings.warn(f"cnnsql: EvaDB patches not installed ({'; '.join(_state['checked'][:3])}): queries run on "
                      "stock EvaDB: correct where it is correct, slower, with its own SQL limits",
                      stacklevel=2)
        return False
    from cnnsql.placements.evadb_patch import catalog
    from cnnsql.placements.evadb_patch import handler
    from cnnsql.placements.evadb_patch import plan_cache
    from cnnsql.placements.evadb_patch import pushdown
    from cnnsql.placements.evadb_patch import statement
    from cnnsql.placements.evadb_patch import syntax

    for part in (syntax, catalog, handler, pushdown, statement, plan_cache):
        part.install()
    _state["installed"] = True
    return True


def installed() -> bool:
    return _state["installed"]
