"""The one formatter of results for every view of them: the terminal table of `cnnsql bench`, the
report's HTML tables and the generated README/docs tables. A figure with its range always reads
`median [min-max]`; a missing figure is `-`."""
from __future__ import annotations

import math


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, digits: int = 2, sep: bool = True) -> str:
    """A cell: numbers with fixed digits (thousands separators unless sep=False), whole numbers
    without '.0' when digits is 0, yes/no for booleans, '-' for None/NaN."""
    if _missing(value):
        return "-"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "yes" if value else "no"
    comma = "," if sep else ""
    if isinstance(value, int) or type(value).__name__.startswith(("int", "uint")):
        return f"{int(value):{comma}}"
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        value = float(value)
        if digits == 0 and value.is_integer():
            return f"{int(value):{comma}}"
        return f"{value:{comma}.{digits}f}"
    return str(value)


def rng(mid, lo, hi, digits: int, sep: bool = True) -> str:
    """`median [min-max]`, or '-' without a median."""
    if _missing(mid):
        return "-"
    return f"{fmt(mid, digits, sep)} [{fmt(lo, digits, sep)}-{fmt(hi, digits, sep)}]"


def auto(value) -> str:
    """A cell whose digits follow its size: whole numbers from 100 up, 2 decimals below, 3 significant
    digits under 0.1; lists as `a-b` ranges."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"{auto(value[0])}-{auto(value[1])}"
    if isinstance(value, float) and not _missing(value):
        a = abs(value)
        if a >= 100:
            return fmt(value, 0)
        if a >= 0.1 or a == 0:
            return fmt(value, 2)
        return f"{value:.3g}"
    return fmt(value)


def text_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table for the terminal (`cnnsql study`): columns padded, numbers right-aligned."""
    cells = [[str(h) for h in header]] + [[auto(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if numeric[i] and n else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
