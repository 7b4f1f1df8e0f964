"""What ``--model``, ``--data`` and ``--loss`` name: ``module:attr`` or ``path/to/file.py:attr``
specs, imported and turned into a model, a :class:`analysis.data.DataSource` and a loss."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from ._common import CLIError, UsageError
from ._common import first_line as _first_line

__all__ = ["resolve_loss"]


def load_object(spec: str, what: str = "object") -> Any:
    """Import ``module:attr`` or ``path/to/file.py:attr`` (``attr`` may be dotted).

    Raises:
        UsageError: the spec has no ``:`` or an empty part.
        CLIError: the module or file does not import, or has no such attribute.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise UsageError(
            f"--{what} {spec!r} must look like 'module:function' or 'path/to/file.py:function'"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"--{what} {spec!r}: both the module and the function name are needed")
    try:
        if target.endswith(".py") or os.sep in target or "/" in target:
            path = pathlib.Path(target)
            if not path.is_file():
                raise CLIError(f"--{what} {spec!r}: file {target} not found")
            name = f"_landscape_spec_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                sys.path.insert(0, str(path.resolve().parent))
                mod_spec = importlib.util.spec_from_file_location(name, path)
                if mod_spec is None or mod_spec.loader is None:
                    raise CLIError(f"--{what} {spec!r}: cannot import {target}")
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module
                try:
                    mod_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(f"--{what} {spec!r}: importing {target} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--{what} {spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str) -> Any:
    """Build the model named by ``spec`` (a callable returning an ``nn.Module``, or a module)."""
    from torch import nn

    obj = load_object(spec, "model")
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise CLIError(f"--model {spec!r} is a {type(obj).__name__}, not a callable or an nn.Module")
        try:
            obj = obj()
        except Exception as exc:
            raise CLIError(f"--model {spec!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(obj, nn.Module):
        raise CLIError(f"--model {spec!r} returned a {type(obj).__name__}, expected a torch.nn.Module")
    return obj


def load_data(spec: str, *, batch_size: int | None = None, max_samples: int | None = None,
              shard: bool = False) -> Any:
    """The data named by ``spec`` as a :class:`analysis.data.DataSource`."""
    from torch.utils.data import DataLoader

    from analysis.data import as_data

    obj = load_object(spec, "data")
    if callable(obj) and not isinstance(obj, (DataLoader, tuple, list)):
        try:
            obj = obj()
        except Exception as exc:
            raise CLIError(f"--data {spec!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        source = as_data(obj, batch_size=batch_size, max_samples=max_samples, shard=shard)
        if shard:
            from analysis.data import batch_size_of
            from analysis.distributed import get_world_size

            world = get_world_size()
            if source.kind in ("pair", "dict") and batch_size is None:
                # one batch per process, so that every rank gets a share of the samples
                n = batch_size_of(obj[1] if source.kind == "pair" else obj)
                if max_samples is not None:
                    n = min(n, max_samples)
                source = as_data(obj, batch_size=max(1, math.ceil(n / world)),
                                 max_samples=max_samples, shard=True)
            elif source.kind == "batches" and len(obj) < world:
                raise CLIError(f"--data {spec!r}: {len(obj)} batches for {world} processes; "
                               "every process needs at least one batch")
        return source
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--data {spec!r}: {_first_line(exc)}") from None


def resolve_loss(spec: str) -> Callable:
    """The loss named by ``--loss``: a built-in name or a ``module:function`` spec."""
    from analysis.evaluation import resolve_loss as builtin_loss

    if spec in ("cross_entropy", "mse", "lm", "causal_lm", "model", "model_lm"):
        return builtin_loss(spec)
    fn = load_object(spec, "loss")
    if not callable(fn):
        raise CLIError(f"--loss {spec!r} is not callable")
    return fn

