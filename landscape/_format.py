"""Number formatting shared by the command line tables and the HTML report."""

from __future__ import annotations

import math
from typing import Any


def format_value(v: Any, none: str = "-") -> str:
    """Integers as is, floats with 4 significant digits (scientific below 1e-3), ``None`` as
    ``none``; anything else through ``str``."""
    if v is None:
        return none
    if isinstance(v, (bool, int)):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)
