"""Sharpness metrics: worst-case and average (adaptive, m-) sharpness, Keskar's epsilon-sharpness,
PAC-Bayes flatness, directional sharpness, and a report computing a chosen set in one call.

Definitions (``L_B`` the batch-mean loss, ``c = |w|`` for adaptive metrics, ``c = 1`` otherwise):

* worst-case m-sharpness (Andriushchenko et al. 2023, "A Modern Look at the Relationship between
  Sharpness and Generalization"; adaptive: Kwon et al. 2021, ASAM)::

      S_max = mean_B [ max_{||delta / c||_p <= rho} L_B(w + delta) - L_B(w) ]

  every batch ``B`` of ``m`` samples is maximized on its own by APGD (Croce & Hein 2020):
  ``steps`` iterations of projected ascent in the normalized coordinates ``u = delta / c``
  (step ``2 rho``, momentum 0.75, step halving at the checkpoints
  ``0, 0.22, 0.41, 0.57, ... * steps`` when too few steps improved or the best value stalled).
* average sharpness: ``S_avg = mean_B E_{delta ~ N(0, rho^2 diag(c^2))}[L_B(w + delta) - L_B(w)]``.
* epsilon-sharpness (Keskar et al. 2017): ``100 * (max_{|z_i| <= eps (|w_i| + 1)} L(w + z) - L(w))
  / (1 + L(w))`` on the whole data, maximized by L-BFGS-B (as Keskar et al.) or APGD.
* PAC-Bayes flatness (Jiang et al. 2020, "Fantastic Generalization Measures"): ``1 / sigma'^2``
  with ``sigma'`` the largest noise scale such that ``w + u``, ``u ~ N(0, sigma^2 I)`` (plain) or
  ``u_i ~ N(0, sigma^2 w_i^2 + 1e-6)`` (magnitude-aware), lowers the training accuracy by
  ``target`` (0.1) on average; found by bisection with common random numbers.
* directional sharpness (MSAM paper, Fig. 4): ``L(w + r d / ||d||) - L(w)`` for each radius ``r``.

Every function leaves the model exactly as it found it (parameters, buffers such as BatchNorm
running statistics, ``.grad``, ``requires_grad`` and train/eval flags, bit for bit, also on
error) and never touches the global random number generator. Every result records the number
of forward and backward passes (batch-level calls, and the samples they covered) it used.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..checks import check_first_batch
from ..data import Data, DataSource, as_data, to_device
from ..evaluation import correct_count, forward, model_mode, progress_bar, resolve_loss
from ..losses import LossFn, loss_terms
from ..params import ParameterSpace
from ..results import Result, to_jsonable

#: ``m=None`` in :func:`sharpness` means ``min(DEFAULT_M, N)`` (N: the number of samples).
DEFAULT_M = 128

__all__ = [
    "SharpnessResult",
    "EpsilonSharpnessResult",
    "PacBayesResult",
    "DirectionalSharpnessResult",
    "SharpnessReport",
    "sharpness",
    "epsilon_sharpness",
    "pac_bayes_flatness",
    "directional_sharpness",
    "sharpness_report",
    "preserved_state",
    "apgd_checkpoints",
    "METRICS",
]


#: Metric names understood by :func:`sharpness_report`.
METRICS = ("worst", "average", "epsilon", "pac_bayes", "pac_bayes_mag", "lambda_max", "trace")


# ------------------------------------------------------------------------------------------------
# state preservation, pass counting, data handling
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Context manager: on exit (also on error) restore the model bit for bit.

    Restores every parameter's values (trainable or not), every buffer (BatchNorm running
    statistics and ``num_batches_tracked``), every ``.grad`` (the same tensor object), every
    ``requires_grad`` flag and every submodule's ``training`` flag.
    """
    params = list(model.parameters())
    saved_p = [p.detach().clone() for p in params]
    saved_g = [p.grad for p in params]
    saved_rg = [p.requires_grad for p in params]
    buffers = [b for b in model.buffers() if b is not None]
    saved_b = [b.detach().clone() for b in buffers]
    saved_modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v, g, rg in zip(params, saved_p, saved_g, saved_rg):
                p.copy_(v)
                p.grad = g
                p.requires_grad_(rg)
            for b, v in zip(buffers, saved_b):
                b.copy_(v)
        for m, flag in saved_modes:
            m.training = flag


class _Counter:
    """Counts batch-level forward and backward passes and the samples they covered."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self.forward_samples = 0
        self.backward_samples = 0

    def add(self, n: int, backward: bool) -> None:
        self.forward += 1
        self.forward_samples += n
        if backward:
            self.backward += 1
            self.backward_samples += n

    def as_dict(self) -> dict[str, int]:
        return {
            "forward_passes": self.forward,
            "backward_passes": self.backward,
            "forward_samples": self.forward_samples,
            "backward_samples": self.backward_samples,
        }


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    if integer:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _check_mode(mode: Any) -> None:
    if mode not in (None, "eval", "train"):
        raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
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


def _scalar_loss(loss: Any, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (the batch mean), got {shape} {where}")
    return loss


def _nonfinite(value: float, where: str) -> FloatingPointError:
    return FloatingPointError(
        f"the loss is {value} {where}; the model or loss_fn produced a non-finite value "
        "(check the weights, the inputs and the perturbation radius)"
    )


class _Evaluator:
    """Loss (and gradient) of a batch at ``w0 + delta``, written into the model in place."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, space: ParameterSpace, w0: torch.Tensor,
                 counter: _Counter):
        self.model = model
        self.loss_fn = loss_fn
        self.space = space
        self.w0 = w0
        self.counter = counter

    def set(self, delta: torch.Tensor | None) -> None:
        if delta is None:
            self.space.copy_(self.w0)
        else:
            self.space.copy_(self.w0 + delta)

    def loss(self, x: Any, y: Any, n: int, where: str) -> torch.Tensor:
        with torch.no_grad():
            loss = _scalar_loss(self.loss_fn(forward(self.model, x), y), where)
        self.counter.add(n, backward=False)
        return loss.detach()

    def loss_grad(self, x: Any, y: Any, n: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            loss = _scalar_loss(self.loss_fn(forward(self.model, x), y), where)
            if not loss.requires_grad:
                raise ValueError(f"the loss does not depend on the trainable parameters {where}")
            grads = torch.autograd.grad(loss, self.space.params, allow_unused=True)
        self.counter.add(n, backward=True)
        return loss.detach(), self.space.flatten(list(grads))


# ------------------------------------------------------------------------------------------------
# APGD in the normalized coordinates u = delta / c
# ------------------------------------------------------------------------------------------------
def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step: ``ceil(p_j * steps)`` with ``p_0 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein 2020). For 20 steps:
    ``[5, 9, 12, 14, 16, 18, 19, 20]``."""
    p = [0.0, 0.22]
    w = [0, math.ceil(round(steps * 0.22, 9))]
    while w[-1] < steps and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(round(p[-1] * steps, 9)))  # round: 0.70 * 20 is 14, not 14.000001
    return w[1:]


def _project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return u.clamp(-rho, rho)
    n = torch.linalg.vector_norm(u)
    return u * torch.clamp(rho / n.clamp_min(torch.finfo(u.dtype).tiny), max=1.0)


def _ascent_direction(gu: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return gu.sign()
    n = torch.linalg.vector_norm(gu)
    return gu / n.clamp_min(torch.finfo(gu.dtype).tiny)


def _apgd(
    objective: Callable[[torch.Tensor, bool, str], tuple[torch.Tensor, torch.Tensor | None]],
    c: torch.Tensor,
    u0: torch.Tensor,
    rho: float,
    norm: str,
    steps: int,
    start: tuple[float, torch.Tensor] | None = None,
    momentum: float = 0.75,
) -> float:
    """Maximize ``f(delta)`` over ``||delta / c||_p <= rho`` by APGD; returns the best value seen.

    ``objective(delta, need_grad, where)`` returns ``(loss, grad_delta or None)``. ``start`` is
    ``(f, grad)`` at ``u0`` when already known (zero start: the unperturbed forward/backward).
    """
    checkpoints = set(apgd_checkpoints(steps))
    u = u0
    if start is None:
        f_t, g = objective(c * u, True, "at the APGD start")
        f = float(f_t)
    else:
        f, g = start
    if not math.isfinite(f):
        raise _nonfinite(f, "at the APGD start")
    best_f, best_u, best_g = f, u, g
    u_prev = u
    eta = 2.0 * rho
    n_up = 0
    last_cp = 0
    last_best = best_f
    last_eta = eta
    for k in range(steps):
        s = _ascent_direction(c * g, norm)
        z = _project(u + eta * s, rho, norm)
        a = 1.0 if k == 0 else momentum
        u_new = _project(u + a * (z - u) + (1.0 - a) * (u - u_prev), rho, norm)
        u_prev, u = u, u_new
        need_grad = k < steps - 1
        f_t, g_new = objective(c * u, need_grad, f"at APGD step {k + 1}")
        f_new = float(f_t)
        if not math.isfinite(f_new):
            raise _nonfinite(f_new, f"at APGD step {k + 1}")
        if f_new > f:
            n_up += 1
        f = f_new
        if g_new is not None:
            g = g_new
        if f > best_f:
            best_f, best_u, best_g = f, u, g
        if k + 1 in checkpoints:
            cond1 = n_up < 0.75 * (k + 1 - last_cp)
            cond2 = last_eta == eta and last_best == best_f
            last_cp, last_best, last_eta, n_up = k + 1, best_f, eta, 0
            if cond1 or cond2:
                eta /= 2.0
                u, u_prev, g, f = best_u, best_u, best_g, best_f
    return best_f


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class SharpnessResult(Result):
    """Worst-case or average (m-)sharpness.

    Attributes:
        value: ``mean_B [L_B(w + delta_B) - L_B(w)]`` (worst case: the best ascent found per
            batch; average: the mean over noise draws).
        stderr: standard error of ``value`` over the batches (``nan`` for a single batch).
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
    forward_passes: int
    backward_passes: int
    forward_samples: int
    backward_samples: int
    restarts: int = 0
    lower_bound: bool = False


@dataclass(frozen=True, repr=False)
class EpsilonSharpnessResult(Result):
    """Keskar et al.'s epsilon-sharpness, in percent.

    Attributes:
        value: ``100 * (L_max - L) / (1 + L)``.
        loss: ``L(w)`` on the data; max_loss: ``L_max`` the largest loss found in the box.
        epsilon, method, steps, seed, mode: the settings used.
        num_samples: samples in the data.
        forward_passes, backward_passes, forward_samples, backward_samples: the cost.
    """

    value: float
    loss: float
    max_loss: float
    epsilon: float
    method: str
    steps: int
    seed: int
    mode: str | None
    num_samples: int
    forward_passes: int
    backward_passes: int
    forward_samples: int
    backward_samples: int


@dataclass(frozen=True, repr=False)
class PacBayesResult(Result):
    """Jiang et al.'s PAC-Bayes flatness ``1 / sigma'^2``.

    Attributes:
        flatness: ``1 / sigma^2`` (larger means flatter).
        sigma: the noise scale found (relative to ``|w_i|`` when magnitude-aware).
        deviation: the mean accuracy drop measured at ``sigma``.
        accuracy: the unperturbed training accuracy.
        magnitude_aware, target, draws, seed, mode: the settings used.
        evaluations: number of sigmas tried (bracketing and bisection).
        num_samples, forward_passes, backward_passes, forward_samples, backward_samples: cost.
    """

    flatness: float
    sigma: float
    deviation: float
    accuracy: float
    magnitude_aware: bool
    target: float
    draws: int
    seed: int
    mode: str | None
    evaluations: int
    num_samples: int
    forward_passes: int
    backward_passes: int
    forward_samples: int
    backward_samples: int


@dataclass(frozen=True, repr=False)
class DirectionalSharpnessResult(Result):
    """``L(w + r d / ||d||) - L(w)`` for each radius (MSAM paper, Fig. 4).

    Attributes:
        radii: the radii ``r``; values: the loss differences; losses: ``L(w + r d / ||d||)``.
        loss: ``L(w)``; direction_norm: ``||d||`` of the direction given.
        mode, num_samples, forward_passes, backward_passes, forward_samples, backward_samples.
    """

    radii: tuple[float, ...]
    values: tuple[float, ...]
    losses: tuple[float, ...]
    loss: float
    direction_norm: float
    mode: str | None
    num_samples: int
    forward_passes: int
    backward_passes: int
    forward_samples: int
    backward_samples: int


@dataclass(frozen=True, repr=False)
class SharpnessReport(Result):
    """Several metrics computed by :func:`sharpness_report`.

    Attributes:
        values: ``{metric: headline number}`` (sharpness value, PAC-Bayes flatness,
            ``lambda_max``, trace estimate).
        results: ``{metric: full result object}``.
        seconds: wall-clock seconds per metric.
    """

    values: dict[str, float]
    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": to_jsonable(self.values),
            "results": {k: (v.to_dict() if hasattr(v, "to_dict") else to_jsonable(v))
                        for k, v in self.results.items()},
            "seconds": to_jsonable(self.seconds),
        }

    def __getitem__(self, metric: str) -> float:
        return self.values[metric]


# ------------------------------------------------------------------------------------------------
# worst-case and average sharpness
# ------------------------------------------------------------------------------------------------
def sharpness(
    model: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data | DataSource,
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
    Average: ``mean_B mean_k [L_B(w + rho c * z_k) - L_B(w)]``, ``z_k ~ N(0, I)``.

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
        m: samples per batch (default ``None``: ``min(128, N, n_eval)`` with ``N`` the samples
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
    _check_model(model)
    if kind not in ("worst", "average"):
        raise ValueError(f"kind must be 'worst' or 'average', got {kind!r}")
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if init not in ("random", "zero"):
        raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
    _check_positive("rho", rho)
    if m is not None:
        _check_positive("m", m, integer=True)
    _check_positive("steps", steps, integer=True)
    _check_positive("samples", samples, integer=True)
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 0:
        raise ValueError(f"restarts must be a non-negative integer, got {restarts!r}")
    if n_eval is not None:
        _check_positive("n_eval", n_eval, integer=True)
        if m is not None and n_eval < m:
            raise ValueError(f"m={m} is larger than n_eval={n_eval}; lower m or raise n_eval")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)):
        raise TypeError(f"eta must be a number, got {type(eta).__name__}")
    if not (math.isfinite(float(eta)) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    _check_flag("adaptive", adaptive)
    _check_flag("check_deterministic", check_deterministic)
    _check_seed(seed)
    _check_mode(mode)
    loss_fn = resolve_loss(loss_fn)
    space = ParameterSpace(model, params)
    source = as_data(data)
    check_first_batch(model, loss_fn, source, mode, where="sharpness()",
                      deterministic=check_deterministic)
    if m is None:  # a default that fits small data sets
        m = min(DEFAULT_M, source.num_samples(), *([n_eval] if n_eval is not None else []))
        if source.shard:  # one m on every rank: the smallest shard decides
            m = min(dist.all_gather_object(m))
    if source.is_shuffled:
        warnings.warn(
            "sharpness(): the data is a shuffling DataLoader, so the batches of m samples (and "
            "the value) change from call to call; build the loader with shuffle=False for "
            "reproducible numbers",
            UserWarning,
            stacklevel=2,
        )
    rho = float(rho)
    counter = _Counter()
    values: list[float] = []
    losses: list[float] = []
    with preserved_state(model), model_mode(model, mode):
        w0 = space.vector()
        c = (w0.abs() + eta) if adaptive else torch.ones_like(w0)
        ev = _Evaluator(model, loss_fn, space, w0, counter)
        batches = _m_batches(source, int(m), n_eval, space.device, space.dtype)
        desc = f"{kind} sharpness"
        for b, (x, y, key) in enumerate(progress_bar(batches, enabled=progress, desc=desc, unit="batch")):
            where0 = f"at the unperturbed weights on batch {b}"
            # draws seeded per m-batch of the WHOLE data set: identical under data sharding
            batch_seed = ((int(seed) * 1_000_003 + key[0]) * 1_000_003 + key[1]) % (2**63)
            if kind == "worst":
                ev.set(None)
                if init == "zero":
                    l0_t, g0 = ev.loss_grad(x, y, m, where0)
                    start = (float(l0_t), g0)
                    u0 = torch.zeros_like(w0)
                else:
                    l0_t = ev.loss(x, y, m, where0)
                    start = None
                    gen = torch.Generator(device="cpu").manual_seed(batch_seed)
                    u0 = _random_start(space, rho, norm, gen)
                l0 = float(l0_t)
                if not math.isfinite(l0):
                    raise _nonfinite(l0, where0)

                def objective(delta, need_grad, where, _x=x, _y=y, _b=b):
                    ev.set(delta)
                    w = f"{where} on batch {_b}"
                    if need_grad:
                        return ev.loss_grad(_x, _y, m, w)
                    return ev.loss(_x, _y, m, w), None

                best = _apgd(objective, c, u0, rho, norm, int(steps), start=start)
                if restarts:
                    rgen = torch.Generator(device="cpu").manual_seed((batch_seed + 7919) % (2**63))
                    for _ in range(int(restarts)):
                        ur = _random_start(space, rho, norm, rgen, scale=1.0 if norm == "linf" else 0.5)
                        best = max(best, _apgd(objective, c, ur, rho, norm, int(steps)))
                values.append(best - l0)
            else:
                ev.set(None)
                l0 = float(ev.loss(x, y, m, where0))
                if not math.isfinite(l0):
                    raise _nonfinite(l0, where0)
                acc = torch.zeros((), dtype=torch.float64, device=space.device)
                noise_gen = torch.Generator(device=space.device).manual_seed(batch_seed)
                for k in range(int(samples)):
                    z = torch.randn(space.numel, generator=noise_gen, device=space.device,
                                    dtype=space.dtype)
                    delta = (rho * c) * z
                    ev.set(delta)
                    lk = ev.loss(x, y, m, f"at noise draw {k} on batch {b}")
                    if not bool(torch.isfinite(lk)):
                        raise _nonfinite(float(lk), f"at noise draw {k} on batch {b}")
                    acc += lk.double()
                values.append(float(acc) / int(samples) - l0)
            losses.append(l0)
    stats = torch.tensor(
        [sum(values), sum(v * v for v in values), sum(losses), float(len(values))],
        dtype=torch.float64, device=space.device,
    )
    if source.shard:
        dist.all_reduce_sum(stats)
    total, total_sq, total_loss, nb = stats.tolist()
    mean = total / nb
    if nb > 1:
        var = max(total_sq - nb * mean * mean, 0.0) / (nb - 1)
        stderr = math.sqrt(var / nb)
    else:
        stderr = float("nan")
    return SharpnessResult(
        value=mean,
        stderr=stderr,
        loss=total_loss / nb,
        perturbed_loss=total_loss / nb + mean,
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
    )


def _random_start(space: ParameterSpace, rho: float, norm: str, gen: torch.Generator,
                  scale: float = 0.1) -> torch.Tensor:
    """A random point of size ``scale * rho`` (default 0.1) in the normalized coordinates."""
    if norm == "linf":
        u = (2 * torch.rand(space.numel, generator=gen, dtype=torch.float64) - 1) * (scale * rho)
    else:
        u = torch.randn(space.numel, generator=gen, dtype=torch.float64)
        u = u * (scale * rho / u.norm())
    return u.to(device=space.device, dtype=space.dtype)


# ------------------------------------------------------------------------------------------------
# full-data helpers
# ------------------------------------------------------------------------------------------------
def _global_num_samples(source: DataSource, device: torch.device) -> int:
    """The data set's sample count ``N``, summed over ranks when the source is sharded."""
    n = source.num_samples()
    if source.shard:
        t = torch.tensor([float(n)], dtype=torch.float64, device=device)
        n = int(dist.all_reduce_sum(t).item())
    return n


def _full_loss(ev: _Evaluator, source: DataSource, delta: torch.Tensor | None, where: str,
               need_grad: bool = False, accuracy: bool = False):
    """Sample-weighted loss (and gradient, or accuracy) over the whole source at ``w0 + delta``."""
    ev.set(delta)
    space = ev.space
    stats = torch.zeros(3, dtype=torch.float64, device=space.device)  # sum n L, sum correct, N
    grad = torch.zeros(space.numel, dtype=torch.float64, device=space.device) if need_grad else None
    for batch in source:
        x = to_device(batch.inputs, space.device, space.dtype)
        y = to_device(batch.targets, space.device, space.dtype)
        w = f"{where} on batch {batch.index}"
        terms = loss_terms(ev.loss_fn, x, y, batch.size)  # samples, or tokens for an LM loss
        if need_grad:
            loss, g = ev.loss_grad(x, y, batch.size, w)
            grad += g.double() * terms
        elif accuracy:
            with torch.no_grad():
                out = forward(ev.model, x)
                loss = _scalar_loss(ev.loss_fn(out, y), w)
                corr = correct_count(out, y)
            ev.counter.add(batch.size, backward=False)
            if corr is None:
                raise ValueError(
                    "pac_bayes_flatness needs class-index targets and (N, classes) outputs to "
                    f"measure accuracy; batch {batch.index} has outputs of shape "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                )
            stats[1] += corr
        else:
            loss = ev.loss(x, y, batch.size, w)
        stats[0] += loss.double() * terms
        stats[2] += terms
    if source.shard:
        packed = stats if grad is None else torch.cat([stats, grad])
        dist.all_reduce_sum(packed)
        stats = packed[:3]
        if grad is not None:
            grad = packed[3:]
    n = stats[2]
    loss = float(stats[0] / n)
    if not math.isfinite(loss):
        raise _nonfinite(loss, where)
    if need_grad:
        return loss, (grad / n).to(space.dtype)
    if accuracy:
        return loss, float(stats[1] / n)
    return loss


# ------------------------------------------------------------------------------------------------
# epsilon-sharpness (Keskar et al. 2017)
# ------------------------------------------------------------------------------------------------
def epsilon_sharpness(
    model: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data | DataSource,
    *,
    epsilon: float = 1e-3,
    method: str = "lbfgsb",
    steps: int = 10,
    seed: int = 0,
    mode: str | None = "eval",
    batch_size: int | None = None,
    params: Sequence[str | nn.Parameter] | None = None,
    progress: bool = False,
    check_deterministic: bool = True,
) -> EpsilonSharpnessResult:
    """Keskar et al. (2017) epsilon-sharpness, in percent.

    ``100 * (max_{z in C} L(w + z) - L(w)) / (1 + L(w))`` with the box
    ``C = {z : |z_i| <= epsilon (|w_i| + 1)}`` (the full-space variant, ``A = I``), ``L`` the
    sample-weighted loss over all of ``data``. The inner maximum is approximated from below by
    ``method="lbfgsb"`` (default, as Keskar et al.: scipy's L-BFGS-B on ``-L`` with the box as
    bounds, ``steps`` iterations (default 10), started at a tiny seeded random point) or
    ``method="apgd"`` (projected ascent in the L-inf box, ``steps`` iterations, on device; no
    CPU round trips of the weights). Keskar et al. report ``epsilon`` in ``{1e-3, 5e-4}``.

    Cost: one forward+backward pass over the data per function evaluation (L-BFGS-B: about
    ``steps`` to ``2 steps`` evaluations; APGD: ``steps`` + 1), plus one forward pass.

    Args:
        model, loss_fn, data: as in :func:`sharpness`.
        epsilon: relative box size (> 0, default 1e-3).
        method: ``"lbfgsb"`` (default) or ``"apgd"``.
        steps: iterations of the maximizer (default 10).
        seed: seed of the start point.
        mode: ``"eval"`` (default), ``"train"`` or ``None``.
        batch_size: batch size to split an ``(X, y)`` pair.
        params: restrict the perturbed parameters.
        progress: show a progress bar over function evaluations.
        check_deterministic: refuse a random forward (see :func:`sharpness`).

    Returns:
        :class:`EpsilonSharpnessResult`.
    """
    _check_model(model)
    _check_positive("epsilon", epsilon)
    _check_positive("steps", steps, integer=True)
    if method not in ("lbfgsb", "apgd"):
        raise ValueError(f"method must be 'lbfgsb' or 'apgd', got {method!r}")
    _check_seed(seed)
    _check_flag("check_deterministic", check_deterministic)
    _check_mode(mode)
    loss_fn = resolve_loss(loss_fn)
    space = ParameterSpace(model, params)
    source = as_data(data, batch_size=batch_size)
    check_first_batch(model, loss_fn, source, mode, where="epsilon_sharpness()",
                      deterministic=check_deterministic)
    counter = _Counter()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = float(epsilon)
    with preserved_state(model), model_mode(model, mode):
        w0 = space.vector()
        ev = _Evaluator(model, loss_fn, space, w0, counter)
        l0 = _full_loss(ev, source, None, "at the unperturbed weights")
        bound = eps * (w0.abs() + 1)
        bar = progress_bar(range(int(steps)), enabled=progress, desc="epsilon sharpness")
        bar_iter = iter(bar)
        if method == "apgd":
            def objective(delta, need_grad, where):
                next(bar_iter, None)
                if need_grad:
                    return _full_loss(ev, source, delta, where, need_grad=True)
                return _full_loss(ev, source, delta, where), None

            c = w0.abs() + 1
            u0 = (2 * torch.rand(space.numel, generator=gen, dtype=torch.float64) - 1) * (0.01 * eps)
            best = _apgd(objective, c, u0.to(space.device, space.dtype), eps, "linf", int(steps))
        else:
            from scipy.optimize import Bounds, minimize

            ub = bound.detach().cpu().double().numpy()
            best_seen = [-math.inf]

            def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
                next(bar_iter, None)
                delta = torch.from_numpy(z).to(device=space.device, dtype=space.dtype)
                f, g = _full_loss(ev, source, delta, "during L-BFGS-B", need_grad=True)
                best_seen[0] = max(best_seen[0], f)
                return -f, -g.detach().cpu().double().numpy()

            x0 = ((2 * torch.rand(space.numel, generator=gen, dtype=torch.float64) - 1).numpy()
                  * ub * 0.01)
            minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=Bounds(-ub, ub),
                     options={"maxiter": int(steps)})
            best = best_seen[0]
    best = max(best, l0)
    return EpsilonSharpnessResult(
        value=100.0 * (best - l0) / (1.0 + l0),
        loss=l0,
        max_loss=best,
        epsilon=eps,
        method=method,
        steps=int(steps),
        seed=int(seed),
        mode=mode,
        num_samples=_global_num_samples(source, space.device),
        **counter.as_dict(),
    )


# ------------------------------------------------------------------------------------------------
# PAC-Bayes flatness (Jiang et al. 2020)
# ------------------------------------------------------------------------------------------------
def pac_bayes_flatness(
    model: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data | DataSource,
    *,
    magnitude_aware: bool = False,
    target: float = 0.1,
    draws: int = 10,
    sigma_max: float = 1.0,
    tolerance: float = 0.01,
    max_evaluations: int = 40,
    seed: int = 0,
    mode: str | None = "eval",
    batch_size: int | None = None,
    params: Sequence[str | nn.Parameter] | None = None,
    progress: bool = False,
    check_deterministic: bool = True,
) -> PacBayesResult:
    """PAC-Bayes flatness of Jiang et al. (2020): ``1 / sigma'^2``.

    ``sigma'`` is the noise scale at which the mean training accuracy over ``draws`` noisy
    copies drops by ``target`` (default 0.1): ``acc(w) - mean_k acc(w + u_k) ~= target`` with
    ``u_k = sigma z_k`` (plain) or ``u_k,i = sqrt(sigma^2 w_i^2 + 1e-6) z_k,i``
    (``magnitude_aware=True``), ``z_k ~ N(0, I)`` drawn from a private seeded generator and
    reused for every ``sigma`` (common random numbers make the deviation monotone in practice).
    The bracket ``[0, sigma_max]`` is doubled until the deviation exceeds ``target``, then
    bisected until ``|deviation - target| <= tolerance`` or ``max_evaluations``.

    Cost: ``draws`` forward passes over the data per evaluated sigma, plus one.

    Args:
        model, loss_fn, data: as in :func:`sharpness`; targets must be class indices.
        magnitude_aware: the magnitude-aware variant (default False).
        target: accuracy drop defining ``sigma'`` (default 0.1).
        draws: noise draws per sigma (default 10).
        sigma_max: initial upper end of the bracket (default 1.0; doubled as needed).
        tolerance: accepted ``|deviation - target|`` (default 0.01).
        max_evaluations: cap on evaluated sigmas (default 40).
        seed, mode, batch_size, params, progress: as elsewhere.
        check_deterministic: refuse a random forward (see :func:`sharpness`).

    Returns:
        :class:`PacBayesResult`.

    Raises:
        ValueError: non-classification data, a ``target`` the accuracy cannot drop by.
    """
    _check_model(model)
    _check_positive("target", target)
    _check_positive("draws", draws, integer=True)
    _check_positive("sigma_max", sigma_max)
    _check_positive("tolerance", tolerance)
    _check_positive("max_evaluations", max_evaluations, integer=True)
    if target >= 1:
        raise ValueError(f"the accuracy cannot drop by target={target!r}; target must be < 1")
    _check_flag("magnitude_aware", magnitude_aware)
    _check_flag("check_deterministic", check_deterministic)
    _check_seed(seed)
    _check_mode(mode)
    loss_fn = resolve_loss(loss_fn)
    space = ParameterSpace(model, params)
    source = as_data(data, batch_size=batch_size)
    check_first_batch(model, loss_fn, source, mode, where="pac_bayes_flatness()",
                      deterministic=check_deterministic)
    counter = _Counter()
    evaluations = 0
    with preserved_state(model), model_mode(model, mode):
        w0 = space.vector()
        ev = _Evaluator(model, loss_fn, space, w0, counter)
        _, acc0 = _full_loss(ev, source, None, "at the unperturbed weights", accuracy=True)
        if acc0 - target <= 0:
            raise ValueError(
                f"the training accuracy {acc0:.4f} cannot drop by target={target}; "
                "lower the target"
            )
        scale = w0.abs() if magnitude_aware else None

        def deviation(sigma: float) -> float:
            nonlocal evaluations
            evaluations += 1
            total = 0.0
            for k in range(int(draws)):
                gen = torch.Generator(device=space.device).manual_seed(int(seed) * 1_000_003 + k)
                z = torch.randn(space.numel, generator=gen, device=space.device, dtype=space.dtype)
                if scale is None:
                    delta = sigma * z
                else:
                    delta = torch.sqrt(sigma * sigma * scale * scale + 1e-6) * z
                _, acc = _full_loss(ev, source, delta, f"at sigma={sigma:.4g}, draw {k}",
                                    accuracy=True)
                total += acc
            return acc0 - total / int(draws)

        bar = progress_bar(range(int(max_evaluations)), enabled=progress, desc="PAC-Bayes sigma")
        bar_iter = iter(bar)
        lo, hi = 0.0, float(sigma_max)
        next(bar_iter, None)
        dev_hi = deviation(hi)
        while dev_hi < target:
            if evaluations >= max_evaluations:
                raise ValueError(
                    f"the accuracy never dropped by target={target} (deviation {dev_hi:.4f} at "
                    f"sigma={hi:.4g}); raise sigma_max or max_evaluations"
                )
            lo, hi = hi, 2 * hi
            next(bar_iter, None)
            dev_hi = deviation(hi)
        sigma, dev = hi, dev_hi
        while abs(dev - target) > tolerance and evaluations < max_evaluations:
            mid = 0.5 * (lo + hi)
            next(bar_iter, None)
            d_mid = deviation(mid)
            sigma, dev = mid, d_mid
            if d_mid > target:
                hi = mid
            else:
                lo = mid
    return PacBayesResult(
        flatness=1.0 / (sigma * sigma),
        sigma=sigma,
        deviation=dev,
        accuracy=acc0,
        magnitude_aware=bool(magnitude_aware),
        target=float(target),
        draws=int(draws),
        seed=int(seed),
        mode=mode,
        evaluations=evaluations,
        num_samples=_global_num_samples(source, space.device),
        **counter.as_dict(),
    )


# ------------------------------------------------------------------------------------------------
# directional sharpness (MSAM paper, Fig. 4)
# ------------------------------------------------------------------------------------------------
def as_flat_direction(direction: Any, space: ParameterSpace, what: str = "direction") -> torch.Tensor:
    """A direction given as a flat tensor, a list of per-parameter tensors or a ``{name: tensor}``
    dict, checked against ``space`` and returned flat on its device and dtype.

    Raises:
        TypeError / ValueError: wrong type, shape, or a non-finite entry.
    """
    if isinstance(direction, np.ndarray):
        direction = torch.from_numpy(direction)
    if isinstance(direction, Mapping):
        missing = [n for n in space.names if n not in direction]
        extra = [n for n in direction if n not in space.names]
        if missing or extra:
            raise ValueError(f"{what} keys do not match the parameters: missing {missing}, "
                             f"unexpected {extra}")
        direction = [direction[n] for n in space.names]
    if isinstance(direction, (list, tuple)):
        direction = space.flatten([torch.as_tensor(t) for t in direction])
    if not isinstance(direction, torch.Tensor):
        raise TypeError(f"{what} must be a flat tensor, a list of tensors or a dict, got "
                        f"{type(direction).__name__}")
    if not direction.is_floating_point():
        raise TypeError(f"{what} must be floating point, got dtype {direction.dtype}")
    space.check_vector(direction, what)
    d = direction.detach().to(device=space.device, dtype=space.dtype)
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"{what} has non-finite entries")
    return d


def directional_sharpness(
    model: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data | DataSource,
    direction: Any,
    radii: Sequence[float] | torch.Tensor | np.ndarray,
    *,
    mode: str | None = "eval",
    batch_size: int | None = None,
    params: Sequence[str | nn.Parameter] | None = None,
    progress: bool = False,
    check_deterministic: bool = True,
) -> DirectionalSharpnessResult:
    """``L(w + r d / ||d||) - L(w)`` for each radius ``r`` (MSAM paper, Fig. 4).

    ``L`` is the sample-weighted loss over all of ``data``. Negative radii go along ``-d``
    (e.g. the MSAM perturbation ``-v / ||v||`` for ``d = v`` the momentum).

    Cost: ``len(radii) + 1`` forward passes over the data.

    Args:
        model, loss_fn, data: as in :func:`sharpness`.
        direction: a flat tensor over the trainable parameters (see
            :mod:`analysis.directions`), a list of per-parameter tensors or a name->tensor dict.
        radii: the distances ``r``.
        mode, batch_size, params, progress: as elsewhere.
        check_deterministic: refuse a random forward (see :func:`sharpness`).

    Returns:
        :class:`DirectionalSharpnessResult`.

    Raises:
        ValueError: a direction of the wrong shape or with zero norm, empty or non-finite radii.
    """
    _check_model(model)
    _check_mode(mode)
    _check_flag("check_deterministic", check_deterministic)
    loss_fn = resolve_loss(loss_fn)
    space = ParameterSpace(model, params)
    d = as_flat_direction(direction, space)
    dn = float(torch.linalg.vector_norm(d))
    if not dn > 0:
        raise ValueError("the direction has zero norm; directional sharpness is undefined")
    r = np.asarray(radii.detach().cpu() if isinstance(radii, torch.Tensor) else radii,
                   dtype=np.float64).reshape(-1)
    if r.size == 0 or not np.isfinite(r).all():
        raise ValueError(f"radii must be a non-empty sequence of finite numbers, got {radii!r}")
    source = as_data(data, batch_size=batch_size)
    check_first_batch(model, loss_fn, source, mode, where="directional_sharpness()",
                      deterministic=check_deterministic)
    counter = _Counter()
    unit = d / dn
    with preserved_state(model), model_mode(model, mode):
        ev = _Evaluator(model, loss_fn, space, space.vector(), counter)
        l0 = _full_loss(ev, source, None, "at the unperturbed weights")
        losses = []
        for ri in progress_bar(r.tolist(), enabled=progress, desc="directional sharpness"):
            losses.append(_full_loss(ev, source, ri * unit, f"at radius {ri:g}"))
    return DirectionalSharpnessResult(
        radii=tuple(r.tolist()),
        values=tuple(li - l0 for li in losses),
        losses=tuple(losses),
        loss=l0,
        direction_norm=dn,
        mode=mode,
        num_samples=_global_num_samples(source, space.device),
        **counter.as_dict(),
    )


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
_REPORT_DEFAULTS: dict[str, dict[str, Any]] = {
    "worst": {"rho": 0.1, "adaptive": True, "norm": "l2"},
    "average": {"rho": 0.05, "adaptive": True},
    "epsilon": {"epsilon": 1e-3},
    "pac_bayes": {},
    "pac_bayes_mag": {},
    "lambda_max": {"k": 1},
    "trace": {},
}


def _report_keywords(metric: str) -> set[str]:
    """Keyword arguments a metric of :func:`sharpness_report` accepts in ``options``."""
    import inspect

    if metric in ("worst", "average"):
        fn: Callable = sharpness
    elif metric == "epsilon":
        fn = epsilon_sharpness
    elif metric in ("pac_bayes", "pac_bayes_mag"):
        fn = pac_bayes_flatness
    elif metric == "lambda_max":
        from ..lanczos import top_eigenpairs as fn
    else:
        from ..trace import hessian_trace as fn
    def kw_only(f: Callable) -> set[str]:
        return {n for n, p in inspect.signature(f).parameters.items() if p.kind == p.KEYWORD_ONLY}

    keys = kw_only(fn)
    if metric == "lambda_max":  # top_eigenpairs(model, ...) builds the operator from these
        from ..hessian import CurvatureOperator

        keys |= kw_only(CurvatureOperator.__init__)
    elif metric == "trace":  # the report builds the operator itself, with this mode
        keys |= {"mode"}
    return keys - {"progress", "kind"}


def sharpness_report(
    model: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data | DataSource,
    metrics: Sequence[str] = ("worst", "average", "epsilon", "pac_bayes", "lambda_max", "trace"),
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    mode: str | None = "eval",
    progress: bool = False,
) -> SharpnessReport:
    """Compute a chosen set of sharpness metrics in one call (used by the CLI).

    Metric names (:data:`METRICS`): ``"worst"`` and ``"average"`` (:func:`sharpness`, defaults
    adaptive L2 with ``rho=0.1`` and ``rho=0.05``), ``"epsilon"`` (:func:`epsilon_sharpness`,
    ``epsilon=1e-3``), ``"pac_bayes"`` and ``"pac_bayes_mag"`` (:func:`pac_bayes_flatness`,
    plain and magnitude-aware), ``"lambda_max"`` (:func:`analysis.lanczos.top_eigenpairs`) and
    ``"trace"`` (:func:`analysis.trace.hessian_trace`).

    Args:
        model, loss_fn, data: as in :func:`sharpness`.
        metrics: which metrics, in order.
        options: per-metric keyword arguments overriding the defaults, e.g.
            ``{"worst": {"rho": 0.05, "m": 64}}``.
        seed, mode, progress: passed to every metric.

    Returns:
        :class:`SharpnessReport` with ``values[metric]`` the headline number and
        ``to_dict()`` JSON-ready.
    """
    _check_model(model)
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not isinstance(metrics, (list, tuple)):
        raise TypeError(f"metrics must be a metric name or a list of names, got "
                        f"{type(metrics).__name__}")
    metrics = list(metrics)
    unknown = [mm for mm in metrics if mm not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if not metrics:
        raise ValueError("metrics is empty")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict {{metric: {{option: value}}}}, got "
                        f"{type(options).__name__}")
    options = dict(options or {})
    bad = [k for k in options if k not in METRICS]
    if bad:
        raise ValueError(f"options for unknown metric(s) {bad}; choose from {list(METRICS)}")
    for k, v in options.items():
        if not isinstance(v, Mapping):
            raise TypeError(f"options[{k!r}] must be a dict of keyword arguments, got "
                            f"{type(v).__name__}")
        unknown_kw = sorted(set(v) - _report_keywords(k))
        if unknown_kw:
            raise ValueError(f"options[{k!r}] has unknown option(s) {unknown_kw}; choose from "
                             f"{sorted(_report_keywords(k))}")
    loss_fn = resolve_loss(loss_fn)
    values: dict[str, float] = {}
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    common = {"seed": seed, "mode": mode}
    for name in metrics:
        kw = {**_REPORT_DEFAULTS[name], **common, **dict(options.get(name, {}))}
        t0 = time.perf_counter()
        if name in ("worst", "average"):
            res = sharpness(model, loss_fn, data, kind=name, progress=progress, **kw)
            val = res.value
        elif name == "epsilon":
            res = epsilon_sharpness(model, loss_fn, data, progress=progress, **kw)
            val = res.value
        elif name in ("pac_bayes", "pac_bayes_mag"):
            kw.setdefault("magnitude_aware", name == "pac_bayes_mag")
            res = pac_bayes_flatness(model, loss_fn, data, progress=progress, **kw)
            val = res.flatness
        elif name == "lambda_max":
            from ..lanczos import top_eigenpairs

            with preserved_state(model):
                res = top_eigenpairs(model, loss_fn, data, **kw)
            val = float(res.eigenvalues[0])
        else:  # trace
            from ..hessian import HessianOperator
            from ..trace import hessian_trace

            kw.pop("seed", None)
            op_mode = kw.pop("mode", mode)
            with preserved_state(model):
                op = HessianOperator(model, loss_fn, data, mode=op_mode)
                res = hessian_trace(op, seed=seed, **kw)
            val = float(res.estimate)
        seconds[name] = time.perf_counter() - t0
        values[name] = float(val)
        results[name] = res
    return SharpnessReport(values=values, results=results, seconds=seconds)
