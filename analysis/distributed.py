"""Process-group helpers for data-parallel analysis; every function is a no-op on one process.

Consumers accumulate per-rank weighted sums (``sum_b n_b * quantity_b``) and call
:func:`all_reduce_sum` once per quantity; without an initialized process group nothing is
communicated and the value is returned unchanged.

Life cycle under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``)::

    with distributed_session() as distributed:   # False (and nothing done) without torchrun
        ...                                       # sharded work; rank 0 prints and writes
    # the process group is destroyed on exit, also on an exception

:func:`init_from_env` picks NCCL when CUDA is available and gloo otherwise, binds the process to
``cuda:LOCAL_RANK`` and sets a finite collective timeout, so a rank that dies makes the others
fail with an error after ``timeout`` instead of waiting forever.

Sharpness-aware optimizers under ``DistributedDataParallel``: DDP all-reduces gradients in hooks
fired by ``loss.backward()``; hooks do not fire for ``torch.autograd.grad`` / ``torch.func``,
which is why the curvature code all-reduces explicitly. SAM's first (ascent) pass is usually run
inside ``model.no_sync()`` so each rank ascends along its own batch gradient (per-rank
m-sharpness, as in Foret et al. 2021); :func:`all_reduce_gradients` synchronizes that ascent
gradient instead when the global-batch ascent is wanted.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as _dist

__all__ = [
    "is_distributed", "get_rank", "get_world_size", "all_reduce_sum", "is_main_process",
    "init_from_env", "shutdown", "distributed_session", "launched_by_torchrun",
    "barrier", "broadcast_object", "all_gather_object", "all_reduce_gradients",
    "assert_same_across_ranks", "default_device", "find_free_port", "DEFAULT_TIMEOUT",
    "RanksFailed", "all_ranks_succeed", "weights_fingerprint", "check_same_weights",
    "torchrun_environment_complete", "FINGERPRINT_SLICE",
]

T = TypeVar("T")

#: Collective timeout used by :func:`init_from_env` unless one is given (finite on purpose).
DEFAULT_TIMEOUT = timedelta(minutes=10)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# True when init_from_env created the default process group (shutdown only destroys ours)
_OWNED = False


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


# --------------------------------------------------------------------------- life cycle


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True when ``RANK`` and ``WORLD_SIZE`` are set (``torchrun`` / ``torch.distributed.run``)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def torchrun_environment_complete(environ: dict[str, str] | None = None) -> bool:
    """True when every variable torchrun sets for a worker is present (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). A stray ``RANK`` alone
    is not a torchrun worker: nothing may be silenced because of it."""
    env = os.environ if environ is None else environ
    return all(env.get(name) for name in _TORCHRUN_VARS)


def _env_int(env: dict[str, str] | os._Environ, name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (``LOCAL_RANK`` defaults to 0), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", _env_int(os.environ, "LOCAL_RANK", 0))
    return torch.device("cpu")


def init_from_env(
    backend: str | None = None,
    timeout: timedelta | float | None = None,
) -> bool:
    """Initialize the default process group from the ``torchrun`` environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (default 0), ``MASTER_ADDR`` and
    ``MASTER_PORT``; sets the CUDA device to ``LOCAL_RANK`` when CUDA is available and
    initializes with ``init_method="env://"``.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default ``"nccl"`` if CUDA is available else
            ``"gloo"``.
        timeout: collective timeout (a ``timedelta`` or seconds); default
            :data:`DEFAULT_TIMEOUT` (10 minutes). Finite, so that a rank that fails makes the
            others raise instead of hanging forever.

    Returns:
        True if a process group is initialized on return (created here, or already present);
        False, having done nothing, when not launched by ``torchrun``.

    Raises:
        ValueError: a torchrun variable is malformed or missing, or ``backend`` is unknown.
        RuntimeError: torch.distributed is not available in this build of PyTorch.
    """
    global _OWNED
    if _dist.is_available() and _dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if not _dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    env = os.environ
    rank = _env_int(env, "RANK")
    world = _env_int(env, "WORLD_SIZE")
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise ValueError(f"environment variable {name} is not set (launch with torchrun)")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo", "mpi", "ucc"):
        raise ValueError(f"unknown backend {backend!r}; use 'nccl' (GPU) or 'gloo' (CPU)")
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA, which is not available; use 'gloo'")
    timeout = _as_timedelta(timeout)
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices"
            )
        torch.cuda.set_device(local_rank)
    _dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout
    )
    _OWNED = True
    return True


def _as_timedelta(timeout: timedelta | float | None) -> timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, timedelta):
        out = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        out = timedelta(seconds=float(timeout))
    else:
        raise TypeError(f"timeout must be a timedelta or seconds, got {type(timeout).__name__}")
    if out.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return out


def shutdown() -> None:
    """Destroy the default process group if :func:`init_from_env` created it (else no-op)."""
    global _OWNED
    if _OWNED and _dist.is_available() and _dist.is_initialized():
        _dist.destroy_process_group()
    _OWNED = False


@contextlib.contextmanager
def distributed_session(
    backend: str | None = None, timeout: timedelta | float | None = None
) -> Iterator[bool]:
    """Context manager: :func:`init_from_env` on entry, :func:`shutdown` on exit.

    Yields True when a process group is active inside the block. A group that existed before
    entry is left alone on exit; one created here is destroyed even if the block raises.
    """
    created = not (_dist.is_available() and _dist.is_initialized())
    active = init_from_env(backend=backend, timeout=timeout)
    try:
        yield active
    finally:
        if created and active:
            shutdown()


# --------------------------------------------------------------------------- collectives


def barrier() -> None:
    """Wait for all ranks (no-op on one process)."""
    if is_distributed():
        if _dist.get_backend() == "nccl":
            _dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            _dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects; identity on one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """List of every rank's ``obj`` in rank order (``[obj]`` on one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    _dist.all_gather_object(out, obj)
    return out


def all_reduce_gradients(
    params: Iterable[torch.nn.Parameter] | torch.nn.Module, average: bool = True
) -> None:
    """All-reduce ``.grad`` of ``params`` across ranks in place (one collective per dtype/device).

    Use it for a *synchronized* SAM ascent under DDP: run the first forward/backward inside
    ``model.no_sync()`` (so DDP does not reduce), then call this before ``first_step`` so that
    every rank ascends along the global-batch gradient ``g = (1/world) sum_r g_r`` instead of its
    own (per-rank m-sharpness, m = per-rank batch). Parameters without a gradient are skipped
    (every rank must have the same set). No-op on one process.

    Args:
        params: parameters, or a module (its ``parameters()``; a DDP wrapper works too).
        average: divide the sum by the world size (default True, as DDP does).
    """
    if not is_distributed():
        return
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    world = get_world_size()
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        _dist.all_reduce(flat, op=_dist.ReduceOp.SUM)
        if average:
            flat.div_(world)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def assert_same_across_ranks(tensor: torch.Tensor, name: str = "tensor", rtol: float = 0.0) -> None:
    """Raise RuntimeError unless ``tensor`` is identical (or within ``rtol``) on every rank.

    Checks replicated state, e.g. the Lanczos basis or an optimizer's momentum, elementwise:
    ``max_r t_r - min_r t_r <= rtol * max_r |t_r|`` (two all-reduces of the tensor's size).
    No-op on one process.
    """
    if not is_distributed():
        return
    t = tensor.detach().reshape(-1)
    lo, hi = t.clone(), t.clone()
    _dist.all_reduce(lo, op=_dist.ReduceOp.MIN)
    _dist.all_reduce(hi, op=_dist.ReduceOp.MAX)
    bad = (hi - lo) > rtol * torch.maximum(hi.abs(), lo.abs())
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise RuntimeError(
            f"{name} differs across ranks (checked on rank {get_rank()}): {int(bad.sum())} of "
            f"{t.numel()} entries, e.g. entry {i} in [{lo[i].item():.17g}, {hi[i].item():.17g}]"
        )


def find_free_port() -> int:
    """A TCP port on localhost that is free right now (for ``MASTER_PORT`` in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- agreement


class RanksFailed(RuntimeError):
    """Raised on every rank by :func:`all_ranks_succeed` when a step failed on some rank.

    Attributes:
        step: what the ranks were doing.
        failures: ``(rank, exception type name, first line of its message)`` per failed rank.
    """

    def __init__(self, step: str, failures: list[tuple[int, str, str]]):
        self.step = step
        self.failures = failures
        ranks = ", ".join(str(r) for r, _, _ in failures)
        detail = "; ".join(f"rank {r}: {kind}: {msg}" for r, kind, msg in failures)
        super().__init__(f"{step} failed on rank{'s' if len(failures) > 1 else ''} {ranks}: "
                         f"{detail}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def all_ranks_succeed(step: str) -> Iterator[None]:
    """Context manager: a collective agreement that the block succeeded on every rank.

    Every rank runs the block, then the ranks exchange whether it raised (one
    ``all_gather_object``). If it raised anywhere, every rank raises :class:`RanksFailed`
    naming the failed ranks and their messages (chained from the rank's own exception), so a
    failure on rank 1 is reported by rank 0 too and no rank is left waiting in a later
    collective. Every rank must enter the block. Without a process group the block's exception
    propagates unchanged.

    Args:
        step: what the block does, for the message (e.g. ``"loading the checkpoint"``).

    Raises:
        RanksFailed: the block raised an ``Exception`` on at least one rank.
    """
    if not is_distributed():
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised
        error = exc
    mine = None if error is None else (get_rank(), type(error).__name__, _first_line(error))
    failures = [f for f in all_gather_object(mine) if f is not None]
    if failures:
        raise RanksFailed(step, failures) from error


def weights_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """An exact, order-independent fingerprint of a model's parameters and floating-point
    buffers (``named_parameters`` then ``named_buffers`` order), as an int64 tensor.

    Each tensor is cast to float64 and its bit patterns split into four 16-bit chunks; per
    chunk the plain sum and the position-weighted sum ``sum_i c_i * (1 + i mod 997)`` are kept
    (8 integers per tensor). Integer sums are exact and do not depend on the summation order,
    so equal weights give equal fingerprints on any device, a single changed bit changes a
    plain sum, and a permutation changes a weighted one. Sharded DTensors (FSDP2) give the
    fingerprint of the full tensor."""
    parts = []
    tensors = [t for _, t in model.named_parameters()]
    tensors += [b for _, b in model.named_buffers() if b.is_floating_point()]
    for t in tensors:
        t = t.detach()
        if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): the full tensor it stands for
            t = t.full_tensor()
        flat = t.reshape(-1)
        sums = torch.zeros(8, dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), FINGERPRINT_SLICE):  # bounded temporaries
            bits = flat[start:start + FINGERPRINT_SLICE].to(torch.float64).view(torch.int64)
            pos = 1 + (start + torch.arange(bits.numel(), device=bits.device,
                                            dtype=torch.int64)) % 997
            for k in range(4):  # sums of 16-bit chunks: no overflow below 1.4e13 entries
                chunk = (bits >> (16 * k)) & 0xFFFF
                sums[2 * k] += chunk.sum()
                sums[2 * k + 1] += (chunk * pos).sum()
        parts.append(sums.cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


#: Entries per slice of :func:`weights_fingerprint` (its temporaries: about 32 bytes per entry).
FINGERPRINT_SLICE = 1 << 22


def check_same_weights(model: torch.nn.Module, what: str = "the model's weights") -> None:
    """Refuse weights that differ across ranks (e.g. each node read its own file under the same
    path): ValueError on every rank naming the ranks whose :func:`weights_fingerprint`
    differs from rank 0's. One ``all_gather_object``; no-op on one process."""
    if not is_distributed():
        return
    prints = all_gather_object(weights_fingerprint(model))
    differ = [r for r, f in enumerate(prints)
              if f.shape != prints[0].shape or not torch.equal(f, prints[0])]
    if differ:
        ranks = ", ".join(str(r) for r in differ)
        raise ValueError(f"{what} differ across ranks: rank{'s' if len(differ) > 1 else ''} "
                         f"{ranks} {'have' if len(differ) > 1 else 'has'} other weights than "
                         "rank 0 (different files under the same path?); every rank must "
                         "load the same weights")
