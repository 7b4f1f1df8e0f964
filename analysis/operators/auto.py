"""``method="auto"`` of the Hessian operator: time the product methods on the first batch.

The three product methods of :class:`~analysis.HessianOperator` cost differently on
different models and devices (forward-mode AD is slow for some operators and missing for
others; the cached graph skips the forward and first backward pass but holds the graph of every
batch). :func:`choose_method` measures instead of guessing: on the first batch it times each
applicable method and keeps the fastest. A cheap product (its first call under
:data:`ONE_CALL_S`) is timed by the smaller of two calls after an untimed warm-up; an expensive
one by the smaller of its first call and one more (two calls, not three, added to the first
product the user waits for; the second call drops one-time costs, which can double the first
call of forward-over-reverse on a CPU), or by its first call alone when that took over twice the
fastest method's time so far. The cached graph is timed first, then double backward, then
forward-over-reverse.

* ``"forward-over-reverse"`` and ``"double-backward"`` always apply;
* ``"cached-graph"`` applies to in-memory data (a tensor pair or a list of batches) when the
  graphs of all batches are estimated to fit in the cache budget (:func:`cache_budget`: a
  quarter of the memory available on the device, or :data:`CACHE_BYTES` when set): the bytes
  of the tensors the first batch's graph saves for backward (parameters and inputs excluded,
  they are held anyway), scaled by each batch's loss terms. Its time is that of one backward through the
  graph (the graph is built once and reused by every product).
* when the first use is a block product ``op @ V``, the batched variants are timed instead, on a
  block of that many columns (``vmap`` over forward-over-reverse, one batched double backward,
  a loop of backward passes through the cached graph), per column;
* a method that raises ``NotImplementedError`` or ``RuntimeError`` on the model (a module
  without a forward-mode derivative, ``torch.func`` limits) is skipped, its reason recorded.

The calibration costs one to three products of each method on one batch, once per operator, and
is not counted in ``num_matvecs``; when the cached graph wins, the first batch's graph built for
the calibration is kept for the products. Timings include the device synchronization on CUDA.
"""

from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import broadcast_object, get_rank, is_distributed
from ..results import Result

__all__ = ["CACHE_FRACTION", "ONE_CALL_S", "available_bytes", "saved_bytes", "tensors_of"]

#: Graph memory (bytes) up to which ``"auto"`` considers the cached graph for several batches;
#: ``None`` (default): :data:`CACHE_FRACTION` of the memory available at the calibration.
CACHE_BYTES: int | None = None

#: The share of the device's available memory that the cached graphs may take under ``"auto"``.
CACHE_FRACTION = 0.25

#: The budget where the available memory cannot be read (a device other than CPU and CUDA).
FALLBACK_CACHE_BYTES = 2 * 2**30

#: Seconds from which one call of a product is its timing (no warm-up, no repeats).
ONE_CALL_S = 1.0


@dataclass(frozen=True, repr=False)
class AutoChoice(Result):
    """What ``method="auto"`` chose and why.

    Attributes:
        method: the method kept (the fastest that ran).
        timings: seconds of one product on the first batch, per method that ran (the smaller
            of its first two calls if the first took at least :data:`ONE_CALL_S`, else the
            smaller of two calls after a warm-up).
        skipped: the reason per method that was not timed (failed on the model, or the cached
            graphs would not fit in the cache budget, or the data is a DataLoader).
        graph_bytes: the estimated memory of the cached graphs of all batches (0 if not
            estimated).
        cache_budget: the bytes those graphs were allowed (:func:`cache_budget`; 0 if not
            needed: one batch, or a DataLoader).
        block: columns of the timed products (1: matrix-vector products; more: the batched
            variants of ``op @ V``, the timings then per column).
    """

    method: str
    timings: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    graph_bytes: int = 0
    block: int = 1
    cache_budget: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_bytes(device: torch.device) -> int | None:
    """Memory available for new allocations on ``device`` (``None`` where it cannot be read):
    CUDA's free memory, or the host's ``MemAvailable`` (Linux) / free physical pages."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def cache_budget(device: torch.device | str = "cpu") -> int:
    """Bytes the cached graphs of all batches may take under ``method="auto"``.

    :data:`CACHE_BYTES` when it is set; else ``CACHE_FRACTION * available`` with ``available``
    the memory free on ``device`` now (CUDA: ``torch.cuda.mem_get_info``; CPU: the host's
    ``MemAvailable``), or :data:`FALLBACK_CACHE_BYTES` where that cannot be read. The budget
    bounds a choice made for speed: pass ``method=`` to the operator to fix the memory instead.

    Raises:
        ValueError: :data:`CACHE_BYTES` is neither ``None`` nor a non-negative int.
    """
    if CACHE_BYTES is not None:
        if isinstance(CACHE_BYTES, bool) or not isinstance(CACHE_BYTES, numbers.Integral) \
                or CACHE_BYTES < 0:
            raise ValueError("analysis.operators.CACHE_BYTES must be None or a "
                             f"non-negative int of bytes, got {CACHE_BYTES!r}")
        return int(CACHE_BYTES)
    available = available_bytes(torch.device(device))
    if available is None:
        return FALLBACK_CACHE_BYTES
    return int(CACHE_FRACTION * available)


#: The order of the timings (the cached graph, usually the fastest, sets the bar first).
_ORDER = ["cached-graph", "double-backward", "forward-over-reverse"]


def _once(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _timed(fn, device: torch.device, repeats: int = 2, best: float = float("inf")) -> float:
    """Seconds of one call of ``fn()``: the smallest of ``repeats`` calls after an untimed
    warm-up, or, when the warm-up took at least :data:`ONE_CALL_S`, the smaller of it and one
    more call (the minimum: other work on the machine only ever adds time); that one more call
    is left out when the first took over twice ``best`` (the fastest method so far: one-time
    costs would have to be more than half of the first call for it to win)."""
    first = _once(fn, device)
    if first >= ONE_CALL_S:
        return first if first > 2 * best else min(first, _once(fn, device))
    return min(_once(fn, device) for _ in range(repeats))


def saved_bytes(build, exclude: list[torch.Tensor]) -> tuple[Any, int]:
    """``build()`` and the bytes of the distinct storages its autograd graph saves, leaving out
    those of ``exclude`` (parameters, buffers, inputs)."""
    skip = set()
    for t in exclude:
        if isinstance(t, torch.Tensor):
            skip.add(t.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = build()
    return out, sum(seen.values())


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or nested dicts / tuples / lists of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def _candidates(op, state, v_dict, x, y, weight, skipped: dict,
                block: int) -> tuple[dict, int, Any, int]:
    """The applicable methods as zero-argument products on the first batch (of a ``(n, block)``
    block of tangents for ``block > 1``, as :meth:`HessianOperator.matmat` computes them), the
    estimated bytes of all cached graphs, the first batch's graph (``None`` if not built) and
    the cache budget (0 if not needed)."""
    primals = {n: state[n] for n in op._names}
    if block == 1:
        cands = {
            "forward-over-reverse": lambda: op._forward_over_reverse(primals, state, v_dict, x,
                                                                     y, weight),
            "double-backward": lambda: op._double_backward(primals, state, v_dict, x, y, weight),
        }
    else:
        cands = {
            "forward-over-reverse": lambda: op._forward_over_reverse_block(
                primals, state, v_dict, x, y, weight, block),
            "double-backward": lambda: op._graph_backward(
                op._first_order_graph(primals, state, x, y, weight), v_dict, retain=False,
                block=block),
        }
    if op._cached is None:
        skipped["cached-graph"] = "the data is a DataLoader (re-iterated, not cached)"
        return cands, 0, None, 0
    exclude = [*state.values(), *tensors_of(x), *tensors_of(y)]
    try:
        entry, first = saved_bytes(lambda: op._first_order_graph(primals, state, x, y, weight),
                                    exclude)
    except (NotImplementedError, RuntimeError) as err:  # double backward fails alike
        skipped["cached-graph"] = f"{type(err).__name__}: {err}"
        return cands, 0, None, 0
    size0 = max(1, op._cached[0][2])
    total = int(first * sum(c[2] for c in op._cached) / size0)
    several = len(op._cached) > 1  # one batch: its graph is built by any method
    budget = cache_budget(op.device) if several else 0
    if several and total > budget:
        source = "CACHE_BYTES" if CACHE_BYTES is not None else (
            f"{CACHE_FRACTION:g} of the memory available on {op.device}")
        skipped["cached-graph"] = (f"the cached graphs would take about {total} bytes "
                                   f"(> the cache budget {budget}: {source})")
        return cands, total, None, budget
    if block == 1:
        cands["cached-graph"] = lambda: op._graph_backward(entry, v_dict, retain=True)
    else:  # matmat loops over the columns through the cached graph
        cols = [{k: t[i] for k, t in v_dict.items()} for i in range(block)]
        cands["cached-graph"] = lambda: [op._graph_backward(entry, c, retain=True)
                                         for c in cols]
    return cands, total, entry, budget


def choose_method(op, block: int = 1, *, local: bool = False) -> AutoChoice:
    """Time one product of each applicable method on ``op``'s first batch; keep the fastest.

    Under a process group (``torchrun``) rank 0 alone times, on its first batch, and its
    :class:`AutoChoice` is broadcast: every rank uses the same method (reproducible, and the
    other ranks do no calibration work); an error on rank 0 is raised on every rank.

    Args:
        op: a :class:`~analysis.HessianOperator` (with ``method="auto"``).
        block: columns per product: ``1`` times matrix-vector products, more times the batched
            variants of ``op @ V`` on a block of that many columns (timings per column).
        local: time on this process only, without the broadcast (default False).

    Returns:
        :class:`AutoChoice`. When every method fails, the first error is raised; on a rank
        without batches the choice is ``"forward-over-reverse"`` (the fallback still applies).
    """
    if not local and is_distributed():
        return _rank0_choice(op, block)
    first = op._first_batch()
    if first is None:
        return AutoChoice(method="forward-over-reverse", skipped={"all": "no local batch"})
    x, y, size, _ = first
    weight = size / op.num_terms if op._cached is not None else 1.0
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(op.shape[0], block, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
    v_dict = (dict(zip(op._names, op.space.unflatten(V[:, 0].contiguous()))) if block == 1
              else op._block_dict(V))
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    errors: list[BaseException] = []
    with op._context():
        state = op._state()
        cands, graph_bytes, entry, budget = _candidates(op, state, v_dict, x, y, weight,
                                                        skipped, block)
        for name in sorted(cands, key=_ORDER.index):  # the usually fastest first
            try:
                best = min(timings.values(), default=float("inf")) * block
                timings[name] = _timed(cands[name], op.device, best=best) / block
            except (NotImplementedError, RuntimeError, TypeError) as err:  # as matmat catches
                errors.append(err)
                skipped[name] = f"{type(err).__name__}: {err}"
    if not timings:
        raise errors[0]
    best = min(timings, key=timings.get)
    if best == "cached-graph" and entry is not None:
        op._keep_graph(0, entry)  # the first batch's graph serves the products too
    return AutoChoice(method=best, timings=timings, skipped=skipped, graph_bytes=graph_bytes,
                      block=block, cache_budget=budget)


def _rank0_choice(op, block: int) -> AutoChoice:
    """Rank 0 times (:func:`choose_method` with ``local=True``) and broadcasts the choice, or
    its error, to every rank."""
    choice, error = None, None
    if get_rank() == 0:
        try:
            choice = choose_method(op, block, local=True)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    got = broadcast_object((choice, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if got[1] is not None:
        raise RuntimeError(f"method='auto': the calibration failed on rank 0: {got[1]}")
    return got[0]
