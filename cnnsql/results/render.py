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
