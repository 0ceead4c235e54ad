"""SQL that EvaDB 0.3.9 parses or evaluates wrongly, made right (or refused in one line).

- `AND`/`OR` in a WHERE: `Batch.all_true/all_false` call `Series.bool()`, removed in pandas 3.
- `NOT expr`: the grammar has the rule but the parser has no action for it ("Cannot bind list"),
  and `LogicalExpression.__str__` (used while planning) assumes two operands.
- `GROUP BY a, b` kept only `b`; `HAVING` was dropped silently. Now every item is kept (the
  aggregates module evaluates them) and HAVING is refused.
"""
from __future__ import annotations

from evadb.expression.abstract_expression import ExpressionType
from evadb.expression.logical_expression import LogicalExpression
from evadb.models.storage.batch import Batch
from evadb.parser.lark_visitor import LarkInterpreter
from lark import Tree

from cnnsql.core.errors import CnnsqlError

_STOCK_LOGICAL_STR = LogicalExpression.__str__


def _all_true(self) -> bool:
    return bool(self._frames.all().item())  # one boolean column, as .bool() required


def _all_false(self) -> bool:
    return bool((~self._frames).all().item())


def _not_expression(self, tree):
    operand = [child for child in tree.children if isinstance(child, Tree)][-1]
    return LogicalExpression(ExpressionType.LOGICAL_NOT, self.visit(operand), None)


def _logical_str(self) -> str:
    if len(self.children) == 1:  # stock __str__ assumes two operands and fails on NOT
        return f"NOT ({self.children[0]})"
    return _STOCK_LOGICAL_STR(self)


def _from_clause(self, tree):
    from_table, where_clause, groupby = None, None, []
    for child in tree.children:
        if not isinstance(child, Tree):
            if str(child).upper() == "HAVING":
                raise CnnsqlError("HAVING is not supported by cnnsql's EvaDB",
                                  "filter the grouped rows in psql, or drop the HAVING clause")
            continue
        if child.data == "table_sources":
            from_table = self.visit(child)
        elif child.data == "where_expr":
            where_clause = self.visit(child)
        elif child.data == "group_by_item":
            groupby.append(self.visit(child))
    if len(groupby) == 1 and _is_segment_clause(groupby[0]):
        groupby = groupby[0]  # EvaDB's own video form: GROUP BY '16 frames'
    return {"from": from_table, "where": where_clause, "groupby": groupby or None}


def _is_segment_clause(expr) -> bool:
    return expr.etype == ExpressionType.CONSTANT_VALUE and isinstance(getattr(expr, "value", None), str)


def install() -> None:
    Batch.all_true = _all_true
    Batch.all_false = _all_false
    LarkInterpreter.not_expression = _not_expression
    LarkInterpreter.from_clause = _from_clause
    LogicalExpression.__str__ = _logical_str
