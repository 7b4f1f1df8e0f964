"""The rows of a 2-D slice grid: which are still to compute, and where the finished ones go.

:class:`ResumableGrid` is the store coordination of :func:`landscape.slice_2d`, apart from
evaluating the points: it fingerprints the call (grid, directions, weights, buffers, data, loss,
mode, metrics), opens or resumes the :class:`landscape.store.GridStore` (under
``torch.distributed`` rank 0 alone reads and writes the file and the other ranks follow its
finished rows), lists the pending rows, records each finished row (saved atomically by the
store) and returns the whole grid at the end. Without a store the rows stay in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from analysis import distributed as dist

from ..store import GridStore, fingerprint_hash, tensor_hash, tensors_hash

#: ``finish(stats) -> (loss, accuracy or None)`` from the sums ``[sum n L, correct, N]``.
Finish = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]


def slice_fingerprint(session: Any, xs: np.ndarray, ys: np.ndarray, directions: Sequence[torch.Tensor],
                      w: torch.Tensor, buffers: str | None, num_samples: int) -> dict[str, Any]:
    """What a stored grid must have been computed with to be resumed (one process's view).

    Args:
        session: the slice's :class:`landscape.slices._points.Session`.
        xs, ys: the grid coordinates.
        directions: ``(d1, d2)``.
        w: the flat weights at the origin.
        buffers: hash of the model's buffers before the first evaluation.
        num_samples: ``N`` of the data (as evaluated at the origin).
    """
    d1, d2 = directions
    return {
        "kind": "slice_2d",
        "xs": xs.tolist(),
        "ys": ys.tolist(),
        "d1": tensor_hash(d1),
        "d2": tensor_hash(d2),
        "params": session.space.names,
        "weights": tensor_hash(w),
        "buffers": buffers,
        "data": session.evaluator.data_hash(),
        "num_samples": num_samples,
        "loss_fn": session.loss_name,
        "mode": session.mode,
        "metrics": list(session.metrics),
        "recalibrate_bn": session.recalibrate_bn,
        "dtype": str(session.space.dtype),
    }


def open_store(path: str | os.PathLike, fp: dict[str, Any], xs: np.ndarray, ys: np.ndarray,
               metrics: Sequence[str], *, resume: bool, overwrite: bool, row_shard: bool) -> GridStore:
    """Open (or resume) the store at ``path`` with the fingerprint ``fp`` on every rank.

    On one process this is :class:`GridStore`. Under ``torch.distributed`` there is one store
    for the whole job: with row sharding every rank holds the full data, so the one-process
    fingerprint is used and checked equal on all ranks; with a sharded data source the data hash
    covers every rank's share. Rank 0 alone reads and writes the file; its store state (or its
    error, re-raised on every rank) is broadcast, and the other ranks keep an in-memory copy.

    Raises:
        landscape.store.StoreMismatchError: the store was written with other arguments.
        ValueError: ``row_shard`` with different weights, buffers, directions or data on
            different ranks.
    """
    if not dist.is_distributed():
        return GridStore(path, fp, xs, ys, metrics, resume=resume, overwrite=overwrite)
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
            grid = GridStore(path, fp, xs, ys, metrics, resume=resume, overwrite=overwrite)
            payload = ("ok", grid.state())
        except Exception as err:  # re-raised on every rank below
            payload = ("error", err)
    payload = dist.broadcast_object(payload)
    if payload[0] == "error":
        raise payload[1]
    if not main:
        grid = GridStore(path, fp, xs, ys, metrics, resume=resume, writer=False)
        grid.adopt(payload[1])
    return grid


class ResumableGrid:
    """The rows ``xs[i] x ys`` of a 2-D slice: pending rows, finished rows, the final grid.

    Args:
        xs, ys: the grid coordinates.
        finish: turns sums ``[sum n L, correct, N]`` into ``(loss, accuracy or None)``.
        store: the :class:`GridStore` the finished rows are saved to, or ``None`` (in memory).

    Attributes:
        pending: indices of the rows still to compute, in order.
        resumed: rows loaded from the store instead of computed.
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, finish: Finish, store: GridStore | None = None):
        self.xs, self.ys, self.finish, self.store = xs, ys, finish, store
        self.stats = np.zeros((len(xs), len(ys), 3))
        self.pending = list(range(len(xs))) if store is None else store.pending_rows()
        self.resumed = len(xs) - len(self.pending)

    @classmethod
    def open(cls, path: str | os.PathLike | None, session: Any, xs: np.ndarray, ys: np.ndarray,
             directions: Sequence[torch.Tensor], w: torch.Tensor, buffers: str | None,
             origin: np.ndarray, *, resume: bool, overwrite: bool, row_shard: bool) -> ResumableGrid:
        """The grid of a ``slice_2d`` call, resumed from the store at ``path`` (if any).

        ``origin`` holds the sums at ``w`` (row ``[sum n L, correct, N]``); its loss and
        accuracy are saved with the store. ``buffers`` is the hash of the model's buffers taken
        before any evaluation (``None`` without a store).
        """
        if path is None:
            return cls(xs, ys, session.finish)
        fp = slice_fingerprint(session, xs, ys, directions, w, buffers, int(origin[0, 2]))
        store = open_store(path, fp, xs, ys, session.metrics, resume=resume, overwrite=overwrite,
                           row_shard=row_shard)
        l0, a0 = session.finish(origin)
        store.set_extra(loss_at_origin=float(l0[0]),
                        accuracy_at_origin=float("nan") if a0 is None else float(a0[0]))
        return cls(xs, ys, session.finish, store)

    def close(self) -> None:
        """Release the store's lock (its finished rows stay readable)."""
        if self.store is not None:
            self.store.close()

    @property
    def path(self) -> str | None:
        """The store file, or ``None``."""
        return None if self.store is None else str(self.store.path)

    def record(self, i: int, row: np.ndarray) -> None:
        """Keep the finished row ``i`` (sums, shape ``(len(ys), 3)``) and save it to the store
        (rank 0 saves; the other ranks' stores stay in memory)."""
        self.stats[i] = row
        if self.store is not None:
            loss, acc = self.finish(self.stats[i])
            values = {"loss": loss}
            if "accuracy" in self.store.metrics:
                values["accuracy"] = acc if acc is not None else np.full(len(self.ys), np.nan)
            self.store.write_row(i, values)

    def values(self, has_accuracy: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """``(loss, accuracy or None)`` of the whole grid, resumed rows included; the accuracy
        is ``None`` unless ``has_accuracy`` (requested, and the targets are class indices)."""
        if self.store is None:
            return self.finish(self.stats)
        values = self.store.values
        return (values["loss"].copy(),
                values["accuracy"].copy() if has_accuracy and "accuracy" in values else None)
