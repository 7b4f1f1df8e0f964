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
  (``cache="auto"``); a point's per-batch losses stay on the device, and the float64 sums of a
  whole row are formed once at its end (the same bits as summing point by point), so a point
  costs its forward passes, the three foreach ops of the move and no other kernel;
* BatchNorm runs in eval mode by default (``mode="eval"``): the running statistics of ``w`` are
  used at every point, so the slice shows the loss of one fixed network function per point and a
  point costs one forward pass over the data (in time not quite one: 1.14-1.30 bare forward
  passes with the loss per point on a Llama of 2.5M parameters on the CPU, 1.7-1.9 in issue 27's
  run, ``benchmarks/mixed_claims.py``). ``recalibrate_bn=True`` instead recomputes the running
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

The package: ``_results`` (:class:`Slice1D`, :class:`Slice2D`), ``_points`` (the per-point
evaluator and :func:`~landscape.slices._points.evaluate_line`, the one call that evaluates the
loss at a list of points such as the points of a line), ``_grid``
(:class:`~landscape.slices._grid.ResumableGrid`: the store coordination of :func:`slice_2d`,
fingerprints, resuming, rank 0 writing), ``_checks`` (argument checks); the public functions
live here.

Example:
    >>> import torch
    >>> from analysis import random_direction
    >>> from landscape import slice_2d
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
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis import distributed as dist
from analysis.data import Data
from analysis.directions import interpolation_direction
from analysis.losses import LossSpec

from ..store import tensors_hash
from ._checks import (
    check_bool,
    check_coords,
    check_direction,
    check_label,
    check_plane,
    check_store_path,
    point_bar,
    warn_nonfinite,
)
from ._grid import ResumableGrid
from ._points import Mover, Session, evaluate_line
from ._results import METRICS, Slice1D, Slice2D

__all__ = ["METRICS"]


def slice_1d(
    model: nn.Module,
    loss_fn: LossSpec,
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
        params: restrict the parameter space (see :class:`analysis.ParameterSpace`).
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
    alphas_arr = check_coords(alphas, "alphas")
    check_label("name", name)
    check_label("label", label)
    s = Session(model, loss_fn, data, metrics=metrics, mode=mode, batch_size=batch_size,
                cache=cache, recalibrate_bn=recalibrate_bn, bn_data=bn_data, params=params,
                check_deterministic=check_deterministic, where="slice_1d()")
    d = check_direction(direction, s.space, "direction")
    start = time.perf_counter()

    def body(w):
        mover = Mover(s.space, w, [d])
        origin = evaluate_line(s, mover, [(0.0,)])
        bar = point_bar(len(alphas_arr), progress, "slice_1d")
        try:
            stats = evaluate_line(s, mover, [(float(a),) for a in alphas_arr], bar)
        finally:
            if bar is not None:
                bar.close()
        return w, origin.cpu().numpy(), stats.cpu().numpy()

    w, origin, stats = s.run(body)
    loss, acc = s.finish(stats)
    l0, a0 = s.finish(origin)
    nonfinite = int(np.isnan(loss).sum())
    warn_nonfinite(nonfinite, len(alphas_arr))
    return Slice1D(
        alphas=alphas_arr,
        loss=loss,
        accuracy=acc,
        loss_at_origin=float(l0[0]),
        accuracy_at_origin=None if a0 is None else float(a0[0]),
        direction=s.weight_meta(d, name, w),
        num_samples=s.num_samples(),
        num_terms=int(stats[0, 2]),
        mode=mode,
        recalibrate_bn=s.recalibrate_bn,
        nonfinite=nonfinite,
        seconds=time.perf_counter() - start,
        label=label,
    )


def slice_2d(
    model: nn.Module,
    loss_fn: LossSpec,
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
    xs_arr, ys_arr = check_coords(xs, "xs"), check_coords(ys, "ys")
    if not (isinstance(names, (tuple, list)) and len(names) == 2):
        raise ValueError(f"names must be a pair of strings, got {names!r}")
    for nm in names:
        check_label("names", nm)
    check_label("label", label)
    check_bool("resume", resume)
    check_bool("shard_rows", shard_rows)
    if store is not None:
        check_store_path(store)
    s = Session(model, loss_fn, data, metrics=metrics, mode=mode, batch_size=batch_size,
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
    t1, t2, cosine = check_plane(d1, d2, s.space)
    start = time.perf_counter()

    def body(w):
        buffers = tensors_hash(list(model.buffers())) if store is not None else None
        mover = Mover(s.space, w, [t1, t2])
        origin = evaluate_line(s, mover, [(0.0, 0.0)]).cpu().numpy()
        grid = ResumableGrid.open(store, s, xs_arr, ys_arr, (t1, t2), w, buffers, origin,
                                  resume=resume, overwrite=overwrite, row_shard=row_shard)
        try:
            _compute_rows(s, mover, grid, progress, row_shard)
        finally:
            grid.close()  # the store's lock is released however the rows end
        return w, origin, grid

    w, origin, grid = s.run(body)
    l0, a0 = s.finish(origin)
    loss, acc = grid.values(has_accuracy=a0 is not None)
    nonfinite = int(np.isnan(loss).sum())
    warn_nonfinite(nonfinite, len(xs_arr) * len(ys_arr))
    return Slice2D(
        xs=xs_arr,
        ys=ys_arr,
        loss=loss,
        accuracy=acc,
        loss_at_origin=float(l0[0]),
        accuracy_at_origin=None if a0 is None else float(a0[0]),
        directions=(s.weight_meta(t1, names[0], w), s.weight_meta(t2, names[1], w)),
        cosine=cosine,
        num_samples=s.num_samples(),
        num_terms=int(origin[0, 2]),
        mode=mode,
        recalibrate_bn=s.recalibrate_bn,
        nonfinite=nonfinite,
        seconds=time.perf_counter() - start,
        store=grid.path,
        resumed_rows=grid.resumed,
        label=label,
    )


def _compute_rows(s: Session, mover: Mover, grid: ResumableGrid, progress: bool, row_shard: bool) -> None:
    """Evaluate the pending rows of ``grid`` in order and record each one.

    With ``row_shard`` the ``k``-th pending row goes to rank ``k % W``; after each round of
    ``W`` rows the finished rows are gathered with one all-reduce of a ``(W, len(ys), 3)``
    tensor (each rank fills its own slot, the others are zero, so the sum is exact).
    """
    ys = grid.ys
    todo = grid.pending
    bar = point_bar(len(todo) * len(ys), progress, "slice_2d")

    def row_points(i):
        return [(float(grid.xs[i]), float(y)) for y in ys]

    try:
        if not row_shard:
            for i in todo:
                grid.record(i, evaluate_line(s, mover, row_points(i), bar).cpu().numpy())
            return
        world, rank = dist.get_world_size(), dist.get_rank()
        for k0 in range(0, len(todo), world):
            rows = todo[k0:k0 + world]
            buf = torch.zeros(world, len(ys), 3, device=s.space.device, dtype=torch.float64)
            if rank < len(rows):
                buf[rank] = evaluate_line(s, mover, row_points(rows[rank]))
            buf = dist.all_reduce_sum(buf).cpu().numpy()  # exact: one slot per rank
            for r, i in enumerate(rows):
                grid.record(i, buf[r])
            if bar is not None:
                bar.update(len(rows) * len(ys))
    finally:
        if bar is not None:
            bar.close()


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossSpec,
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

