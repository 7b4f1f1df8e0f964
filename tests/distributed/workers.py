"""Functions run on every rank by :func:`tests.distributed.launcher.run_ranks`.

Each group of checks shares one spawn (spawned ranks import torch, which is the slow part).
A check records ``("ok", value)`` or ``("error", traceback)`` so that one missing module does not
hide the others; ``("missing", message)`` marks code that has not landed (ImportError).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from analysis import distributed as D


def _run_checks(checks: dict[str, Callable[[], Any]]) -> dict[str, tuple[str, Any]]:
    out: dict[str, tuple[str, Any]] = {}
    for name, check in checks.items():
        try:
            out[name] = ("ok", check())
        except ImportError as e:  # code not landed yet
            out[name] = ("missing", f"{type(e).__name__}: {e}")
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            out[name] = ("error", traceback.format_exc())
        # keep the ranks in step even if one check failed on one rank only
        D.barrier()
    return out


# --------------------------------------------------------------------------- failures


def raise_on_rank_one(rank: int, world: int) -> float:
    """Rank 1 raises at once; rank 0 enters an all-reduce that rank 1 never joins."""
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    t0 = time.perf_counter()
    D.all_reduce_sum(torch.ones(3))
    return time.perf_counter() - t0


def stall_on_rank_one(rank: int, world: int, stall: float) -> float:
    """Rank 1 stays alive but silent for ``stall`` s; rank 0's all-reduce must time out first."""
    if rank == 1:
        time.sleep(stall)
        return stall
    t0 = time.perf_counter()
    try:
        D.all_reduce_sum(torch.ones(3))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"rank 0 gave up after {time.perf_counter() - t0:.1f} s") from e
    return time.perf_counter() - t0


def torchrun_session(rank: int, world: int) -> dict[str, Any]:
    """Run inside a torchrun-like environment: the process group comes from init_from_env."""
    import torch.distributed as dist

    with D.distributed_session(timeout=30) as active:
        x = torch.tensor([float(rank + 1)], dtype=torch.float64)
        D.all_reduce_sum(x)
        obj = D.broadcast_object({"from": D.get_rank(), "payload": [1, 2]} if rank == 0 else None)
        gathered = D.all_gather_object(rank * 10)
        D.barrier()
        inside = (active, D.is_distributed(), D.get_rank(), D.get_world_size(),
                  D.is_main_process())
        # replicated-state check: identical passes, differing raises on every rank
        D.assert_same_across_ranks(torch.arange(4, dtype=torch.float64), "same")
        try:
            D.assert_same_across_ranks(torch.full((4,), float(rank)), "differs")
            differs = None
        except RuntimeError as e:
            differs = str(e)
        # a synchronized ascent gradient is the average of the ranks' gradients
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float32))
        p.grad = torch.full((3,), float(rank + 1), dtype=torch.float64)
        q.grad = torch.full((2,), 2.0 * (rank + 1))
        D.all_reduce_gradients([p, q])
        grads = (p.grad.tolist(), q.grad.tolist())
    return {
        "inside": inside, "sum": x.item(), "obj": obj, "gathered": gathered,
        "differs": differs, "grads": grads, "after": dist.is_initialized(),
    }


# --------------------------------------------------------------------------- analysis
