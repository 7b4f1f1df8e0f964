"""Base classes for the toolkit's small result dataclasses: ``to_dict()`` for JSON, a readable
repr and an HTML table in Jupyter; :class:`CostedResult` adds the pass-count fields a metric's
result ends with."""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any

import numpy as np
import torch

__all__ = ["Result", "CostedResult", "COST_FIELDS", "to_jsonable"]

#: The cost fields of a :class:`CostedResult`, in this order: batch-level forward and backward
#: calls, and the samples they covered.
COST_FIELDS = ("forward_passes", "backward_passes", "forward_samples", "backward_samples")


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, numpy scalars, dataclasses and non-finite floats to JSON types.

    Non-finite floats become ``None`` so that ``json.dumps`` output is strict JSON.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return to_jsonable(value.item() if value.dim() == 0 else value.tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


def _short(value: Any, limit: int = 6) -> str:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return f"{value.item():.6g}"
        if value.numel() <= limit:
            return "[" + ", ".join(f"{x:.6g}" for x in value.detach().cpu().reshape(-1).tolist()) + "]"
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, np.ndarray):
        return _short(torch.from_numpy(np.asarray(value, dtype=float)), limit) if value.size else "[]"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and len(value) > limit:
        return f"[{len(value)} items]"
    return repr(value)


class Result:
    """Mixin for frozen dataclasses: ``to_dict()``, a compact ``repr`` and ``_repr_html_``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-serializable) dictionary of every field."""
        return to_jsonable(self)  # type: ignore[return-value]

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={_short(getattr(self, f.name))}" for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{type(self).__name__}({fields})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(f.name)}</th>"
            f"<td style='text-align:left'>{html.escape(_short(getattr(self, f.name)))}</td></tr>"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )
        return f"<table><caption>{type(self).__name__}</caption>{rows}</table>"


class CostedResult(Result):
    """Mixin for a metric's frozen dataclass that records its cost: the ``int`` fields of
    :data:`COST_FIELDS` (``forward_passes``, ``backward_passes``, ``forward_samples``,
    ``backward_samples``), defined once here.

    A subclass lists only its own fields; the cost fields are added to its annotations before
    ``@dataclass`` reads them, right after its fields without a default (required fields cannot
    follow defaulted ones), so ``to_dict()``, ``repr`` and the constructor keep the order
    "own required fields, cost fields, own defaulted fields".
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inherited = any(set(COST_FIELDS) & set(getattr(base, "__dataclass_fields__", {}))
                        for base in cls.__mro__[1:])
        own = dict(cls.__dict__.get("__annotations__", {}))
        if inherited or set(COST_FIELDS) & set(own):
            return
        names = list(own)
        cut = next((i for i, n in enumerate(names) if n in cls.__dict__), len(names))
        merged = {n: own[n] for n in names[:cut]}
        merged.update({n: "int" for n in COST_FIELDS})
        merged.update({n: own[n] for n in names[cut:]})
        cls.__annotations__ = merged
