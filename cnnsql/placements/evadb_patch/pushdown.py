"""WHERE, LIMIT and column pruning reach PostgreSQL for tables of a `postgres` data source.

Stock EvaDB 0.3.9 moves a filter into the scan only for video tables (`EmbedFilterIntoGet`) and
its storage executor passes only the table for data sources. Here:
- the rule also fires for `postgres` source tables: each conjunct built of comparisons between a
  numeric column and a number, or a text column and a string (`=`/`<>` only: ordering of text
  depends on the collation), combined with AND/OR/NOT, goes into the scan's WHERE (as a parameter,
  identifiers quoted); the other conjuncts stay in EvaDB's filter above it;
- the statement hook (`execute_statement`) sees the bound statement and hands the scan the
  columns the statement uses and, when nothing but pushed conjuncts filters, no ORDER BY and no
  aggregate sit above it, its LIMIT;
- the storage executor streams through the handler (`handler.py`) with all of that.
Pushed predicates get PostgreSQL's semantics (NULL compares as unknown), which is what psql gives.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

from psycopg2 import sql as psql

from evadb.catalog.catalog_type import ColumnType, TableType
from evadb.expression.abstract_expression import ExpressionType
from evadb.expression.comparison_expression import ComparisonExpression
from evadb.expression.constant_value_expression import ConstantValueExpression
from evadb.expression.expression_utils import conjunction_list_to_expression_tree, to_conjunction_list
from evadb.expression.logical_expression import LogicalExpression
from evadb.expression.tuple_value_expression import TupleValueExpression
from evadb.executor import storage_executor as storage_module
from evadb.models.storage.batch import Batch
from evadb.optimizer.operators import LogicalFilter, LogicalGet
from evadb.optimizer.rules import rules as rules_module
from evadb.third_party.databases import interface

STOCK_CHECK = rules_module.EmbedFilterIntoGet.check
STOCK_APPLY = rules_module.EmbedFilterIntoGet.apply
STOCK_EXEC = storage_module.StorageExecutor.exec

_COMPARE = {ExpressionType.COMPARE_EQUAL: "=", ExpressionType.COMPARE_GREATER: ">",
            ExpressionType.COMPARE_LESSER: "<", ExpressionType.COMPARE_GEQ: ">=",
            ExpressionType.COMPARE_LEQ: "<=", ExpressionType.COMPARE_NEQ: "<>"}
_MIRROR = {"=": "=", ">": "<", "<": ">", ">=": "<=", "<=": ">=", "<>": "<>"}
_LOGICAL = {ExpressionType.LOGICAL_AND: "AND", ExpressionType.LOGICAL_OR: "OR"}
STATS = {"pushed": [], "limits": []}


@dataclass
class ScanHints:
    """What the statement hook learnt about one table's scan (by table name)."""
    columns: list[str] | None = None
    limit: int | None = None
    binary: bool = False  # img is only a CNN function's argument: read it as bytea
    whole: bool = False  # the statement has no LIMIT: every row the scan returns is read


_hints: contextvars.ContextVar[dict] = contextvars.ContextVar("cnnsql_scan_hints", default={})


@contextlib.contextmanager
def scan_hints(hints: dict[str, ScanHints]):
    token = _hints.set(hints)
    try:
        yield
    finally:
        _hints.reset(token)


# --------------------------------------------------------------------------- predicate -> SQL
def _column_type(expr: TupleValueExpression):
    return getattr(getattr(expr, "col_object", None), "type", None)


def _comparison_sql(expr, alias: str | None):
    if not isinstance(expr, ComparisonExpression) or expr.etype not in _COMPARE or len(expr.children) != 2:
        return None
    left, right = expr.children
    op = _COMPARE[expr.etype]
    if isinstance(left, ConstantValueExpression) and isinstance(right, TupleValueExpression):
        left, right, op = right, left, _MIRROR[op]
    if not (isinstance(left, TupleValueExpression) and isinstance(right, ConstantValueExpression)):
        return None
    if alias is not None and left.table_alias != alias:
        return None
    kind, value = _column_type(left), right.value
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = (kind in (ColumnType.INTEGER, ColumnType.FLOAT) and numeric) or \
         (kind == ColumnType.TEXT and isinstance(value, str) and op in ("=", "<>"))
    if not ok:
        return None
    return psql.SQL("{} {} %s").format(psql.Identifier(left.name), psql.SQL(op)), [value]


def predicate_sql(expr, alias: str | None = None):
    """(SQL, params) for a predicate PostgreSQL can evaluate exactly as written, else None."""
    if isinstance(expr, LogicalExpression):
        parts = [predicate_sql(child, alias) for child in expr.children]
        if not parts or any(p is None for p in parts):
            return None
        params = [v for p in parts for v in p[1]]
        if expr.etype == ExpressionType.LOGICAL_NOT and len(parts) == 1:
            return psql.SQL("NOT ({})").format(parts[0][0]), params
        if expr.etype in _LOGICAL and len(parts) == 2:
            joiner = psql.SQL(f") {_LOGICAL[expr.etype]} (")
            return psql.SQL("({})").format(joiner.join(p[0] for p in parts)), params
        return None
    return _comparison_sql(expr, alias)


def split_predicate(predicate, alias: str | None):
    """(conjuncts PostgreSQL evaluates, conjuncts left to EvaDB)."""
    conjuncts = to_conjunction_list(predicate) if predicate is not None else []
    pushed = [c for c in conjuncts if predicate_sql(c, alias) is not None]
    return pushed, [c for c in conjuncts if all(c is not p for p in pushed)]


def where_sql(predicate):
    if predicate is None:
        return None, []
    parts = [predicate_sql(c) for c in to_conjunction_list(predicate)]
    return psql.SQL(" AND ").join(psql.SQL("({})").format(p[0]) for p in parts), [v for p in parts for v in p[1]]


# --------------------------------------------------------------------------- the rule
def _postgres_table(lget, context) -> bool:
    table = lget.table_obj
    if table is None or table.table_type != TableType.NATIVE_DATA:
        return False
    entry = context.db.catalog().get_database_catalog_entry(table.database_name)
    return entry is not None and entry.engine == "postgres"


def _check(self, before, context):
    lget = before.children[0]
    if lget.table_obj is not None and lget.table_obj.table_type == TableType.NATIVE_DATA:
        return (lget.predicate is None and before.predicate is not None and _postgres_table(lget, context)
                and bool(split_predicate(before.predicate, lget.alias.alias_name)[0]))
    return STOCK_CHECK(self, before, context)


def _apply(self, before, context):
    lget = before.children[0]
    if lget.table_obj is None or lget.table_obj.table_type != TableType.NATIVE_DATA:
        yield from STOCK_APPLY(self, before, context)
        return
    pushed, rest = split_predicate(before.predicate, lget.alias.alias_name)
    STATS["pushed"] = (STATS["pushed"] + [(len(pushed), len(rest))])[-20:]
    scan = LogicalGet(lget.video, lget.table_obj, alias=lget.alias,
                      predicate=conjunction_list_to_expression_tree(pushed), target_list=lget.target_list,
                      sampling_rate=lget.sampling_rate, sampling_type=lget.sampling_type,
                      chunk_params=lget.chunk_params, children=lget.children)
    if not rest:  # as EvaDB does for video: a fully pushed filter disappears
        yield scan
        return
    keep = LogicalFilter(conjunction_list_to_expression_tree(rest))
    keep.append_child(scan)
    yield keep


# --------------------------------------------------------------------------- the executor
def stream_frames(entry, table: str, columns: list[str], where, params, limit: int | None, binary: bool,
                  whole: bool):
    """DataFrames of a scan of `table` in the data source `entry` through its handler (handler.stream)."""
    with interface.get_database_handler(entry.engine, **entry.params) as handler:
        with contextlib.closing(handler.stream(table, columns, where, params, limit, binary=binary,
                                               whole=whole)) as chunks:
            yield from chunks


def _scan(entry, table, predicate, hints: ScanHints | None):
    names = [c.name for c in table.columns]
    columns = [c for c in names if hints is None or hints.columns is None or c in hints.columns] or names[:1]
    where, params = where_sql(predicate)
    limit = hints.limit if hints else None
    if limit is not None:
        STATS["limits"] = (STATS["limits"] + [limit])[-20:]
    for frame in stream_frames(entry, table.name, columns, where, params, limit, binary=bool(hints and hints.binary),
                               whole=bool(hints and hints.whole)):
        yield Batch(frame)


def _exec(self, *args, **kwargs):
    table = self.node.table
    if table.table_type == TableType.NATIVE_DATA:
        entry = self.db.catalog().get_database_catalog_entry(table.database_name)
        if entry is not None and entry.engine == "postgres":
            return _scan(entry, table, self.node.predicate, _hints.get().get(table.name))
    return STOCK_EXEC(self, *args, **kwargs)


def install() -> None:
    rules_module.EmbedFilterIntoGet.check = _check
    rules_module.EmbedFilterIntoGet.apply = _apply
    storage_module.StorageExecutor.exec = _exec
