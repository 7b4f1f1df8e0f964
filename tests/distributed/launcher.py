"""Spawn a gloo process group on CPU, run one function on every rank, collect the results.

Every rank gets a finite collective timeout, and the parent a hard deadline after which
the ranks it started are terminated, so a failing rank never hangs the test run.
Results travel back as pickled bytes (plain pickling, no shared-memory tensors).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from analysis.distributed import find_free_port


@dataclass
class RankOutcome:
    """What one rank returned (``value``) or raised (``error``: the formatted traceback)."""

    rank: int
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


class RankFailure(RuntimeError):
    """Raised by :func:`run_ranks` when a rank raised and ``check=True``."""


def _entry(fn, rank, world, init_file, timeout_s, port, args, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        if port is None:
            dist.init_process_group(
                "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )
        else:  # what torchrun sets; fn initializes the group itself (init_from_env)
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        value = fn(rank, world, *args)
        out.put((rank, pickle.dumps(value), None, time.perf_counter() - t0))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out.put((rank, None, traceback.format_exc(), time.perf_counter() - t0))
        return
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - torchrun mode: fn destroyed it already
        pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    *,
    collective_timeout: float = 60.0,
    deadline: float = 150.0,
    check: bool = True,
    torchrun_env: bool = False,
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    Args:
        fn: a module-level (picklable) function.
        collective_timeout: seconds passed as ``timeout`` to ``init_process_group``.
        deadline: seconds after which the parent terminates ranks that have not reported.
        check: raise :class:`RankFailure` with every failing rank's traceback.
        torchrun_env: instead of initializing the group, set the variables torchrun sets
            (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and let
            ``fn`` initialize it (e.g. with ``analysis.distributed.distributed_session``).

    Returns:
        One :class:`RankOutcome` per rank, in rank order.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = find_free_port() if torchrun_env else None
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, init_file, collective_timeout,
                                             port, args, out), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outcomes: dict[int, RankOutcome] = {}
        stop = time.monotonic() + deadline
        while len(outcomes) < world_size:
            left = stop - time.monotonic()
            if left <= 0:
                break
            try:
                rank, blob, err, secs = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outcomes
                        and not p.is_alive() and p.exitcode not in (None, 0)]
                for r in dead:
                    outcomes[r] = RankOutcome(r, error=f"rank {r} died with exit code "
                                              f"{procs[r].exitcode}")
                continue
            outcomes[rank] = RankOutcome(rank, pickle.loads(blob) if blob is not None else None,
                                         err, secs)
        for r, p in enumerate(procs):
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if r not in outcomes:
                outcomes[r] = RankOutcome(r, error=f"rank {r} did not report within {deadline} s "
                                          "(terminated)")
    result = [outcomes[r] for r in range(world_size)]
    if check:
        errors = [f"--- rank {o.rank} ---\n{o.error}" for o in result if o.error]
        if errors:
            raise RankFailure("\n".join(errors))
    return result


def check_values(per_rank: list[dict[str, tuple[str, Any]]], name: str) -> list[Any]:
    """Every rank's value of check ``name`` (from ``workers._run_checks``), asserting that it
    ran on every rank ("ok"), with the rank's traceback otherwise."""
    values = []
    for r, checks in enumerate(per_rank):
        status, value = checks[name]
        assert status == "ok", f"rank {r}, check {name}:\n{value}"
        values.append(value)
    return values
