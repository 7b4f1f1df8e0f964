"""1-D and 2-D slices of the loss landscape (Li et al. 2018; Goodfellow et al. 2015).

A slice evaluates the dataset loss (and accuracy) on a line or a plane through the weights ``w``:

    f(alpha)  = L(w + alpha d)                       (:func:`slice_1d`)
    f(x, y)   = L(w + x d1 + y d2)                   (:func:`slice_2d`)
    f(alpha)  = L((1 - alpha) w_a + alpha w_b)       (:func:`interpolate`)

with ``L(w) = sum_b n_b L_b(w) / N`` over the data (exact weighting, see :mod:`analysis.data`)
and directions from :mod:`analysis.directions` (filter-normalized random directions by default in
the examples, as in Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

How a grid is evaluated:

* one forward pass over the data per grid point, no copy of the model: the parameters are set in
  place to ``w + x d1 + y d2`` (one ``foreach`` copy and two ``foreach`` axpys) from the saved
  ``w`` at every point, so each value depends only on its coordinates, and ``w`` is restored
  bit for bit at the end, also on an error or ``KeyboardInterrupt``;
* the data batches of a tensor pair or a list are moved to the model's device once per slice
  (``cache="auto"``), and the per-point sums stay on the device until the end of a row, so the
  per-point overhead is a few small kernels;
* BatchNorm runs in eval mode by default (``mode="eval"``): the running statistics of ``w`` are
  used at every point, so the slice shows the loss of one fixed network function per point and a
  point costs exactly one forward pass. ``recalibrate_bn=True`` instead recomputes the running
  statistics at every point from the data (or ``bn_data``) before evaluating, as some papers do
  for large perturbations; it costs one more pass per point. Buffers are restored at the end;
* non-finite losses are stored as NaN, counted in ``nonfinite`` and reported with a
  ``RuntimeWarning``; they do not stop the run;
* a tqdm bar (``progress=True``) shows points/s and the ETA;
* with a sharded data source (``as_data(..., shard=True)`` under ``torch.distributed``) each rank
  evaluates its share and the per-point sums and counts are all-reduced once per row;
  ``slice_2d(..., shard_rows=True)`` instead splits the grid rows across the ranks, each rank
  holding the full data (rank 0 writes the store);
* :func:`slice_2d` with ``store="grid.npz"`` (or a directory) saves every finished row
  atomically; rerunning the same call resumes after the last finished row and yields exactly the
  grid of an uninterrupted run (see :mod:`landscape.store`).

Example:
    >>> import torch
    >>> from analysis.directions import random_direction
    >>> from landscape.slices import slice_2d
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> d1 = random_direction(model, seed=0)
    >>> d2 = random_direction(model, seed=1, orthogonal_to=d1)
    >>> s = slice_2d(model, "cross_entropy", (x, y), d1, d2, [-1, 0, 1], [-1, 0, 1], progress=False)
    >>> s.loss.shape
    (3, 3)
"""

from __future__ import annotations

import os
import pathlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis import distributed as dist
from analysis.checks import check_first_batch
from analysis.data import Data, DataSource, as_data, to_device
from analysis.directions import interpolation_direction
from analysis.evaluation import (
    correct_count,
    forward,
    model_device_dtype,
    model_mode,
    progress_bar,
    resolve_loss,
)
from analysis.losses import LossFn
from analysis.params import ParameterSpace
from analysis.results import Result

from .store import GridStore, fingerprint_hash, tensor_hash, tensors_hash

__all__ = ["Slice1D", "Slice2D", "slice_1d", "slice_2d", "interpolate", "METRICS"]

#: Metrics a slice can record.
METRICS = ("loss", "accuracy")



# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class Slice1D(Result):
    """Loss (and accuracy) along ``w + alpha d`` (from :func:`slice_1d` or :func:`interpolate`).

    Attributes:
        alphas: the coordinates, shape ``(m,)``.
        loss: ``loss[i] = L(w + alphas[i] d)``; NaN where non-finite.
        accuracy: same shape, or ``None`` (not requested, or targets are not class indices).
        loss_at_origin: ``L(w)``.
        accuracy_at_origin: accuracy at ``w`` (or ``None``).
        direction: metadata of ``d``: ``name``, ``norm``, ``numel`` (and the parameter norm
            ``weight_norm`` for scale).
        num_samples: the data size ``N``.
        mode: ``"eval"``, ``"train"`` or ``None`` (the model mode used).
        recalibrate_bn: whether BatchNorm statistics were recomputed per point.
        nonfinite: number of points whose loss was not finite.
        seconds: wall time of the grid.
        label: a label for legends.
    """

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    loss_at_origin: float
    accuracy_at_origin: float | None
    direction: dict
    num_samples: int
    mode: str | None
    recalibrate_bn: bool
    nonfinite: int
    seconds: float
    label: str = ""

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Matplotlib curve (see :func:`landscape.plots.plot_1d`); returns the figure."""
        from .plots import plot_1d

        return plot_1d(self, ax=ax, **kwargs)

    def plot_interactive(self, **kwargs: Any) -> Any:
        """Plotly curve with hover values (see :func:`landscape.plots.plotly_1d`)."""
        from .plots import plotly_1d

        return plotly_1d(self, **kwargs)


@dataclass(frozen=True, repr=False)
class Slice2D(Result):
    """Loss (and accuracy) on the plane ``w + x d1 + y d2`` (from :func:`slice_2d`).

    Attributes:
        xs, ys: the coordinates along ``d1`` and ``d2``.
        loss: ``loss[i, j] = L(w + xs[i] d1 + ys[j] d2)``, shape ``(len(xs), len(ys))``; NaN
            where non-finite.
        accuracy: same shape, or ``None``.
        loss_at_origin, accuracy_at_origin: the values at ``w``.
        directions: metadata of ``(d1, d2)``: ``name``, ``norm``, ``numel``, ``weight_norm``.
        cosine: ``cos(d1, d2)`` (0 for orthogonalized directions).
        num_samples, mode, recalibrate_bn, nonfinite, seconds: as in :class:`Slice1D`.
        store: path of the store file (or ``None``).
        resumed_rows: rows loaded from the store instead of computed.
        label: a label for titles.
    """

    xs: np.ndarray
    ys: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    loss_at_origin: float
    accuracy_at_origin: float | None
    directions: tuple
    cosine: float
    num_samples: int
    mode: str | None
    recalibrate_bn: bool
    nonfinite: int
    seconds: float
    store: str | None = None
    resumed_rows: int = 0
    label: str = ""

    def plot(self, kind: str = "contour", **kwargs: Any) -> Any:
        """Matplotlib figure: ``kind="contour"`` (labelled lines), ``"filled"`` (also
        ``"contourf"``) or ``"surface"`` (see :mod:`landscape.plots`); returns the figure."""
        from . import plots

        kinds = {"contour": plots.plot_contour, "filled": plots.plot_contourf, "contourf": plots.plot_contourf,
                 "surface": plots.plot_surface}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
        return kinds[kind](self, **kwargs)

    def plot_interactive(self, kind: str = "surface", **kwargs: Any) -> Any:
        """Plotly figure (``kind="surface"`` or ``"contour"``) with hover values."""
        from . import plots

        kinds = {"surface": plots.plotly_surface, "contour": plots.plotly_contour}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
        return kinds[kind](self, **kwargs)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _coords(values: Any, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be a sequence of numbers, got {type(values).__name__}") from err
    if arr.ndim == 0:
        raise ValueError(f"{what} must be a 1-D array of coordinates, got the scalar {values!r}")
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty; pass at least one coordinate")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains non-finite values")
    return arr


def _direction(d: Any, space: ParameterSpace, what: str) -> torch.Tensor:
    if isinstance(d, np.ndarray):
        d = torch.from_numpy(d)
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"{what} must be a flat torch.Tensor, got {type(d).__name__}")
    space.check_vector(d, what)
    if not d.is_floating_point():
        raise TypeError(f"{what} must be floating point, got dtype {d.dtype}")
    d = d.detach().to(device=space.device, dtype=space.dtype)
    norm = torch.linalg.vector_norm(d.double())
    if not torch.isfinite(norm):
        raise ValueError(f"{what} contains non-finite values")
    if norm == 0:
        raise ValueError(f"{what} is the zero vector; a slice needs a nonzero direction")
    return d.contiguous()


def _metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or "loss" not in metrics:
        raise ValueError(f"metrics must include 'loss' and be among {METRICS}, got {metrics!r}")
    return metrics


def _loss_name(loss_fn: Any) -> str:
    if isinstance(loss_fn, str) or loss_fn is None:
        return str(loss_fn or "cross_entropy")
    name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__qualname__
    return f"{getattr(loss_fn, '__module__', '') or type(loss_fn).__module__}.{name}"


# --------------------------------------------------------------------------------------------
# the per-point evaluator
# --------------------------------------------------------------------------------------------
class _Evaluator:
    """Evaluates ``sum n_b L_b``, correct predictions and ``N`` at the current parameters."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        source: DataSource,
        *,
        want_accuracy: bool,
        cache: bool | str,
        bn_source: DataSource | None,
    ):
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
        self.model, self.loss_fn, self.source = model, loss_fn, source
        self.device, self.dtype = model_device_dtype(model)
        self.want_accuracy = want_accuracy
        self.has_accuracy = want_accuracy
        do_cache = cache is True or (cache == "auto" and source.kind in ("pair", "batches"))
        self.batches = self._load(source) if do_cache else None
        self.bn_source = bn_source
        self.bn_batches = None
        if bn_source is not None:
            if bn_source is source and self.batches is not None:
                self.bn_batches = self.batches
            elif do_cache:
                self.bn_batches = self._load(bn_source)

    def _load(self, source: DataSource) -> list[tuple[Any, Any, int]]:
        return [
            (to_device(b.inputs, self.device, self.dtype),
             to_device(b.targets, self.device, self.dtype), b.size)
            for b in source
        ]

    def _iter(self, batches: list | None, source: DataSource):
        if batches is not None:
            yield from batches
        else:
            for b in source:
                yield (to_device(b.inputs, self.device, self.dtype),
                       to_device(b.targets, self.device, self.dtype), b.size)

    def data_hash(self) -> str | None:
        """Hash of the cached data (``None`` when not cached)."""
        if self.batches is None:
            return None
        return tensors_hash([(x, y) for x, y, _ in self.batches])

    def recalibrate(self, bns: list[nn.modules.batchnorm._BatchNorm]) -> None:
        """Recompute BatchNorm running statistics at the current parameters.

        As :func:`msam.recalibrate_batchnorm`: only the BatchNorm layers run in training mode
        (dropout stays off), and each batch gets momentum ``n_b / (N_seen + n_b)``, so the
        statistics are the sample-weighted mean over batches (exact for an uneven last batch).
        The caller restores the momenta afterwards.
        """
        for m in bns:
            m.reset_running_stats()
        flags = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            for m in bns:
                m.train()
            seen = 0
            for x, _, n in self._iter(self.bn_batches, self.bn_source):
                for m in bns:
                    m.momentum = n / (seen + n)
                forward(self.model, x)
                seen += n
        finally:
            for m, f in flags:
                m.training = f

    def point(self, out: torch.Tensor) -> None:
        """Write ``[sum n L, correct, N]`` of the current parameters into ``out`` (on device)."""
        out.zero_()
        for x, y, n in self._iter(self.batches, self.source):
            outputs = forward(self.model, x)
            loss = self.loss_fn(outputs, y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(
                    "loss_fn must return a scalar tensor (the batch mean), got "
                    + (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__)
                )
            out[0] += loss.detach().to(torch.float64) * n
            if self.has_accuracy:
                c = correct_count(outputs, y)
                if c is None:
                    self.has_accuracy = False
                else:
                    out[1] += c
            out[2] += n


class _Mover:
    """Sets the parameters to ``w + sum_k c_k d_k`` in place with foreach ops."""

    def __init__(self, space: ParameterSpace, origin: torch.Tensor, directions: Sequence[torch.Tensor]):
        self.params = space.params
        self.w = space.unflatten(origin)
        self.ds = [space.unflatten(d) for d in directions]

    @torch.no_grad()
    def set(self, coeffs: Sequence[float]) -> None:
        torch._foreach_copy_(self.params, self.w)
        for c, d in zip(coeffs, self.ds):
            if c != 0.0:
                torch._foreach_add_(self.params, d, alpha=float(c))


class _Session:
    """Shared setup of a slice: validation, mode, buffers, exact restore."""

    def __init__(self, model, loss_fn, data, *, metrics, mode, batch_size, cache,
                 recalibrate_bn, bn_data, params, check_deterministic=True, where="slice"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if mode not in ("eval", "train", None):
            raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
        self.model = model
        self.metrics = _metrics(metrics)
        self.loss_name = _loss_name(loss_fn)
        self.loss_fn = resolve_loss(loss_fn)
        self.mode = mode
        self.space = ParameterSpace(model, params)
        self.source = as_data(data, batch_size=batch_size)
        for flag, value in (("check_deterministic", check_deterministic),
                            ("recalibrate_bn", recalibrate_bn)):
            _check_bool(flag, value)
        check_first_batch(model, self.loss_fn, self.source, mode, where=where,
                          deterministic=check_deterministic)
        self.recalibrate_bn = bool(recalibrate_bn)
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.recalibrate_bn and not self.bns:
            warnings.warn("recalibrate_bn=True but the model has no BatchNorm layer", stacklevel=3)
            self.recalibrate_bn = False
        bn_source = None
        if self.recalibrate_bn:
            bn_source = self.source if bn_data is None else as_data(bn_data, batch_size=batch_size)
        self.evaluator = _Evaluator(
            model, self.loss_fn, self.source, want_accuracy="accuracy" in self.metrics,
            cache=cache, bn_source=bn_source,
        )

    def weight_meta(self, d: torch.Tensor, name: str, w: torch.Tensor) -> dict:
        return {
            "name": name,
            "norm": float(torch.linalg.vector_norm(d.double())),
            "numel": int(d.numel()),
            "weight_norm": float(torch.linalg.vector_norm(w.double())),
            "hash": tensor_hash(d),
        }

    def evaluate_points(self, mover: _Mover, coords: Sequence[Sequence[float]], bar: Any) -> torch.Tensor:
        """Stats ``(len(coords), 3)`` for the given coordinates, reduced over ranks."""
        stats = torch.zeros(len(coords), 3, device=self.space.device, dtype=torch.float64)
        for k, c in enumerate(coords):
            mover.set(c)
            if self.recalibrate_bn:
                self.evaluator.recalibrate(self.bns)
            self.evaluator.point(stats[k])
            if bar is not None:
                bar.update(1)
        if self.source.shard:
            dist.all_reduce_sum(stats)
        return stats

    def finish(self, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        n = stats[..., 2]
        loss = stats[..., 0] / n
        loss = np.where(np.isfinite(loss), loss, np.nan)
        acc = stats[..., 1] / n if self._has_acc() else None
        return loss, acc

    def _has_acc(self) -> bool:
        return "accuracy" in self.metrics and self.evaluator.has_accuracy

    def run(self, body: Callable[[torch.Tensor], Any]) -> Any:
        """Run ``body(w)`` (``w``: the saved flat weights) with the mode set, no autograd, and
        parameters and buffers restored exactly at the end."""
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        momenta = [(m, m.momentum) for m in self.bns]
        try:
            with self.space.restored() as w, model_mode(self.model, self.mode), torch.no_grad():
                return body(w)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mom in momenta:
                m.momentum = mom


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _check_label(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")


def _check_store_path(store: Any) -> None:
    """Refuse, before computing, a ``store`` that cannot be written (as the CLI does).

    A directory (existing, or named with a trailing separator) or the parent of a ``.npz``
    path must be, or be creatable under, a writable directory; an existing store file must be a
    writable regular file. Skipped under ``torch.distributed`` (rank 0 alone writes and its
    errors reach every rank).
    """
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a path (str or os.PathLike), got {type(store).__name__}")
    raw = os.fspath(store)
    if not raw:
        raise ValueError("store is an empty path")
    if dist.is_distributed():
        return
    p = pathlib.Path(raw)
    is_dir = p.is_dir() or raw.endswith(("/", os.sep))
    if not is_dir:
        target = p if p.suffix == ".npz" else p.with_name(p.name + ".npz")
        if target.exists() and (not target.is_file() or not os.access(target, os.W_OK)):
            raise ValueError(f"store {target} exists but is not a writable regular file")
    folder = p if is_dir else (p.parent if str(p.parent) else pathlib.Path("."))
    anc = folder
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"cannot write store {raw}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write store {raw}: directory {anc} is not writable")


def _bar(total: int, progress: bool, desc: str):
    if not progress or total == 0 or not dist.is_main_process():
        return None
    return progress_bar(iter(()), enabled=True, total=total, desc=desc, unit="pt")


def _warn_nonfinite(count: int, total: int) -> None:
    if count:
        warnings.warn(
            f"{count} of {total} grid points gave a non-finite loss; they are stored as NaN",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def slice_1d(
    model: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data,
    direction: torch.Tensor,
    alphas: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
    mode: str | None = "eval",
    recalibrate_bn: bool = False,
    bn_data: Data | None = None,
    batch_size: int | None = None,
    cache: bool | str = "auto",
    params: Sequence[str | nn.Parameter] | None = None,
    name: str = "d",
    label: str = "",
    progress: bool = True,
    check_deterministic: bool = True,
) -> Slice1D:
    """The 1-D slice ``f(alpha) = L(w + alpha d)`` (Goodfellow et al. 2015; Li et al. 2018).

    Args:
        model: the network at ``w`` (moved in place during the slice, restored exactly).
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable returning the batch-mean loss.
        data: an ``(X, y)`` pair, a list of batches or a DataLoader (see :mod:`analysis.data`).
        direction: a flat tensor over the trainable parameters (see
            :mod:`analysis.directions`).
        alphas: the coordinates (1-D, non-empty, finite).
        metrics: ``("loss", "accuracy")`` (default) or ``("loss",)``.
        mode: ``"eval"`` (default; BatchNorm uses the running statistics of ``w``), ``"train"``
            or ``None`` (leave the model's mode).
        recalibrate_bn: recompute BatchNorm statistics at every point (from ``bn_data`` or
            ``data``).
        bn_data: data for the recalibration.
        batch_size: batch size to split a tensor pair (default: one batch).
        cache: ``"auto"`` (default: keep the batches of a pair or list on the device for the
            whole slice), ``True`` (also a DataLoader's) or ``False``.
        params: restrict the parameter space (see :class:`analysis.params.ParameterSpace`).
        name: name of the direction (axis label).
        label: label for legends.
        progress: show a tqdm bar with points/s.
        check_deterministic: refuse, before computing, a model whose forward is random under
            ``mode`` (active dropout, named; or two evaluations of the first batch differing,
            e.g. ``F.dropout(training=True)`` in ``forward``); see :mod:`analysis.checks`.
            The first batch is also checked against the loss (shapes, dtypes, class range).

    Returns:
        :class:`Slice1D`.

    Raises:
        ValueError: empty or non-finite ``alphas``, a direction of the wrong length, zero or
            non-finite, an unknown metric or mode.
    """
    alphas_arr = _coords(alphas, "alphas")
    _check_label("name", name)
    _check_label("label", label)
    s = _Session(model, loss_fn, data, metrics=metrics, mode=mode, batch_size=batch_size,
                 cache=cache, recalibrate_bn=recalibrate_bn, bn_data=bn_data, params=params,
                 check_deterministic=check_deterministic, where="slice_1d()")
    d = _direction(direction, s.space, "direction")
    start = time.perf_counter()

    def body(w):
        mover = _Mover(s.space, w, [d])
        origin = s.evaluate_points(mover, [(0.0,)], None)
        bar = _bar(len(alphas_arr), progress, "slice_1d")
        try:
            stats = s.evaluate_points(mover, [(float(a),) for a in alphas_arr], bar)
        finally:
            if bar is not None:
                bar.close()
        return w, origin.cpu().numpy(), stats.cpu().numpy()

    w, origin, stats = s.run(body)
    loss, acc = s.finish(stats)
    l0, a0 = s.finish(origin)
    nonfinite = int(np.isnan(loss).sum())
    _warn_nonfinite(nonfinite, len(alphas_arr))
    return Slice1D(
        alphas=alphas_arr,
        loss=loss,
        accuracy=acc,
        loss_at_origin=float(l0[0]),
        accuracy_at_origin=None if a0 is None else float(a0[0]),
        direction=s.weight_meta(d, name, w),
        num_samples=int(stats[0, 2]),
        mode=mode,
        recalibrate_bn=s.recalibrate_bn,
        nonfinite=nonfinite,
        seconds=time.perf_counter() - start,
        label=label,
    )


def slice_2d(
    model: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data,
    d1: torch.Tensor,
    d2: torch.Tensor,
    xs: Sequence[float] | np.ndarray | torch.Tensor,
    ys: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    store: str | os.PathLike | None = None,
    resume: bool = True,
    overwrite: bool = False,
    metrics: Sequence[str] = ("loss", "accuracy"),
    mode: str | None = "eval",
    recalibrate_bn: bool = False,
    bn_data: Data | None = None,
    batch_size: int | None = None,
    cache: bool | str = "auto",
    params: Sequence[str | nn.Parameter] | None = None,
    names: tuple[str, str] = ("d1", "d2"),
    label: str = "",
    progress: bool = True,
    shard_rows: bool = False,
    check_deterministic: bool = True,
) -> Slice2D:
    """The 2-D slice ``f(x, y) = L(w + x d1 + y d2)`` on the grid ``xs x ys`` (Li et al. 2018).

    Rows (``xs[i]`` with every ``ys[j]``) are computed in order. With ``store`` every finished
    row is saved atomically; calling again with the same arguments resumes after the last
    finished row (``resume=True``) and gives exactly the grid of an uninterrupted run. Arguments
    that differ from the store's (grid, directions, model weights and buffers, data, loss, mode,
    metrics) raise :class:`landscape.store.StoreMismatchError` and leave the file untouched.
    The data is fingerprinted by its contents when it is cached on the device (a tensor pair or
    a list of batches, the default); a DataLoader that is not cached is fingerprinted only by
    its sample count, so resuming with different data of the same size is not detected.

    With ``shard_rows=True`` under an initialized process group of ``W`` ranks, the grid rows are
    split across ranks instead of the data: every rank holds the FULL (unsharded) data, the
    ``k``-th pending row goes to rank ``k % W``, and after each round of ``W`` rows the finished
    rows are gathered with one all-reduce of a ``(W, len(ys), 3)`` tensor (each rank fills its
    own slot, the others are zero, so the sum is exact). Rank 0 alone writes the store; all ranks
    agree on the pending rows (rank 0's store state is broadcast), so resuming works as on one
    process, and a store written by one process resumes under row sharding and vice versa (a
    data-sharded run fingerprints its data per rank, so its store is not interchangeable with
    these). Every rank returns the same complete grid, equal
    to the one-process grid. On one process ``shard_rows`` changes nothing.

    Args:
        model, loss_fn, data: as in :func:`slice_1d`.
        d1, d2: flat directions (nonzero, not parallel). Typically
            ``random_direction(model, seed=0)`` and ``random_direction(model, seed=1,
            orthogonal_to=d1)``.
        xs, ys: coordinates along ``d1`` and ``d2`` (1-D, non-empty, finite).
        store: ``None`` (default), a ``.npz`` path, or a directory.
        resume: continue from the store's finished rows (default); ``False`` recomputes every
            row and replaces the store file.
        overwrite: ignore an existing store file (damaged, or written with other arguments)
            and replace it.
        metrics, mode, recalibrate_bn, bn_data, batch_size, cache, params, progress: as in
            :func:`slice_1d`.
        names: names of ``d1`` and ``d2`` (axis labels).
        label: a label for titles.
        shard_rows: split the grid rows across ``torch.distributed`` ranks (default ``False``);
            the data must not be sharded (``as_data(..., shard=True)`` or a
            ``DistributedSampler`` loader raise ``ValueError``). A no-op on one process.
        check_deterministic: as in :func:`slice_1d`.

    Returns:
        :class:`Slice2D` with ``loss[i, j]`` at ``(xs[i], ys[j])``.

    Raises:
        ValueError: bad coordinates or directions (wrong length, zero, non-finite, parallel);
            ``shard_rows=True`` with sharded data, or with different weights, directions or data
            on different ranks.
        landscape.store.StoreMismatchError: the store was written with other arguments.
    """
    xs_arr, ys_arr = _coords(xs, "xs"), _coords(ys, "ys")
    if not (isinstance(names, (tuple, list)) and len(names) == 2):
        raise ValueError(f"names must be a pair of strings, got {names!r}")
    for nm in names:
        _check_label("names", nm)
    _check_label("label", label)
    _check_bool("resume", resume)
    _check_bool("shard_rows", shard_rows)
    if store is not None:
        _check_store_path(store)
    s = _Session(model, loss_fn, data, metrics=metrics, mode=mode, batch_size=batch_size,
                 cache=cache, recalibrate_bn=recalibrate_bn, bn_data=bn_data, params=params,
                 check_deterministic=check_deterministic, where="slice_2d()")
    if shard_rows and (s.source.shard or (s.evaluator.bn_source is not None
                                          and s.evaluator.bn_source.shard)):
        raise ValueError(
            "shard_rows=True splits the grid rows across ranks and needs the FULL data on every "
            "rank, but the data source is sharded (as_data(..., shard=True) or a "
            "DistributedSampler); pass the unsharded data, or shard_rows=False to shard the data"
        )
    row_shard = bool(shard_rows) and dist.is_distributed()
    t1 = _direction(d1, s.space, "d1")
    t2 = _direction(d2, s.space, "d2")
    a, b = t1.double(), t2.double()
    cosine = float((a @ b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))
    if abs(cosine) > 1 - 1e-9:
        raise ValueError(f"d1 and d2 are parallel (cosine {cosine:.12f}); the plane is degenerate")
    start = time.perf_counter()
    nx, ny = len(xs_arr), len(ys_arr)

    def open_store(w, buffers, origin, num_samples):
        if store is None:
            return None
        fp = {
            "kind": "slice_2d",
            "xs": xs_arr.tolist(),
            "ys": ys_arr.tolist(),
            "d1": tensor_hash(t1),
            "d2": tensor_hash(t2),
            "params": s.space.names,
            "weights": tensor_hash(w),
            "buffers": buffers,
            "data": s.evaluator.data_hash(),
            "num_samples": num_samples,
            "loss_fn": s.loss_name,
            "mode": mode,
            "metrics": list(s.metrics),
            "recalibrate_bn": s.recalibrate_bn,
            "dtype": str(s.space.dtype),
        }
        if not dist.is_distributed():
            grid = GridStore(store, fp, xs_arr, ys_arr, s.metrics, resume=resume, overwrite=overwrite)
        else:
            # one store for the whole job: the data hash covers every rank's share, rank 0
            # alone reads and writes the file, and the other ranks follow its finished rows
            if row_shard:  # full data on every rank: the one-process fingerprint, checked equal
                if len(set(dist.all_gather_object(fingerprint_hash(fp)))) != 1:
                    raise ValueError(
                        "shard_rows=True needs the same weights, buffers, directions and data "
                        "on every rank, but they differ across ranks"
                    )
            else:
                fp["data"] = tensors_hash([dist.all_gather_object(fp["data"])])
            main = dist.is_main_process()
            payload: tuple = ("ok", None)
            grid = None
            if main:
                try:
                    grid = GridStore(store, fp, xs_arr, ys_arr, s.metrics, resume=resume, overwrite=overwrite)
                    payload = ("ok", grid.state())
                except Exception as err:  # re-raised on every rank below
                    payload = ("error", err)
            payload = dist.broadcast_object(payload)
            if payload[0] == "error":
                raise payload[1]
            if not main:
                grid = GridStore(store, fp, xs_arr, ys_arr, s.metrics, resume=resume, writer=False)
                grid.adopt(payload[1])
        l0, a0 = s.finish(origin)
        grid.set_extra(loss_at_origin=float(l0[0]),
                       accuracy_at_origin=float("nan") if a0 is None else float(a0[0]))
        return grid

    def body(w):
        buffers = tensors_hash(list(model.buffers())) if store is not None else None
        mover = _Mover(s.space, w, [t1, t2])
        origin = s.evaluate_points(mover, [(0.0, 0.0)], None).cpu().numpy()
        num_samples = int(origin[0, 2])
        grid = open_store(w, buffers, origin, num_samples)
        stats = np.zeros((nx, ny, 3))
        todo = list(range(nx)) if grid is None else grid.pending_rows()
        resumed = nx - len(todo)
        bar = _bar(len(todo) * ny, progress, "slice_2d")

        def row_points(i):
            return [(float(xs_arr[i]), float(y)) for y in ys_arr]

        def record(i, row):
            stats[i] = row
            if grid is not None:  # rank 0 saves; the other ranks' stores stay in memory
                loss, acc = s.finish(stats[i])
                values = {"loss": loss}
                if "accuracy" in grid.metrics:
                    values["accuracy"] = acc if acc is not None else np.full(ny, np.nan)
                grid.write_row(i, values)

        try:
            if not row_shard:
                for i in todo:
                    record(i, s.evaluate_points(mover, row_points(i), bar).cpu().numpy())
            else:
                world, rank = dist.get_world_size(), dist.get_rank()
                for k0 in range(0, len(todo), world):
                    rows = todo[k0:k0 + world]
                    buf = torch.zeros(world, ny, 3, device=s.space.device, dtype=torch.float64)
                    if rank < len(rows):
                        buf[rank] = s.evaluate_points(mover, row_points(rows[rank]), None)
                    buf = dist.all_reduce_sum(buf).cpu().numpy()  # exact: one slot per rank
                    for r, i in enumerate(rows):
                        record(i, buf[r])
                    if bar is not None:
                        bar.update(len(rows) * ny)
        finally:
            if bar is not None:
                bar.close()
        return w, origin, stats, grid, resumed

    w, origin, stats, grid, resumed = s.run(body)
    l0, a0 = s.finish(origin)
    if grid is None:
        loss, acc = s.finish(stats)
    else:
        loss = grid.values["loss"].copy()
        acc = grid.values["accuracy"].copy() if a0 is not None and "accuracy" in grid.values else None
    nonfinite = int(np.isnan(loss).sum())
    _warn_nonfinite(nonfinite, nx * ny)
    return Slice2D(
        xs=xs_arr,
        ys=ys_arr,
        loss=loss,
        accuracy=acc,
        loss_at_origin=float(l0[0]),
        accuracy_at_origin=None if a0 is None else float(a0[0]),
        directions=(s.weight_meta(t1, names[0], w), s.weight_meta(t2, names[1], w)),
        cosine=cosine,
        num_samples=int(origin[0, 2]),
        mode=mode,
        recalibrate_bn=s.recalibrate_bn,
        nonfinite=nonfinite,
        seconds=time.perf_counter() - start,
        store=None if grid is None else str(grid.path),
        resumed_rows=resumed,
        label=label,
    )


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data,
    alphas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
    mode: str | None = "eval",
    progress: bool = True,
    **kwargs: Any,
) -> Slice1D:
    """Linear interpolation ``L((1 - alpha) w_a + alpha w_b)`` between two models.

    The classic 1-D plot of Goodfellow et al. (2015) and Keskar et al. (2017): ``alpha = 0`` is
    ``model_a``, ``alpha = 1`` is ``model_b``; the default ``alphas`` are 41 points on
    ``[-0.5, 1.5]``. Evaluated as :func:`slice_1d` of ``model_a`` along
    ``interpolation_direction(model_a, model_b)``; BatchNorm uses ``model_a``'s running
    statistics in eval mode unless ``recalibrate_bn=True`` is passed. ``model_b`` is not modified.

    Args:
        model_a, model_b: models with the same parameter names and shapes.
        loss_fn, data, metrics, mode, progress: as in :func:`slice_1d`.
        alphas: the coordinates (default ``np.linspace(-0.5, 1.5, 41)``).
        **kwargs: further :func:`slice_1d` arguments (``recalibrate_bn``, ``batch_size``, ...).

    Returns:
        :class:`Slice1D` with ``direction["name"] == "interpolation"``.

    Raises:
        ValueError: if the models' parameters differ in names or shapes, or are identical.
    """
    if alphas is None:
        alphas = np.linspace(-0.5, 1.5, 41)
    d = interpolation_direction(model_a, model_b, params=kwargs.get("params"))
    kwargs.setdefault("name", "interpolation")
    return slice_1d(model_a, loss_fn, data, d, alphas, metrics=metrics, mode=mode,
                    progress=progress, **kwargs)

