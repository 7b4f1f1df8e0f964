"""Worst-case and average (adaptive) m-sharpness (Andriushchenko et al. 2023; adaptive: Kwon et
al. 2021, ASAM): the data re-batched into batches of ``m`` samples, each maximized by APGD
(worst case) or averaged over Gaussian noise (average) on its own; the batches' values are
averaged with the weights of the full-data loss, their loss terms ``N_B`` (samples, or the
counted tokens of a language-model loss)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..checks import check_first_batch
from ..data import Data, DataSource, as_data, to_device
from ..evaluation import model_mode, progress_bar, resolve_loss
from ..losses import LossSpec, loss_terms
from ..params import ParameterSpace
from ..precision import autocast_disabled
from ..results import CostedResult
from ._common import (
    Counter,
    Evaluator,
    check_flag,
    check_mode,
    check_model,
    check_positive,
    check_seed,
    nonfinite,
)
from .apgd import apgd, random_start
from .state import preserved_state

__all__ = ["DEFAULT_M"]

#: ``m=None`` in :func:`sharpness` means ``min(DEFAULT_M, N)`` (N: the number of samples).
DEFAULT_M = 128


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"an m-batch would join samples of source batches of different shapes "
                f"{sorted(shapes)} (e.g. padded to different lengths); choose an m that divides "
                "every batch size, or pad the batches to one length"
            )
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def _take(obj: Any, start: int, stop: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[start:stop]
    if isinstance(obj, Mapping):
        return {k: _take(v, start, stop) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(v, start, stop) for v in obj)
    raise TypeError(f"cannot slice a batch of type {type(obj).__name__}")


def _m_batches(source: DataSource, m: int, n_eval: int | None, device, dtype) -> Iterator[tuple[Any, Any]]:
    """Re-batch ``source`` into consecutive batches of exactly ``m`` samples (at most ``n_eval``
    samples in total); a last incomplete batch is dropped. Raises if not one full batch fits.

    Yields ``(x, y, key)`` where ``key = (source batch index, offset)`` names where the m-batch
    starts in the whole data set, so that random draws seeded by ``key`` are the same on one
    process and under data sharding (when source batches are not split across ranks)."""
    xs: list[Any] = []
    ys: list[Any] = []
    have = used = seen = 0
    start = (0, 0)  # (source batch index, offset) where the pending samples begin
    for batch in source:
        if not xs:
            start = (batch.index, 0)
        xs.append(batch.inputs)
        ys.append(batch.targets)
        have += batch.size
        seen += batch.size
        while have >= m and (n_eval is None or used + m <= n_eval):
            x, y = _cat(xs), _cat(ys)
            yield (to_device(_take(x, 0, m), device, dtype), to_device(_take(y, 0, m), device, dtype),
                   start)
            used += m
            have -= m
            # the rest of this source batch starts m samples later (offset within `batch`)
            start = (batch.index, batch.size - have)
            xs, ys = ([_take(x, m, m + have)], [_take(y, m, m + have)]) if have else ([], [])
        if n_eval is not None and used + m > n_eval:
            break
    if used == 0:
        raise ValueError(
            f"m={m} is larger than the number of samples available ({seen}"
            + (f", n_eval={n_eval}" if n_eval is not None else "")
            + "); lower m or pass more data"
        )


@dataclass(frozen=True, repr=False)
class SharpnessResult(CostedResult):
    """Worst-case or average (m-)sharpness.

    Means over batches are weighted like the full-data loss: ``mean_B x_B = sum_B N_B x_B / N``
    with ``N_B`` the loss terms of batch ``B`` (``m`` samples for classification, its counted
    tokens for a language-model loss; :func:`analysis.losses.loss_terms`) and ``N = sum_B N_B``.

    Attributes:
        value: ``mean_B [L_B(w + delta_B) - L_B(w)]`` (worst case: the best ascent found per
            batch; average: the mean over noise draws).
        stderr: standard error of ``value`` over the batches (``nan`` for a single batch):
            ``sqrt(nb / (nb - 1) * sum_B (N_B / N)^2 (x_B - value)^2)`` for ``nb`` batches, the
            usual ``s / sqrt(nb)`` when every batch has the same number of terms.
        loss: ``mean_B L_B(w)``, the unperturbed loss of the batches used.
        perturbed_loss: ``loss + value``.
        kind, rho, adaptive, norm, m, steps, samples, seed, mode: the settings used
            (``steps`` only for the worst case, ``samples`` the noise draws per batch of the
            average).
        num_batches, num_samples: batches of ``m`` samples evaluated and their total.
        batch_values: the per-batch sharpness values.
        forward_passes, backward_passes: batch-level forward and backward calls;
        forward_samples, backward_samples: the samples they covered.
        restarts: extra random-start ascents per batch (worst case).
        lower_bound: True for the worst case: ``value`` is the best ascent found, a lower bound
            of the true maximum (raise ``steps`` or ``restarts`` to tighten it).
        num_terms: ``N``, the loss terms of the batches used (``num_samples`` for
            classification, counted tokens for a language model).
        batch_terms: ``N_B`` of each batch, the weights of the means.
        stderr_reason: why ``stderr`` is ``nan`` (``None`` when it is defined): the metric is a
            mean over batches of ``m`` samples, its sampling unit, which cannot be split.
    """

    value: float
    stderr: float
    loss: float
    perturbed_loss: float
    kind: str
    rho: float
    adaptive: bool
    norm: str
    m: int
    steps: int | None
    samples: int | None
    seed: int
    mode: str | None
    num_batches: int
    num_samples: int
    batch_values: tuple[float, ...]
    restarts: int = 0
    lower_bound: bool = False
    num_terms: int | None = None
    batch_terms: tuple[int, ...] = ()
    stderr_reason: str | None = None


def sharpness(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    *,
    rho: float,
    kind: str = "worst",
    adaptive: bool = True,
    norm: str = "l2",
    m: int | None = None,
    n_eval: int | None = 1024,
    steps: int = 20,
    samples: int = 64,
    init: str = "random",
    eta: float = 0.0,
    seed: int = 0,
    mode: str | None = "eval",
    params: Sequence[str | nn.Parameter] | None = None,
    progress: bool = True,
    restarts: int = 0,
    check_deterministic: bool = True,
) -> SharpnessResult:
    """Worst-case or average (adaptive) m-sharpness (Andriushchenko et al. 2023).

    Worst case: ``mean_B [max_{||delta / c||_p <= rho} L_B(w + delta) - L_B(w)]``, every batch
    ``B`` of ``m`` samples maximized on its own by APGD in ``u = delta / c`` (``steps``
    iterations, step ``2 rho``, momentum 0.75, step halving at :func:`apgd_checkpoints`),
    starting from ``u = 0`` (``init="zero"``) or a random point of norm ``0.1 rho``
    (``init="random"``, default; needed at an exact critical point, where the gradient is zero).
    Every iterate is feasible, so the worst-case value is a **lower bound** of the true maximum
    (``result.lower_bound`` is True): at a critical point the L-inf maximum is attained at a
    vertex of the box (a KKT point) that one ascent can miss by a few percent (2-12% measured on
    small quadratics); ``restarts=k`` runs ``k`` more ascents per batch from random points of
    the ball (uniform in the L-inf box, of norm ``rho / 2`` in L2) and keeps the best.
    Average: ``mean_B mean_k [L_B(w + rho c * z_k) - L_B(w)]``, ``z_k ~ N(0, I)``. ``mean_B``
    weights each batch by its loss terms ``N_B``, as the full-data loss does (``m`` samples for
    classification, the counted tokens of a padded language-model batch; see
    :class:`SharpnessResult`).

    ``c = |w| + eta`` when ``adaptive`` (default, with ``eta = 0``), else ``c = 1``. Adaptive
    sharpness is invariant to rescaling a ReLU layer by ``a`` and the next by ``1 / a``.

    Cost: worst case ``1 + (steps + 1)`` forward and ``steps`` backward passes per batch (one
    forward less with ``init="zero"``); average ``1 + samples`` forward passes per batch.

    Args:
        model: the network; restored exactly afterwards (also on error).
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable returning the batch mean.
        data: ``(X, y)``, a list of batches or a DataLoader; re-batched into batches of ``m``.
        rho: radius (> 0), in units of ``c``.
        kind: ``"worst"`` (default) or ``"average"``.
        adaptive: ``c = |w|`` (default True) or ``c = 1``.
        norm: ``"l2"`` (default) or ``"linf"`` ball (worst case only).
        m: samples (sequences for a language model) per batch (default ``None``: ``min(128, N, n_eval)`` with ``N`` the samples
            this process sees, 128 as Andriushchenko et al.; the choice is the result's ``m``).
        n_eval: use at most this many samples (default 1024; ``None``: all). An incomplete
            last batch is dropped: ``num_samples`` says how many were used, and ``loss`` is the
            loss of those samples (not of the whole data set).
        steps: APGD iterations (default 20).
        samples: noise draws per batch for the average (default 64).
        init: ``"random"`` (default) or ``"zero"`` APGD start.
        eta: added to ``|w|`` in ``c`` when adaptive (ASAM's eta; default 0).
        seed: seed of the private generators (global RNG untouched): the APGD start is drawn
            on the CPU, the average's noise on the model's device (so values for one seed
            differ between CPU and GPU within the statistical error).
        mode: ``"eval"`` (default), ``"train"`` or ``None`` (leave the modules as they are).
        params: restrict the perturbed parameters (see :class:`ParameterSpace`).
        progress: show a progress bar over batches.
        restarts: extra APGD runs per batch from random starts (worst case; default 0). Each
            costs ``steps + 1`` forward and ``steps`` backward passes per batch.
        check_deterministic: refuse, before computing, a model whose forward is random under
            ``mode`` (active dropout, named; or the outputs of the first batch differing
            between two evaluations, see :mod:`analysis.checks`). Default True.

    Returns:
        :class:`SharpnessResult`.

    Raises:
        ValueError: ``rho <= 0``, ``m`` larger than the data, unknown ``kind``/``norm``/``init``,
            a model with no trainable parameters; a first batch the model or the loss cannot
            take (named, with its shapes) or a random forward (see :mod:`analysis.checks`).
        TypeError: arguments of the wrong type; targets of the wrong dtype for the loss.
        FloatingPointError: a non-finite loss (names the batch and the step).
    """
    _check_sharpness_args(model, kind=kind, norm=norm, init=init, rho=rho, m=m, steps=steps,
                          samples=samples, restarts=restarts, n_eval=n_eval, eta=eta,
                          adaptive=adaptive, check_deterministic=check_deterministic, seed=seed,
                          mode=mode)
    loss_fn = resolve_loss(loss_fn)
    space = ParameterSpace(model, params)
    source = as_data(data)
    check_first_batch(model, loss_fn, source, mode, where="sharpness()",
                      deterministic=check_deterministic)
    if m is None:  # a default that fits small data sets
        m = _default_m(source, n_eval)
    if source.is_shuffled:
        warnings.warn(
            "sharpness(): the data is a shuffling DataLoader, so the batches of m samples (and "
            "the value) change from call to call; build the loader with shuffle=False for "
            "reproducible numbers",
            UserWarning,
            stacklevel=2,
        )
    rho = float(rho)
    counter = Counter()
    values: list[float] = []
    losses: list[float] = []
    terms: list[int] = []  # N_B, the weights of the batch means
    with preserved_state(model), model_mode(model, mode), autocast_disabled():
        w0 = space.vector()
        c = (w0.abs() + eta) if adaptive else torch.ones_like(w0)
        ev = Evaluator(model, loss_fn, space, w0, counter)
        batches = _m_batches(source, int(m), n_eval, space.device, space.dtype)
        desc = f"{kind} sharpness"
        for b, (x, y, key) in enumerate(progress_bar(batches, enabled=progress, desc=desc, unit="batch")):
            batch = _MBatch(x, y, m, b,
                            # draws seeded per m-batch of the WHOLE data set: identical under
                            # data sharding
                            ((int(seed) * 1_000_003 + key[0]) * 1_000_003 + key[1]) % (2**63))
            if kind == "worst":
                l0, value = _worst_case(ev, batch, c, rho=rho, norm=norm, steps=int(steps),
                                        init=init, restarts=int(restarts))
            else:
                l0, value = _average(ev, batch, c, rho=rho, samples=int(samples))
            values.append(value)
            losses.append(l0)
            terms.append(loss_terms(loss_fn, x, y, int(m)))
    mean, stderr, mean_loss, nb, num_terms = _batch_statistics(values, losses, terms,
                                                               space.device, source.shard)
    return SharpnessResult(
        value=mean,
        stderr=stderr,
        loss=mean_loss,
        perturbed_loss=mean_loss + mean,
        kind=kind,
        rho=rho,
        adaptive=bool(adaptive),
        norm=norm,
        m=int(m),
        steps=int(steps) if kind == "worst" else None,
        samples=int(samples) if kind == "average" else None,
        seed=int(seed),
        mode=mode,
        num_batches=int(nb),
        num_samples=int(nb) * int(m),
        batch_values=tuple(values),
        **counter.as_dict(),
        restarts=int(restarts) if kind == "worst" else 0,
        lower_bound=kind == "worst",
        num_terms=int(num_terms),
        batch_terms=tuple(terms),
        stderr_reason=None if nb >= 2 else (
            f"one batch of m={int(m)} samples: the metric is a mean over batches of m samples, "
            "so its standard error needs two or more (pass n_eval >= 2m samples, or a smaller m)"),
    )


def _check_sharpness_args(model: Any, *, kind: Any, norm: Any, init: Any, rho: Any, m: Any,
                          steps: Any, samples: Any, restarts: Any, n_eval: Any, eta: Any,
                          adaptive: Any, check_deterministic: Any, seed: Any, mode: Any) -> None:
    """:func:`sharpness`'s argument checks, in the order it has always made them."""
    check_model(model)
    if kind not in ("worst", "average"):
        raise ValueError(f"kind must be 'worst' or 'average', got {kind!r}")
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if init not in ("random", "zero"):
        raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
    check_positive("rho", rho)
    if m is not None:
        check_positive("m", m, integer=True)
    check_positive("steps", steps, integer=True)
    check_positive("samples", samples, integer=True)
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 0:
        raise ValueError(f"restarts must be a non-negative integer, got {restarts!r}")
    if n_eval is not None:
        check_positive("n_eval", n_eval, integer=True)
        if m is not None and n_eval < m:
            raise ValueError(f"m={m} is larger than n_eval={n_eval}; lower m or raise n_eval")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)):
        raise TypeError(f"eta must be a number, got {type(eta).__name__}")
    if not (math.isfinite(float(eta)) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    check_flag("adaptive", adaptive)
    check_flag("check_deterministic", check_deterministic)
    check_seed(seed)
    check_mode(mode)


def _default_m(source: DataSource, n_eval: int | None) -> int:
    """``min(DEFAULT_M, N, n_eval)``; under data sharding the smallest shard decides (one ``m``
    on every rank)."""
    m = min(DEFAULT_M, source.num_samples(), *([n_eval] if n_eval is not None else []))
    if source.shard:
        m = min(dist.all_gather_object(m))
    return m


@dataclass(frozen=True)
class _MBatch:
    """One batch of ``m`` samples: inputs, targets, its size, its index and its seed."""

    x: Any
    y: Any
    m: int
    index: int
    seed: int


def _worst_case(ev: Evaluator, batch: _MBatch, c: torch.Tensor, *, rho: float, norm: str,
                steps: int, init: str, restarts: int) -> tuple[float, float]:
    """``(L_B(w), max L_B(w + delta) - L_B(w))`` of one batch: APGD from the start ``init``,
    then ``restarts`` more ascents from random points, the best value kept."""
    x, y, m, b, space = batch.x, batch.y, batch.m, batch.index, ev.space
    where0 = f"at the unperturbed weights on batch {b}"
    ev.set(None)
    if init == "zero":
        l0_t, g0 = ev.loss_grad(x, y, m, where0)
        start = (float(l0_t), g0)
        u0 = torch.zeros_like(ev.w0)
    else:
        l0_t = ev.loss(x, y, m, where0)
        start = None
        gen = torch.Generator(device="cpu").manual_seed(batch.seed)
        u0 = random_start(space, rho, norm, gen)
    l0 = float(l0_t)
    if not math.isfinite(l0):
        raise nonfinite(l0, where0)

    def objective(delta, need_grad, where):
        ev.set(delta)
        w = f"{where} on batch {b}"
        if need_grad:
            return ev.loss_grad(x, y, m, w)
        return ev.loss(x, y, m, w), None

    best = apgd(objective, c, u0, rho, norm, steps, start=start)
    if restarts:
        rgen = torch.Generator(device="cpu").manual_seed((batch.seed + 7919) % (2**63))
        for _ in range(restarts):
            ur = random_start(space, rho, norm, rgen, scale=1.0 if norm == "linf" else 0.5)
            best = max(best, apgd(objective, c, ur, rho, norm, steps))
    return l0, best - l0


def _average(ev: Evaluator, batch: _MBatch, c: torch.Tensor, *, rho: float,
             samples: int) -> tuple[float, float]:
    """``(L_B(w), mean_k L_B(w + rho c z_k) - L_B(w))`` of one batch, ``z_k ~ N(0, I)`` drawn
    on the model's device from the batch's seed."""
    x, y, m, b, space = batch.x, batch.y, batch.m, batch.index, ev.space
    where0 = f"at the unperturbed weights on batch {b}"
    ev.set(None)
    l0 = float(ev.loss(x, y, m, where0))
    if not math.isfinite(l0):
        raise nonfinite(l0, where0)
    acc = torch.zeros((), dtype=torch.float64, device=space.device)
    noise_gen = torch.Generator(device=space.device).manual_seed(batch.seed)
    for k in range(samples):
        z = torch.randn(space.numel, generator=noise_gen, device=space.device, dtype=space.dtype)
        delta = (rho * c) * z
        ev.set(delta)
        lk = ev.loss(x, y, m, f"at noise draw {k} on batch {b}")
        if not bool(torch.isfinite(lk)):
            raise nonfinite(float(lk), f"at noise draw {k} on batch {b}")
        acc += lk.double()
    return l0, float(acc) / samples - l0


def _batch_statistics(values: list[float], losses: list[float], terms: list[int],
                      device: torch.device, shard: bool) -> tuple[float, float, float, float, float]:
    """``(mean, standard error, mean loss, number of batches, N)`` over the batches (all ranks'
    batches when ``shard``), weighted by the batches' loss terms ``N_B`` (see
    :class:`SharpnessResult`); the standard error is ``nan`` for a single batch.

    When every batch has the same ``N_B`` (classification: ``m`` samples each) the plain means
    are taken, bit for bit the numbers of the unweighted formulas."""
    w = [float(t) for t in terms]
    stats = torch.tensor(
        [sum(values), sum(v * v for v in values), sum(losses), float(len(values)),
         sum(w), sum(t * t for t in w), sum(t * v for t, v in zip(w, values)),
         sum(t * t * v for t, v in zip(w, values)), sum(t * t * v * v for t, v in zip(w, values)),
         sum(t * x for t, x in zip(w, losses))],
        dtype=torch.float64, device=device,
    )
    if shard:
        dist.all_reduce_sum(stats)
    total, total_sq, total_loss, nb, n, n_sq, wv, w2v, w2v2, wl = stats.tolist()
    if n <= 0:
        raise ValueError(
            f"the {int(nb)} batches of m samples hold no loss terms (every label is ignored); "
            "pass data with counted targets"
        )
    if nb * n_sq == n * n:  # equal weights (exact: integer counts): the unweighted formulas
        mean = total / nb
        var = max(total_sq - nb * mean * mean, 0.0) / (nb - 1) / nb if nb > 1 else float("nan")
        return mean, math.sqrt(var), total_loss / nb, nb, n
    mean = wv / n
    var = nb / (nb - 1) * max(w2v2 - 2.0 * mean * w2v + mean * mean * n_sq, 0.0) / (n * n)
    return mean, math.sqrt(var), wl / n, nb, n
