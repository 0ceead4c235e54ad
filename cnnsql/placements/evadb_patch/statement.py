"""The statement hook: aggregates over whole inputs, and scan hints from the bound statement.

EvaDB 0.3.9 evaluates aggregates per internal batch (`COUNT(*)` over 10,000 rows gave two rows,
6480 and 3520, named `id`) and supports GROUP BY only for video segments. Here an aggregate
statement runs as an inner SELECT of its group keys and aggregate arguments (through the normal
path, so WHERE is pushed down and rows stream), then pandas groups and aggregates the whole
result, with PostgreSQL's names and NULL rules (`count` of no rows is 0, `sum` of none is NULL).
Every other SELECT gets its scan hints from the bound statement: the columns it uses, a LIMIT
PostgreSQL can apply, and whether `img` is only ever the argument of a cnnsql CNN function (then
the scan reads the binary twin of the view: bytes, not base64 text).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd

from evadb.binder.statement_binder import StatementBinder
from evadb.binder.statement_binder_context import StatementBinderContext
from evadb.executor.plan_executor import PlanExecutor
from evadb.expression.abstract_expression import ExpressionType
from evadb.expression.aggregation_expression import AggregationExpression
from evadb.expression.function_expression import FunctionExpression
from evadb.expression.tuple_value_expression import TupleValueExpression
from evadb.models.storage.batch import Batch
from evadb.optimizer.plan_generator import PlanGenerator
from evadb.optimizer.statement_to_opr_converter import StatementToPlanConverter
from evadb.parser.select_statement import SelectStatement
from evadb.parser.types import ParserOrderBySortType
from evadb.parser.utils import SKIP_BINDER_AND_OPTIMIZER_STATEMENTS
from evadb.server import command_handler

from cnnsql.core.errors import CnnsqlError
from cnnsql.core.config import UDF_DIR
from cnnsql.placements.evadb_patch import handler
from cnnsql.placements.evadb_patch.pushdown import ScanHints, scan_hints, split_predicate

STOCK_EXECUTE_STATEMENT = command_handler.execute_statement
_AGGREGATES = {ExpressionType.AGGREGATION_COUNT: "count", ExpressionType.AGGREGATION_SUM: "sum",
               ExpressionType.AGGREGATION_AVG: "avg", ExpressionType.AGGREGATION_MIN: "min",
               ExpressionType.AGGREGATION_MAX: "max"}


def _walk(expr):
    yield expr
    for child in getattr(expr, "children", []) or []:
        yield from _walk(child)


def _expressions(stmt: SelectStatement) -> list:
    exprs = list(stmt.target_list or [])
    exprs += [stmt.where_clause] if stmt.where_clause is not None else []
    exprs += [e for e, _ in (stmt.orderby_list or [])]
    return exprs


# --------------------------------------------------------------------------- scan hints
def statement_hints(stmt) -> dict[str, ScanHints]:
    """Columns used and a pushable LIMIT for a SELECT over one table; {} when unsure."""
    if not isinstance(stmt, SelectStatement) or stmt.union_link is not None or stmt.from_table is None:
        return {}
    ref = stmt.from_table
    if not ref.is_table_atom() or ref.table.table_obj is None:
        return {}
    table = ref.table.table_obj
    alias = ref.alias.alias_name if ref.alias else None
    refs = [e for x in _expressions(stmt) for e in _walk(x)
            if isinstance(e, TupleValueExpression) and e.table_alias in (alias, None)]
    columns = {e.name for e in refs}
    if "*" in columns:
        columns = None
    image_args = {id(arg) for x in _expressions(stmt) for e in _walk(x) if _is_cnn_function(e) for arg in e.children}
    binary = bool(refs) and columns is not None and "img" in columns and \
        all(id(e) in image_args for e in refs if e.name == "img")
    limit = None
    if stmt.limit_count is not None and not stmt.orderby_list and stmt.groupby_clause is None:
        no_aggregate = not any(isinstance(e, AggregationExpression) for x in stmt.target_list for e in _walk(x))
        fully_pushed = stmt.where_clause is None or not split_predicate(stmt.where_clause, alias)[1]
        if no_aggregate and fully_pushed:
            limit = int(stmt.limit_count.value)
    return {table.name: ScanHints(columns=sorted(columns) if columns else None, limit=limit, binary=binary,
                                  whole=stmt.limit_count is None)}


def _is_cnn_function(expr) -> bool:
    """A function implemented in cnnsql's evadb_udfs/: it takes the image as bytes as well as base64."""
    path = getattr(getattr(expr, "function_obj", None), "impl_file_path", None)
    return isinstance(expr, FunctionExpression) and path is not None and Path(path).resolve().parent == UDF_DIR


def execute_statement(evadb, stmt, do_not_raise_exceptions: bool = False, do_not_print_exceptions: bool = False,
                      **kwargs):
    """`command_handler.execute_statement` with the aggregate path and scan hints."""
    with handler.one_statement():
        return _execute(evadb, stmt, do_not_raise_exceptions, do_not_print_exceptions, **kwargs)


def _execute(evadb, stmt, do_not_raise_exceptions, do_not_print_exceptions, **kwargs):
    if isinstance(stmt, SelectStatement) and is_aggregate(stmt):
        return run_aggregate(evadb, stmt, do_not_raise_exceptions, do_not_print_exceptions, **kwargs)
    hints, physical_plan = _bound_plan(evadb, stmt, kwargs)
    with scan_hints(hints):
        output = PlanExecutor(evadb, physical_plan).execute_plan(do_not_raise_exceptions, do_not_print_exceptions)
        if output:
            return Batch.concat(list(output), copy=False)


def _bound_plan(evadb, stmt, kwargs: dict):
    """(scan hints, physical plan) of a statement, as EvaDB's execute_statement builds it."""
    if isinstance(stmt, SKIP_BINDER_AND_OPTIMIZER_STATEMENTS):
        return {}, stmt
    plan_generator = kwargs.get("plan_generator", PlanGenerator(evadb))
    StatementBinder(StatementBinderContext(evadb.catalog)).bind(stmt)
    return statement_hints(stmt), plan_generator.build(StatementToPlanConverter().visit(stmt))


def stream_select(evadb, stmt):
    """The result of a SELECT without aggregates, batch by batch as EvaDB's executor yields them (a
    caller that writes each batch away holds one at a time); errors are raised."""
    if not isinstance(stmt, SelectStatement) or is_aggregate(stmt) or stmt.orderby_list:
        raise CnnsqlError("only a SELECT without aggregates, GROUP BY or ORDER BY streams its result",
                          "run it as a query (cnnsql shell) instead")
    with handler.one_statement():
        hints, physical_plan = _bound_plan(evadb, stmt, {})
        with scan_hints(hints):
            for batch in PlanExecutor(evadb, physical_plan).execute_plan(False, True):
                if batch is not None and len(batch):
                    yield batch


# --------------------------------------------------------------------------- aggregates
def is_aggregate(stmt: SelectStatement) -> bool:
    if isinstance(stmt.groupby_clause, list):
        return True
    return stmt.groupby_clause is None and any(
        isinstance(e, AggregationExpression) for x in stmt.target_list or [] for e in _walk(x))


def _name(expr) -> str:
    alias = getattr(expr, "alias", None)
    if alias is not None and getattr(alias, "alias_name", None):
        return alias.alias_name
    if isinstance(expr, AggregationExpression):
        return _AGGREGATES[expr.etype]
    if isinstance(expr, TupleValueExpression):
        return expr.name
    if isinstance(expr, FunctionExpression):
        return (expr.output or expr.name).lower()
    return "?column?"


def _plan(stmt: SelectStatement):
    """(group keys, aggregates, output spec): each output is ('key', i) or ('agg', j, function)."""
    keys = list(stmt.groupby_clause or [])
    aggs, outputs = [], []
    for expr in stmt.target_list:
        if isinstance(expr, AggregationExpression):
            if expr.etype not in _AGGREGATES or len(expr.children) != 1:
                raise CnnsqlError(f"aggregate {expr.etype.name} is not supported", "use COUNT, SUM, AVG, MIN or MAX")
            aggs.append(expr.children[0])
            outputs.append(("agg", len(aggs) - 1, _AGGREGATES[expr.etype], _name(expr)))
        elif any(isinstance(e, AggregationExpression) for e in _walk(expr)):
            raise CnnsqlError("arithmetic on aggregates is not supported", "select the aggregate itself")
        else:
            match = [i for i, k in enumerate(keys) if k == expr]
            if not match:
                raise CnnsqlError(f"column {_name(expr)!r} must appear in GROUP BY or be used in an aggregate",
                                  "add it to GROUP BY, or wrap it in an aggregate such as MIN()")
            outputs.append(("key", match[0], None, _name(expr)))
    return keys, aggs, outputs


def _inner_frame(evadb, stmt, exprs, *args, **kwargs) -> pd.DataFrame:
    inner = SelectStatement(target_list=list(exprs), from_table=stmt.from_table, where_clause=stmt.where_clause)
    batch = execute_statement(evadb, inner, *args, **kwargs)
    frame = batch.frames if batch is not None else pd.DataFrame()
    if len(frame.columns) != len(exprs) and len(frame) > 0:
        raise CnnsqlError("GROUP BY or an aggregate over a whole function output is not supported",
                          "name one output field, e.g. COUNT(TorchCNN(img).label) or GROUP BY TorchCNN(img).label")
    frame = frame.iloc[:, :len(exprs)] if len(frame.columns) else pd.DataFrame(columns=range(len(exprs)))
    frame.columns = range(len(exprs))
    return frame


def _aggregate(series: pd.Series, function: str):
    if function == "count":
        return int(series.count())
    values = series.dropna()
    if values.empty:
        return None
    return {"sum": values.sum, "avg": values.mean, "min": values.min, "max": values.max}[function]()


def run_aggregate(evadb, stmt, *args, **kwargs) -> Batch:
    stmt = copy.deepcopy(stmt)
    keys, aggs, outputs = _plan(stmt)
    frame = _inner_frame(evadb, stmt, keys + aggs, *args, **kwargs)
    nkeys = len(keys)
    if nkeys:
        groups = [(k if isinstance(k, tuple) else (k,), g) for k, g in
                  frame.groupby(list(range(nkeys)), sort=True, dropna=False)]
    else:
        groups = [((), frame)]
    rows = [[key[i] if kind == "key" else _aggregate(group[nkeys + i], fn) for kind, i, fn, _ in outputs]
            for key, group in groups]
    result = pd.DataFrame(rows, columns=[name for *_, name in outputs])
    result = _order_and_limit(result, stmt, outputs)
    return Batch(result.reset_index(drop=True))


def _order_and_limit(result: pd.DataFrame, stmt, outputs) -> pd.DataFrame:
    if stmt.orderby_list:
        by, ascending = [], []
        for expr, order in stmt.orderby_list:
            matches = [j for j, t in enumerate(stmt.target_list) if t == expr or _name(t) == _name(expr)]
            if not matches:
                raise CnnsqlError(f"ORDER BY {_name(expr)} of an aggregate query must name an output column",
                                  "order by a selected column or aggregate")
            by.append(result.columns[matches[0]])
            ascending.append(order != ParserOrderBySortType.DESC)
        position = pd.RangeIndex(len(result))
        result = result.set_axis(position).sort_values(by=by, ascending=ascending, kind="stable",
                                                        na_position="last")
    if stmt.limit_count is not None:
        result = result.head(int(stmt.limit_count.value))
    return result


def install() -> None:
    from evadb.interfaces.relational import db as relational_db, relation

    for module in (command_handler, relational_db, relation):
        module.execute_statement = execute_statement
