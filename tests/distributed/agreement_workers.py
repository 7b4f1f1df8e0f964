"""Ranks that agree, and failures that surface: functions run on every rank.

``auto_checks`` runs in a plain gloo group; ``cli_run`` runs ``landscape`` the way torchrun
would (the torchrun variables set, the CLI initializes the group), with a command line per rank
so that rank 1 alone can get a bad file. Data and model specs for the command lines are the
module-level functions below (``tests.distributed.agreement_workers:...``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from tests.distributed.workers import BATCH, _run_checks, classification_problem

# --------------------------------------------------------------------------- method="auto"


def auto_checks(rank: int, world: int) -> dict:
    """method="auto" on each rank's share of the data: the same choice everywhere, timed on
    rank 0 only; a calibration that fails on rank 0 fails on every rank."""
    from analysis import HessianOperator
    from analysis.data import as_data

    def agreed():
        model, x, y = classification_problem()
        forwards = {"n": 0}
        model.register_forward_pre_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
        op = HessianOperator(model, "cross_entropy", as_data((x, y), batch_size=BATCH, shard=True))
        before = forwards["n"]  # the operator's own checks ran forwards already
        method = op.resolve_method()
        calibration = forwards["n"] - before
        torch.manual_seed(0)
        hv = op @ torch.randn(op.shape[0], dtype=torch.float64)
        return {"method": method, "timings": op.auto_choice.timings,
                "forwards": calibration, "hv": hv}

    def failing_on_rank0():
        model, x, y = classification_problem()
        op = HessianOperator(model, "cross_entropy", as_data((x, y), batch_size=BATCH, shard=True))
        if rank == 0:  # after the operator's own checks: only the calibration fails
            def broken(*_):
                raise RuntimeError("deliberate calibration failure on rank 0")

            model.register_forward_pre_hook(broken)
        try:
            op.resolve_method()
        except RuntimeError as e:
            return str(e)
        return None

    return _run_checks({"agreed": agreed, "failing_on_rank0": failing_on_rank0})


# --------------------------------------------------------------------------- the CLI


def cli_run(rank: int, world: int, argvs: list[list[str]]) -> dict[str, Any]:
    """``landscape`` with this rank's command line; returns the exit code, both streams and the
    seconds it took."""
    import contextlib
    import io

    import torch.distributed as dist

    from landscape.cli import main

    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argvs[rank])
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "seconds": time.perf_counter() - t0, "initialized_after": dist.is_initialized()}


def build():
    return classification_problem()[0]


def data():
    _, x, y = classification_problem()
    return (x, y)


def data_raising_on_rank1():
    """Bad data on rank 1: its data function fails."""
    if os.environ.get("RANK") == "1":
        raise OSError("deliberate: /data/shard.npz is unreadable on rank 1")
    return data()


def data_smaller_on_rank1():
    """Each node read its own copy, and rank 1's is shorter."""
    x, y = data()
    return (x[:40], y[:40]) if os.environ.get("RANK") == "1" else (x, y)


def data_bad_labels_on_rank1():
    """Rank 1's share (batches 1, 3, 5 of 8 samples) holds a label out of range: the failure
    comes in the middle of the run, on rank 1 only, while rank 0 waits in a collective."""
    x, y = data()
    if os.environ.get("RANK") == "1":
        y = y.clone()
        y[BATCH + 2] = 7  # 3 classes
    return (x, y)
