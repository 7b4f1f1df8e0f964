"""Rank functions for the row-sharded 2-D slice tests (``slice_2d(..., shard_rows=True)``).

Run by :func:`tests.distributed.launcher.run_ranks` on 2 gloo ranks; every rank holds the FULL
50-sample dataset of :func:`tests.distributed.workers.classification_problem` and the grid rows
are split across the ranks. The reference is the same call on one process.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch

from analysis import distributed as D
from tests.distributed.workers import classification_problem

XS = [-0.75, -0.25, 0.0, 0.5, 1.0]  # 5 rows: an uneven last round on 2 ranks
YS = [-1.0, 0.25, 1.0]


def problem():
    """``(model, x, y, d1, d2)``: the model, the full data and two fixed directions."""
    model, x, y = classification_problem()
    g = torch.Generator().manual_seed(7)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d1 = torch.randn(n, generator=g, dtype=torch.float64)
    d2 = torch.randn(n, generator=g, dtype=torch.float64)
    return model, x, y, d1, d2


def grid(model, x, y, d1, d2, **kwargs):
    from landscape import slice_2d

    return slice_2d(model, "cross_entropy", (x, y), d1, d2, XS, YS, progress=False, **kwargs)


def _plain(r) -> dict[str, Any]:
    return {"loss": r.loss, "accuracy": r.accuracy, "loss_at_origin": r.loss_at_origin,
            "num_samples": r.num_samples, "resumed_rows": r.resumed_rows, "store": r.store}


def row_sharded_values(rank: int, world: int, store_dir: str) -> dict[str, tuple[str, Any]]:
    """Row-sharded grids on this rank: plain, with a fresh store, resumed from a partial store
    (``store_dir/partial.npz``, written by the test beforehand), and the sharded-data error."""
    from analysis.data import as_data

    model, x, y, d1, d2 = problem()
    before = [p.detach().clone() for p in model.parameters()]
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def plain():
        forwards[0] = 0
        r = grid(model, x, y, d1, d2, shard_rows=True)
        return {**_plain(r), "forwards": forwards[0]}

    def fresh_store():
        r = grid(model, x, y, d1, d2, shard_rows=True, store=os.path.join(store_dir, "fresh.npz"))
        D.barrier()
        files = sorted(os.listdir(store_dir))
        return {**_plain(r), "files": files}

    def resumed():
        forwards[0] = 0
        r = grid(model, x, y, d1, d2, shard_rows=True,
                 store=os.path.join(store_dir, "partial.npz"))
        return {**_plain(r), "forwards": forwards[0]}

    def sharded_data():
        from landscape import slice_2d

        try:
            slice_2d(model, "cross_entropy", as_data((x, y), batch_size=8, shard=True), d1, d2,
                     XS, YS, progress=False, shard_rows=True)
        except ValueError as e:
            return str(e)
        return None

    def differing_ranks():
        # rank 1 slices along a slightly different d2: caught by the store fingerprint check
        e2 = d2 * (1.0 + 1e-9) if rank == 1 else d2
        try:
            grid(model, x, y, d1, e2, shard_rows=True, store=os.path.join(store_dir, "differ.npz"))
        except ValueError as e:
            return str(e)
        return None

    def restored():
        return all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    out: dict[str, tuple[str, Any]] = {}
    for name, check in {"plain": plain, "fresh_store": fresh_store, "resumed": resumed,
                        "sharded_data": sharded_data, "differing_ranks": differing_ranks,
                        "restored": restored}.items():
        try:
            out[name] = ("ok", check())
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            out[name] = ("error", traceback.format_exc())
        D.barrier()
    return out
