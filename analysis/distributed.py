"""Process-group helpers for data-parallel analysis; every function is a no-op on one process.

Consumers accumulate per-rank weighted sums (``sum_b n_b * quantity_b``) and call
:func:`all_reduce_sum` once per quantity; without an initialized process group nothing is
communicated and the value is returned unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as _dist

__all__ = ["is_distributed", "get_rank", "get_world_size", "all_reduce_sum", "is_main_process"]


def is_distributed() -> bool:
    """True when torch.distributed is available, initialized, and has more than one rank."""
    return _dist.is_available() and _dist.is_initialized() and _dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return _dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return _dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and on a single process)."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (unchanged on one process)."""
    if is_distributed():
        _dist.all_reduce(tensor, op=_dist.ReduceOp.SUM)
    return tensor
