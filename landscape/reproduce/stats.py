"""Statistics behind the verdicts: mean ± std, standard errors, comparisons, combination."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite values."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _se_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of mean(a) - mean(b) (unpaired); 0 with single values."""
    sa = mean_std(a)[1] / math.sqrt(max(len(a), 1))
    sb = mean_std(b)[1] / math.sqrt(max(len(b), 1))
    return math.hypot(sa, sb)


def compare(a: Sequence[float], b: Sequence[float]) -> int:
    """+1 if mean(a) > mean(b) by more than the standard error of the difference (and more
    than 1e-12), -1 if smaller by that much, 0 otherwise."""
    diff = mean_std(a)[0] - mean_std(b)[0]
    margin = max(_se_diff(a, b), 1e-12)
    if not math.isfinite(diff):
        return 0
    return 1 if diff > margin else (-1 if diff < -margin else 0)


def format_pm(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``"mean ± std"`` of the finite ``values`` times ``scale``, ``digits`` decimals (``"n/a"`` if none)."""
    m, s = mean_std(values)
    if not math.isfinite(m):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def verdict_of(ok: bool | None) -> str:
    """``"reproduced"`` / ``"not reproduced"`` for ``True`` / ``False``, ``"inconclusive"`` for ``None``."""
    return "inconclusive" if ok is None else ("reproduced" if ok else "not reproduced")


def combine_verdicts(verdicts: list[str]) -> str:
    """One verdict of several parts: all alike gives that verdict, a mix with a reproduced part
    ``"partly reproduced"``, otherwise ``"inconclusive"`` if any part (or none) is inconclusive."""
    if not verdicts:
        return "inconclusive"
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if all(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    return "partly reproduced" if "reproduced" in verdicts else (
        "not reproduced" if "not reproduced" in verdicts and "inconclusive" not in verdicts
        else "inconclusive")
