"""``method="auto"`` of the Hessian operator: choose the product method on the user's first product.

The three exact product methods of :class:`~analysis.HessianOperator` cost differently
on different models and devices (forward-mode AD is slow for some operators and missing for
others; the cached graph skips the forward and first backward pass but holds the graph of every
batch). :func:`choose_method` decides at the first product, on its first batch, **with the
user's own vector**, at the cost of at most one extra product of that batch:

1. the first-order graph of the first batch is built (timed; the bytes it saves for backward
   are measured), unless :meth:`~analysis.HessianOperator.gradient` built it already;
2. one backward through it with the user's vector (timed): this **is** the first batch's
   product, which the user's product keeps. Double backward's cost is the sum of the two
   (that is what it computes: ``t_build + t_backward``, derived, not run again); the cached
   graph's is the backward alone;
3. forward-over-reverse once on the same batch and vector (timed): the one extra product.

The fastest is kept (ties: cached graph, then double backward, then forward-over-reverse); each
method runs once (the first call of forward-over-reverse includes one-time costs, up to twice
its later calls on a CPU, which favours the others at a near tie). The choice, the timings and
the reasons are recorded in :class:`AutoChoice`.

* ``"cached-graph"`` applies to in-memory data (a tensor pair or a list of batches) when at
  least the first batch's graph is estimated to fit in the cache budget (:func:`cache_budget`:
  :data:`CACHE_FRACTION`, a sixteenth, of the memory available on the device, or
  :data:`CACHE_BYTES` when set): the bytes of the tensors the first batch's graph saves for
  backward (parameters and inputs excluded, they are held anyway), scaled by each batch's loss
  terms. The first batches whose graphs fit together keep them (:func:`graphs_fit`,
  :attr:`AutoChoice.cache_batches`); the others build theirs at every product, so the cached
  graph's timing is the backward plus the first batch's build times their share of the loss
  terms. When it wins, the first batch's graph is kept for the products.
* when the first use is a block product ``op @ V``, the same is done on the first block of
  columns (one backward per column through the graph, ``vmap`` over forward-over-reverse);
  timings are per column.
* errors: a ``NotImplementedError`` (torch: no forward-mode or double-backward derivative) makes
  a method unavailable (its reason recorded in :attr:`AutoChoice.skipped`); a ``RuntimeError``
  or ``TypeError`` is tried once more on the same batch and vector: the same error again means
  the method cannot run on this model (skipped), anything else, a call that then succeeds
  included, is the user's loss or model failing and is **raised**, never swallowed.

Timings include the device synchronization on CUDA. The extra product is not counted in
``num_matvecs``.
"""

from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import broadcast_object, get_rank, is_distributed
from ..host_memory import proc_kib
from ..results import Result

__all__ = ["CACHE_FRACTION", "available_bytes", "first_graph", "graphs_fit", "saved_bytes",
           "tensors_of"]

#: Graph memory (bytes) up to which ``"auto"`` considers the cached graph for several batches;
#: ``None`` (default): :data:`CACHE_FRACTION` of the memory available at the calibration.
CACHE_BYTES: int | None = None

#: The share of the device's available memory that the cached graphs may take under ``"auto"``
#: (the first batches whose graphs fit keep them; was 0.25 and all-or-nothing: at 11M
#: parameters the 4 graphs of 64 CIFAR images each took 2.2 GB, 1.71x the leanest peer's peak).
CACHE_FRACTION = 0.0625

#: The budget where the available memory cannot be read (a device other than CPU and CUDA).
FALLBACK_CACHE_BYTES = 2 * 2**30


@dataclass(frozen=True, repr=False)
class AutoChoice(Result):
    """What ``method="auto"`` chose and why.

    Attributes:
        method: the method kept (the fastest that ran).
        timings: seconds of one product on the first batch, per method that could run (per
            column for ``block > 1``): ``"cached-graph"`` the backward through the first
            batch's graph (plus, when not every graph fits, the build times the share of the
            loss terms whose graphs are rebuilt), ``"double-backward"`` that backward plus the graph's build (derived:
            see :attr:`derived`), ``"forward-over-reverse"`` its one call.
        skipped: the reason per method that was not timed (not available on the model, the
            cached graphs would not fit in the cache budget, or the data is a DataLoader).
        graph_bytes: the estimated memory of the cached graphs of all batches (0 if not
            estimated).
        cache_batches: under ``"cached-graph"``, how many batches (the first ones) keep their
            graph: those whose graphs fit in the cache budget together; the others build
            theirs at every product, as double backward does (0 for the other methods).
        cache_budget: the bytes those graphs were allowed (:func:`cache_budget`; 0 if not
            needed: one batch, or a DataLoader).
        block: columns of the timed products (1: matrix-vector products; more: the batched
            variants of ``op @ V``, the timings then per column).
        derived: the methods whose timing was derived from the others' instead of run
            (``"double-backward"``: its product is the graph build and the backward, both
            timed).
        extra_products: products of the first batch computed only to choose (1 when
            forward-over-reverse was timed next to the graph, more when a failing call was
            tried again, 0 when it could not run).
    """

    method: str
    timings: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    graph_bytes: int = 0
    cache_batches: int = 0
    block: int = 1
    cache_budget: int = 0
    derived: tuple = ()
    extra_products: int = 0


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
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    if kib is not None:
        return kib * 1024
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


#: The tie-break order of the methods (the cached graph, when it fits, first).
_ORDER = ["cached-graph", "double-backward", "forward-over-reverse"]


def _timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn()`` (with the device synchronized around it)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class _Unavailable(Exception):
    """A product method that cannot run on the model (the reason is the message)."""


def _attempt(fn, device: torch.device, calls: list) -> float:
    """``_timed(fn)`` under the error rule of the module docstring: ``_Unavailable`` for a
    ``NotImplementedError`` or for a ``RuntimeError`` / ``TypeError`` that the same call raises
    again; any other error (and a failure that does not repeat) is raised. ``calls`` counts the
    calls made."""
    calls.append(1)
    try:
        return _timed(fn, device)
    except NotImplementedError as err:
        raise _Unavailable(f"{type(err).__name__}: {err}") from err
    except (RuntimeError, TypeError) as err:
        calls.append(1)
        try:
            _timed(fn, device)
        except type(err) as again:
            if str(again) == str(err):
                raise _Unavailable(f"{type(err).__name__}: {err}") from err
            raise err from again
        raise  # it ran the second time: the first failure was the user's loss or model


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
    """The tensors in a nested tuple / list / dict (inputs, targets)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def first_graph(op, state: dict, x: Any, y: Any, weight: float, calls: list | None = None):
    """The first-order graph of ``op``'s first batch, built once per model state.

    For in-memory data it is kept as batch 0's cached graph (``op._graphs[0]``) with its build
    time and saved bytes, so that :meth:`~analysis.HessianOperator.gradient` and the
    choice share it; a DataLoader's is built each call. Errors follow the rule of the module
    docstring.

    Returns:
        ``(entry, build_seconds, saved_bytes)``, or ``(None, reason, 0)`` when the graph
        cannot be built on this model (no double-backward derivative).
    """
    calls = [] if calls is None else calls
    cached = op._cached is not None
    if cached:
        op._prepare_signature()  # a changed model drops the graph and its measurements
        if 0 in op._graphs and op._first_graph_stats is not None:
            return (op._graphs[0], *op._first_graph_stats)
    primals = {n: state[n] for n in op._names}
    exclude = [*state.values(), *tensors_of(x), *tensors_of(y)]
    box: dict = {}

    def build():
        box["entry"], box["bytes"] = saved_bytes(
            lambda: op._first_order_graph(primals, state, x, y, weight), exclude)

    try:
        seconds = _attempt(build, op.device, calls)
    except _Unavailable as why:
        return None, str(why), 0
    if cached:
        op._graphs[0] = box["entry"]
        op._first_graph_stats = (seconds, box["bytes"])
    return box["entry"], seconds, box["bytes"]


def graphs_fit(op, first_bytes: int) -> tuple[int, int, int, str]:
    """How many of ``op``'s batches, in order, keep their graph within the cache budget:
    ``(count, estimated_bytes, budget, reason)``.

    Batch ``b``'s graph is estimated as ``first_bytes * t_b / t_0`` (``t_b`` its loss terms);
    ``count`` is the largest ``c`` with ``sum_{b < c} bytes_b <= budget`` (:func:`cache_budget`),
    ``estimated_bytes`` the graphs of all batches. One batch: ``count = 1``, budget 0 (its graph
    is built by any method). A DataLoader (re-iterated) or microbatches: ``count = 0``; the
    reason says why when ``count`` is 0."""
    if op._cached is None:
        return 0, 0, 0, "the data is a DataLoader (re-iterated, not cached)"
    if op.microbatch_size is not None:
        return 0, 0, 0, (f"microbatch_size={op.microbatch_size} bounds the working memory "
                         "by one slice; the cached graphs would keep them all")
    size0 = max(1, op._cached[0][2])
    sizes = [first_bytes * c[2] / size0 for c in op._cached]
    total = int(sum(sizes))
    if len(op._cached) == 1:
        return 1, total, 0, ""
    budget = cache_budget(op.device)
    count, held = 0, 0.0
    while count < len(sizes) and held + sizes[count] <= budget:
        held += sizes[count]
        count += 1
    if count == 0:
        source = "CACHE_BYTES" if CACHE_BYTES is not None else (
            f"{CACHE_FRACTION:g} of the memory available on {op.device}")
        return 0, total, budget, (f"the first batch's graph would take about {int(sizes[0])} "
                                  f"bytes (> the cache budget {budget}: {source})")
    return count, total, budget, ""


def choose_method(op, block: int = 1, v_dict: dict | None = None, *,
                  local: bool = False) -> AutoChoice:
    """Choose ``op``'s product method on its first batch (see the module docstring).

    Under a process group (``torchrun``) rank 0 alone chooses, on its first batch, and its
    :class:`AutoChoice` is broadcast: every rank uses the same method (reproducible, and the
    other ranks do no calibration work; they compute their first product as usual); an error
    on rank 0 is raised on every rank.

    Args:
        op: a :class:`~analysis.HessianOperator` (with ``method="auto"``).
        block: columns per product: ``1`` for matrix-vector products, more for the batched
            variants of ``op @ V`` (timings per column).
        v_dict: the user's tangent(s) ``{name: tensor}`` (``(block, *shape)`` for a block);
            default a seeded random one. The first batch's weighted product with it is left in
            ``op._calibration_part`` for the product to reuse (``None`` on a rank without
            batches).
        local: choose on this process only, without the broadcast (default False).

    Returns:
        :class:`AutoChoice`. When no method can run, the first reason is raised as a
        ``RuntimeError``; an error of the user's loss or model is raised as it is. On a rank
        without batches the choice is ``"forward-over-reverse"`` (its fallback still applies).
    """
    op._calibration_part = None
    if not local and is_distributed():
        return _rank0_choice(op, block, v_dict)
    first = op._first_batch()
    if first is None:
        return AutoChoice(method="forward-over-reverse", skipped={"all": "no local batch"})
    x, y, size, _ = first
    weight = size / op.num_terms if op._cached is not None else float(size)
    if v_dict is None:
        gen = torch.Generator().manual_seed(0)
        V = torch.randn(op.shape[0], block, generator=gen, dtype=torch.float64).to(op.device,
                                                                                    op.dtype)
        v_dict = (dict(zip(op._names, op.space.unflatten(V[:, 0].contiguous()))) if block == 1
                  else op._block_dict(V))
    blk = None if block == 1 else block
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    calls: list = []
    box: dict = {}
    with op._context():
        state = op._state()
        primals = {n: state[n] for n in op._names}
        entry, build_s, first_bytes = first_graph(op, state, x, y, weight, calls)
        count, graph_bytes, budget, reason = graphs_fit(op, first_bytes)
        calls.clear()  # building the graph is the product's own work (or the gradient's)
        if entry is None:
            skipped["cached-graph"] = skipped["double-backward"] = build_s
            count = 0
        else:
            if not count:
                skipped["cached-graph"] = reason
            # the batches past ``count`` build their graph for every product: that share of
            # the loss terms times the first batch's build goes on the cached graph's time
            terms = [c[2] for c in op._cached] if op._cached is not None else [1]
            rebuilt = build_s * sum(terms[count:]) / max(1, sum(terms))

            def backward():
                box["part"] = (op._graph_backward(entry, v_dict, retain=count > 0) if blk is None
                               else op._looped_block(entry, v_dict, blk, keep=count > 0))

            try:
                back_s = _attempt(backward, op.device, calls)
                calls.clear()  # the backward is the first batch's product
                if count:
                    timings["cached-graph"] = (back_s + rebuilt) / block
                timings["double-backward"] = (build_s + back_s) / block
            except _Unavailable as why:
                skipped["cached-graph"] = skipped["double-backward"] = str(why)
                count = 0

        def forward_over_reverse():
            if blk is None:
                out = op._forward_over_reverse(primals, state, v_dict, x, y, weight)
            else:
                out = op._forward_over_reverse_block(primals, state, v_dict, x, y, weight, blk)
            box.setdefault("part", out)

        try:
            timings["forward-over-reverse"] = _attempt(forward_over_reverse, op.device,
                                                       calls) / block
        except _Unavailable as why:
            skipped["forward-over-reverse"] = str(why)
    extra = len(calls) - (1 if "double-backward" not in timings and "part" in box else 0)
    if not timings:
        op.clear_cache()
        raise RuntimeError("method='auto': no product method can run on this model: "
                           + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    best = min(timings, key=lambda m: (timings[m], _ORDER.index(m)))
    if best == "cached-graph":
        _keep_graphs(op, entry, count)
    else:
        op.clear_cache()  # graphs built for the gradient or the choice are not used
    op._calibration_part = box.get("part")
    return AutoChoice(method=best, timings=timings, skipped=skipped, graph_bytes=graph_bytes,
                      cache_batches=count if best == "cached-graph" else 0,
                      block=block, cache_budget=budget,
                      derived=("double-backward",) if "double-backward" in timings else (),
                      extra_products=max(0, extra))


def _keep_graphs(op, entry, count: int) -> None:
    """The cached graph won: the first batch's graph (``entry``) serves the products too, and
    only the first ``count`` batches keep theirs (a gradient may have built more)."""
    op._keep_graph(0, entry)
    op.cache_batches = count
    for key in [k for k in op._graphs if k >= count]:
        del op._graphs[key]


def _rank0_choice(op, block: int, v_dict: dict | None) -> AutoChoice:
    """Rank 0 chooses (:func:`choose_method` with ``local=True``, keeping its first batch's
    product) and broadcasts the choice, or its error, to every rank."""
    choice, error = None, None
    if get_rank() == 0:
        try:
            choice = choose_method(op, block, v_dict, local=True)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    got = broadcast_object((choice, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if got[1] is not None:
        raise RuntimeError(f"method='auto': the calibration failed on rank 0: {got[1]}")
    return got[0]
