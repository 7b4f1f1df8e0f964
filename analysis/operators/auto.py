"""``method="auto"`` of the Hessian operator: time the product methods on the first batch.

The three product methods of :class:`~analysis.hessian.HessianOperator` cost differently on
different models and devices (forward-mode AD is slow for some operators and missing for
others; the cached graph skips the forward and first backward pass but holds the graph of every
batch). :func:`choose_method` measures instead of guessing: on the first batch it runs one
untimed warm-up and one timed product of each applicable method and keeps the fastest.

* ``"forward-over-reverse"`` and ``"double-backward"`` always apply;
* ``"cached-graph"`` applies to in-memory data (a tensor pair or a list of batches) when the
  graphs of all batches are estimated to fit in :data:`CACHE_BYTES`: the bytes of the tensors
  the first batch's graph saves for backward (parameters and inputs excluded, they are held
  anyway), scaled by each batch's loss terms. Its time is that of one backward through the
  graph (the graph is built once and reused by every product).
* when the first use is a block product ``op @ V``, the batched variants are timed instead, on a
  block of that many columns (``vmap`` over forward-over-reverse, one batched double backward,
  a loop of backward passes through the cached graph), per column;
* a method that raises ``NotImplementedError`` or ``RuntimeError`` on the model (a module
  without a forward-mode derivative, ``torch.func`` limits) is skipped, its reason recorded.

The calibration costs a few products on one batch, once per operator, and is not counted in
``num_matvecs``. Timings include the device synchronization on CUDA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..results import Result

__all__ = ["AutoChoice", "choose_method", "CACHE_BYTES"]

#: Graph memory up to which ``"auto"`` considers the cached graph for several batches.
CACHE_BYTES = 2 * 2**30


@dataclass(frozen=True, repr=False)
class AutoChoice(Result):
    """What ``method="auto"`` chose and why.

    Attributes:
        method: the method kept (the fastest that ran).
        timings: seconds of one product on the first batch (the smaller of two), per method
            that ran.
        skipped: the reason per method that was not timed (failed on the model, or the cached
            graphs would not fit in :data:`CACHE_BYTES`, or the data is a DataLoader).
        graph_bytes: the estimated memory of the cached graphs of all batches (0 if not
            estimated).
        block: columns of the timed products (1: matrix-vector products; more: the batched
            variants of ``op @ V``, the timings then per column).
    """

    method: str
    timings: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    graph_bytes: int = 0
    block: int = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int = 2) -> float:
    """The smallest of ``repeats`` timings of ``fn()`` (seconds) after one untimed warm-up call
    (the minimum: other work on the machine only ever adds time)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _saved_bytes(build, exclude: list[torch.Tensor]) -> tuple[Any, int]:
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


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _candidates(op, state, v_dict, x, y, weight, skipped: dict, block: int) -> tuple[dict, int]:
    """The applicable methods as zero-argument products on the first batch (of a ``(n, block)``
    block of tangents for ``block > 1``, as :meth:`HessianOperator.matmat` computes them), and
    the estimated bytes of all cached graphs."""
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
        return cands, 0
    exclude = [*state.values(), *_tensors(x), *_tensors(y)]
    try:
        entry, first = _saved_bytes(lambda: op._first_order_graph(primals, state, x, y, weight),
                                    exclude)
    except (NotImplementedError, RuntimeError) as err:  # double backward fails alike
        skipped["cached-graph"] = f"{type(err).__name__}: {err}"
        return cands, 0
    size0 = max(1, op._cached[0][2])
    total = int(first * sum(c[2] for c in op._cached) / size0)
    if len(op._cached) > 1 and total > CACHE_BYTES:
        skipped["cached-graph"] = (f"the cached graphs would take about {total} bytes "
                                   f"(> CACHE_BYTES = {CACHE_BYTES})")
    else:
        if block == 1:
            cands["cached-graph"] = lambda: op._graph_backward(entry, v_dict, retain=True)
        else:  # matmat loops over the columns through the cached graph
            cols = [{k: t[i] for k, t in v_dict.items()} for i in range(block)]
            cands["cached-graph"] = lambda: [op._graph_backward(entry, c, retain=True)
                                             for c in cols]
    return cands, total


def choose_method(op, block: int = 1) -> AutoChoice:
    """Time one product of each applicable method on ``op``'s first batch; keep the fastest.

    Args:
        op: a :class:`~analysis.hessian.HessianOperator` (with ``method="auto"``).
        block: columns per product: ``1`` times matrix-vector products, more times the batched
            variants of ``op @ V`` on a block of that many columns (timings per column).

    Returns:
        :class:`AutoChoice`. When every method fails, the first error is raised; on a rank
        without batches the choice is ``"forward-over-reverse"`` (the fallback still applies).
    """
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
        cands, graph_bytes = _candidates(op, state, v_dict, x, y, weight, skipped, block)
        for name, fn in cands.items():
            try:
                timings[name] = _timed(fn, op.device) / block
            except (NotImplementedError, RuntimeError, TypeError) as err:  # as matmat catches
                errors.append(err)
                skipped[name] = f"{type(err).__name__}: {err}"
    if not timings:
        raise errors[0]
    best = min(timings, key=timings.get)
    return AutoChoice(method=best, timings=timings, skipped=skipped, graph_bytes=graph_bytes,
                      block=block)
