"""Number formatting shared by the command line tables and the HTML report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WithError:
    """A number and its standard error, shown as ``value +- se`` (``se`` ``None``: the value
    alone; ``nan``: ``value +- nan``, an undefined error) in tables and the report."""

    value: Any
    se: float | None = None


#: The line under a command line table with ``value +- SE`` cells.
STDERR_LINE = ("+- SE: the data-sampling standard error (value +- 2 SE covers the full-population "
               "value about 95% of the time; nan: undefined, see the JSON)")


def format_value(v: Any, none: str = "-", pm: str = " +- ") -> str:
    """Integers as is, floats with 4 significant digits (scientific below 1e-3), ``None`` as
    ``none``, a :class:`WithError` as ``value +- se`` (``pm`` the separator); anything else
    through ``str``."""
    if v is None:
        return none
    if isinstance(v, WithError):
        if v.value is None or v.se is None:
            return format_value(v.value, none)
        return format_value(v.value, none) + pm + format_value(float(v.se), none)
    if isinstance(v, (bool, int)):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numbers (used by every command and the demo)."""
    cells = [[format_value(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [all(isinstance(r[i], (int, float, WithError)) or r[i] is None for r in rows)
               for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])
