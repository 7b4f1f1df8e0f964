"""Curvature during training: ``lambda_max`` (and friends) every ``N`` steps, warm-started.

:class:`CurvatureTracker` is called from a training loop after each optimizer step
(``tracker.maybe_measure(step)``); every ``every`` steps it measures, on a fixed probe batch and
at the **unperturbed** weights ``w`` (for :class:`msam.MSAM`, :class:`msam.NAG` and
:class:`msam.AdamWMSAM`, whose parameters live at ``w~ = w - c d`` between steps, through
``optimizer.unperturbed()``):

* ``lambda_max`` and optionally the top-``k`` eigenvalues of the probe-batch Hessian, by Lanczos
  (:func:`analysis.top_eigenpairs`) **warm-started** from the previous check's Ritz
  vectors: ``v0 = sum_i y_i`` (the previous unit Ritz vectors). The top eigenvectors rotate
  slowly between checks, so the Krylov space of ``v0`` holds the new top-``k`` invariant
  subspace almost exactly after ``k`` steps and the stop (error bound ``<= tol |theta|``, see
  :mod:`analysis.lanczos`) is reached after a few Hessian-vector products; the first check (and
  every ``cold_every``-th) starts from the gradient as :func:`top_eigenpairs` does;
* optionally ``tr(H)`` (Hutchinson, ``trace_probes`` products), ``cos(v, g)`` of the momentum
  and the probe-batch gradient at ``w`` (MSAM paper, Fig. 2C), the directional curvature along
  the momentum ``v^T H v / ||v||^2`` (App. A.4, one product) and the loss at ``w`` and at the MSAM
  point ``w - rho v / ||v||`` (App. A.10); these three go through
  :class:`analysis.MechanismProbe`.

Cost: the probe data's :class:`~analysis.HessianOperator` is built once (first-batch checks,
the data moved to the device) and kept for every later check; a probe held in memory uses the
cached graph (one first-order graph per check, every Lanczos product one backward through it),
a DataLoader ``method="auto"``, calibrated at the first check. A check is then one graph build
plus its Lanczos products; on the digits CNN of ``benchmarks/tracker.py`` a product costs about
1.5-2 training steps, so four products at ``every=50`` cost 16-20 % of the training time
(``tol`` trades products for accuracy: see the training guide).

Everything a measurement touches is restored bit for bit: parameter values (the live ``w~``
itself, not ``w~`` recomputed from ``w``), ``.grad`` tensors, ``requires_grad`` flags, module
training modes, buffers (BatchNorm running statistics), the optimizer's perturbation state and the
global CPU/CUDA RNG, so a run with the tracker follows the same trajectory as one without it.

Example:
    >>> import torch
    >>> from analysis import CurvatureTracker
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> tracker = CurvatureTracker(model, "cross_entropy", (x, y), optimizer=opt, every=5)
    >>> for step in range(1, 11):
    ...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    ...     _ = tracker.maybe_measure(step)
    >>> [r.step for r in tracker.history]
    [5, 10]
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import Data, DataSource, as_data
from .evaluation import model_mode, resolve_loss
from .lanczos import top_eigenpairs
from .losses import LossSpec
from .operators.curvature import directional_curvature
from .operators.hessian import HessianOperator
from .precision import autocast_disabled
from .results import Result, to_jsonable


@dataclass(frozen=True, repr=False)
class TrackerRecord(Result):
    """One check of :class:`CurvatureTracker`.

    Attributes:
        step: the training step it was taken after.
        lambda_max: the top Hessian eigenvalue of the probe batch at ``w``.
        eigenvalues: the top-``k`` eigenvalues, descending (``eigenvalues[0] == lambda_max``).
        lanczos_hvps: Hessian-vector products used by Lanczos in this check.
        hvps: all Hessian-vector products of this check (Lanczos, trace, momentum curvature).
        converged: whether Lanczos met its tolerance.
        warm: whether Lanczos was warm-started from the previous Ritz vectors.
        lr: the optimizer's learning rate (first group) at the check; ``2 / lr`` is the
            edge-of-stability threshold of gradient descent (Cohen et al. 2021).
        seconds: wall time of the check.
        trace: Hutchinson estimate of ``tr(H)`` (None unless ``trace_probes > 0``).
        cos_v_g: ``cos(v, g)``, momentum against the probe-batch gradient at ``w``.
        momentum_curvature: ``v^T H v / ||v||^2``.
        loss: probe-batch loss at ``w`` (with ``msam_loss``).
        loss_msam: probe-batch loss at ``w - rho v / ||v||``.
    """

    step: int
    lambda_max: float
    eigenvalues: tuple[float, ...]
    lanczos_hvps: int
    hvps: int
    converged: bool
    warm: bool
    lr: float | None = None
    seconds: float = 0.0
    trace: float | None = None
    cos_v_g: float | None = None
    momentum_curvature: float | None = None
    loss: float | None = None
    loss_msam: float | None = None


_FIELDS = [f.name for f in dataclasses.fields(TrackerRecord)]
_INT = {"step", "lanczos_hvps", "hvps"}
_BOOL = {"converged", "warm"}


def _parse(name: str, text: str) -> Any:
    if name in _INT:
        return int(text)
    if name in _BOOL:
        if text not in ("True", "False"):
            raise ValueError(f"column {name!r}: expected True or False, got {text!r}")
        return text == "True"
    if name == "eigenvalues":
        return tuple(float(v) for v in text.split(";")) if text else ()
    if text == "":
        return None
    return float(text)


@dataclass(frozen=True, repr=False)
class TrackerHistory(Result):
    """The records of a :class:`CurvatureTracker` (a sequence: ``len``, indexing, iteration).

    ``to_json(path)`` / ``to_csv(path)`` write them (the CSV has one row per check, the
    eigenvalues ``;``-separated in one column, missing values empty); :meth:`read_json` and
    :meth:`read_csv` read them back.
    """

    records: tuple[TrackerRecord, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> TrackerRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[TrackerRecord]:
        return iter(self.records)

    def column(self, name: str) -> list[Any]:
        """The values of one field over the records, e.g. ``column("lambda_max")``."""
        if name not in _FIELDS:
            raise ValueError(f"unknown column {name!r}; choose from {_FIELDS}")
        return [getattr(r, name) for r in self.records]

    def to_dict(self) -> dict[str, Any]:
        """``{"records": [record.to_dict(), ...]}`` (JSON-safe)."""
        return {"records": [to_jsonable(r.to_dict()) for r in self.records]}

    def to_json(self, path: str | os.PathLike) -> pathlib.Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        p = pathlib.Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    def to_csv(self, path: str | os.PathLike) -> pathlib.Path:
        """Write one row per record (header = the field names); returns the path."""
        p = pathlib.Path(path)
        with p.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(_FIELDS)
            for r in self.records:
                row = []
                for name in _FIELDS:
                    v = getattr(r, name)
                    if name == "eigenvalues":
                        row.append(";".join(repr(float(e)) for e in v))
                    elif v is None:
                        row.append("")
                    elif isinstance(v, float):
                        row.append(repr(v))
                    else:
                        row.append(str(v))
                w.writerow(row)
        return p

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrackerHistory:
        """Inverse of :meth:`to_dict`."""
        recs = []
        for d in data.get("records", []):
            d = dict(d)
            d["eigenvalues"] = tuple(float(e) for e in d.get("eigenvalues", ()))
            recs.append(TrackerRecord(**{k: d[k] for k in _FIELDS if k in d}))
        return cls(tuple(recs))

    @classmethod
    def read_json(cls, path: str | os.PathLike) -> TrackerHistory:
        """Read a file written by :meth:`to_json`."""
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))

    @classmethod
    def read_csv(cls, path: str | os.PathLike) -> TrackerHistory:
        """Read a file written by :meth:`to_csv`."""
        with pathlib.Path(path).open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        return cls(tuple(TrackerRecord(**{k: _parse(k, row[k]) for k in _FIELDS if k in row})
                         for row in rows))


def _positive_int(name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _single_batch(source: DataSource) -> Any:
    """The one batch of ``source`` as the probes take it (a pair or a batch dict), or None when
    the data may hold several batches (a list of several, a DataLoader)."""
    if source.kind in ("pair", "dict"):
        return source.data
    if source.kind == "batches" and len(source.data) == 1:
        return source.data[0]
    return None


class CurvatureTracker:
    """Measure curvature every ``every`` training steps, warm-started (see the module docstring).

    Args:
        model: the network being trained.
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable returning the batch mean.
        data: the fixed probe data, in any form the curvature operators take
            (:mod:`analysis.data`): an ``(inputs, targets)`` pair (e.g. 256 training samples), a
            dict of tensors, a list of ``(x, y)`` batches or of batch dicts, or a DataLoader
            (``shuffle=False``); the Hessian is that of the sample-weighted dataset loss, as
            :class:`~analysis.operators.hessian.HessianOperator` on the same data gives it.
            ``cosine`` and ``msam_loss`` need a single batch (a pair, a dict, a list of one).
        optimizer: the training optimizer. Needed for MSAM-style optimizers (the parameters are
            moved to ``w`` through ``optimizer.unperturbed()`` during a check), for the learning
            rate in the records and for ``cosine``, ``momentum_curvature`` and ``msam_loss``.
        every: steps between checks (``maybe_measure(step)`` measures when ``step % every == 0``).
        k: number of top eigenvalues (default 1, ``lambda_max`` only).
        tol: relative eigenvalue tolerance of Lanczos (default ``1e-2``).
        max_iter: cap on Lanczos products per check (default: :func:`top_eigenpairs`'s).
        warm_start: reuse the previous Ritz vectors as the start vector (default True).
        cold_every: if set, every ``cold_every``-th check starts cold (guards against an
            eigenvalue growing from outside the tracked subspace).
        look_ahead: the Lanczos look-ahead (``top_eigenpairs(look_ahead=)``). Default
            ``None``: :func:`top_eigenpairs`'s (3 products) for cold checks, 0 for warm ones, a
            cost trade-off: a warm start is the previous Ritz vectors, whose components along
            an eigenvector grown outside them are small, so 3 more products would at least
            double a warm check's cost for a small chance of finding it; ``cold_every`` (a
            fresh start every so many checks) is the guard for that.
        trace_probes: Hutchinson products for ``tr(H)`` per check (0 = off; at least 2).
        cosine: record ``cos(v, g)`` (1 forward + 1 backward).
        momentum_curvature: record ``v^T H v / ||v||^2`` (1 product).
        msam_loss: record the loss at ``w`` and at ``w - rho v / ||v||`` (2 forwards).
        rho: radius for ``msam_loss`` (default: the optimizer's MSAM ``rho``, see
            :class:`analysis.MechanismProbe`).
        mode: module mode of the Hessian products: ``"eval"`` (default; BatchNorm uses running
            statistics, so the matrix is fixed) or ``"train"`` (batch statistics; then
            BatchNorm's running statistics are still restored after the check).
        seed: seed of the cold-start and trace random vectors.
        method: the Hessian-vector product method
            (:class:`~analysis.operators.hessian.HessianOperator`'s ``method``). Default
            ``None``: ``"cached-graph"`` for a probe held in memory (one first-order graph per
            check, each product one backward through it), ``"auto"`` for a DataLoader.
            ``"double-backward"`` builds no graph to keep (less memory at a large probe);
            ``"forward-difference"`` makes a product one gradient (``g(w)`` once per check) for
            smooth models (tanh, GELU), with errors near ``sqrt(u)`` relative (2.4e-4 in
            float32), not for ReLU or max-pooling networks: the step crosses their kinks (the
            digits CNN's products were off by 2.3% trained and 950x at initialization,
            ``benchmarks/relu_differences.py``; see "ReLU networks" in the Hessian guide).

    Attributes:
        history: a :class:`TrackerHistory` of the checks so far.
        ritz_vectors: the last check's ``(k, n)`` Ritz vectors (or None).
    """

    def __init__(self, model: nn.Module, loss_fn: LossSpec, data: Data, *,
                 optimizer: torch.optim.Optimizer | None = None, every: int = 50, k: int = 1,
                 tol: float = 1e-2, max_iter: int | None = None, warm_start: bool = True,
                 cold_every: int | None = None, look_ahead: int | None = None,
                 trace_probes: int = 0, cosine: bool = False,
                 momentum_curvature: bool = False, msam_loss: bool = False,
                 rho: float | None = None, mode: str = "eval", seed: int = 0,
                 method: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        try:  # the one data layer: every form the operators take, checked before anything else
            source = as_data(data)
        except TypeError as err:
            raise TypeError(f"data (the probe batch or batches): {err}") from err
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        _positive_int("every", every)
        _positive_int("k", k)
        _positive_int("max_iter", max_iter, allow_none=True)
        _positive_int("cold_every", cold_every, allow_none=True)
        _positive_int("trace_probes", trace_probes, allow_zero=True)
        if trace_probes == 1:
            raise ValueError("trace_probes must be 0 (off) or >= 2, got 1")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        needs_opt = [n for n, on in (("cosine", cosine), ("momentum_curvature", momentum_curvature),
                                     ("msam_loss", msam_loss)) if on]
        if needs_opt and optimizer is None:
            raise ValueError(f"{', '.join(needs_opt)} need the optimizer (its momentum); pass optimizer=")
        probe_batch = _single_batch(source)
        if (cosine or msam_loss) and probe_batch is None:
            raise ValueError(
                f"cosine and msam_loss take one probe batch (an (inputs, targets) pair or a batch "
                f"dict), got data of the form {source.kind!r} ({type(data).__name__}); pass one "
                "batch or turn them off")
        self.model = model
        self.loss_fn = resolve_loss(loss_fn)
        self.data = data
        self.source = source
        self._probe_batch = probe_batch
        self.optimizer = optimizer
        self.every = every
        self.k = k
        self.tol = float(tol)
        self.max_iter = max_iter
        self.warm_start = bool(warm_start)
        if look_ahead is not None and (not isinstance(look_ahead, int)
                                       or isinstance(look_ahead, bool) or look_ahead < 0):
            raise ValueError(f"look_ahead must be None or a non-negative integer, got "
                             f"{look_ahead!r}")
        self.look_ahead = look_ahead
        self.cold_every = cold_every
        self.trace_probes = trace_probes
        self.cosine = bool(cosine)
        self.momentum_curvature = bool(momentum_curvature)
        self.msam_loss = bool(msam_loss)
        self.mode = mode
        self.seed = int(seed)
        self.ritz_vectors: torch.Tensor | None = None
        self._records: list[TrackerRecord] = []
        self._checks = 0
        self._determinism_checked = False  # per process: see measure()
        # the product method: a probe held in memory gets the cached graph (one first-order
        # graph per check, every Lanczos product one backward through it), without "auto"'s
        # calibration product; a DataLoader gets "auto", settled at the first check
        if method is not None and method not in HessianOperator.METHODS:
            raise ValueError(f"method must be None or one of {HessianOperator.METHODS}, "
                             f"got {method!r}")
        if method == "cached-graph" and not source.in_memory:
            raise ValueError("method='cached-graph' keeps the probe's graphs: it needs a probe "
                             "held in memory (a batch or a list of batches), not a DataLoader")
        self._method = method if method is not None else \
            "cached-graph" if source.in_memory else "auto"
        self._op: HessianOperator | None = None  # kept between checks (see _operator)
        self._op_key: tuple | None = None
        self._probe = None
        if needs_opt:
            from .probes import MechanismProbe

            self._probe = MechanismProbe(model, self.loss_fn, optimizer, rho=rho, mode=mode,
                                         seed=seed)

    def __repr__(self) -> str:
        return f"CurvatureTracker(every={self.every}, k={self.k}, checks={len(self._records)})"

    @property
    def history(self) -> TrackerHistory:
        """The checks so far."""
        return TrackerHistory(tuple(self._records))

    def maybe_measure(self, step: int) -> TrackerRecord | None:
        """Measure if ``step % every == 0`` (call after ``optimizer.step()``); else None."""
        if step % self.every != 0:
            return None
        return self.measure(step)

    __call__ = maybe_measure

    @contextmanager
    def _at_w(self) -> Iterator[None]:
        from .probes import rng_preserved
        from .sharpness import preserved_state

        opt = self.optimizer
        perturbed = bool(getattr(opt, "is_perturbed", False))
        if perturbed and not hasattr(opt, "unperturbed"):
            raise RuntimeError(
                f"{type(opt).__name__} is at its perturbed point (between first_step and "
                "second_step); measure before first_step() or after second_step()")
        device = next(self.model.parameters()).device
        with rng_preserved(device), preserved_state(self.model), \
                model_mode(self.model, self.mode), autocast_disabled():
            if perturbed:
                with opt.unperturbed():
                    yield
            else:
                yield

    def _operator(self) -> HessianOperator:
        """The probe data's Hessian operator: built at the first check (first-batch checks,
        the data moved to the device once) and kept for the later ones while the trainable
        parameters are the same tensors on the same device, dtype and shape; its products read
        the current weights, and its cached graph is dropped after every check."""
        key = tuple((id(p), p.device, p.dtype, p.shape, p.requires_grad)
                    for p in self.model.parameters())
        if self._op is None or key != self._op_key:
            # the model's randomness (dropout modules, a random forward) does not change between
            # checks: the double evaluation of the probe batch runs at the first build only
            self._op = HessianOperator(self.model, self.loss_fn, self.source, mode=self.mode,
                                       check_deterministic=self.mode == "eval"
                                       and not self._determinism_checked, method=self._method)
            self._op_key = key
            self._determinism_checked = True
        return self._op

    def measure(self, step: int) -> TrackerRecord:
        """Measure now (at ``w``), append the record to :attr:`history` and return it."""
        t0 = time.perf_counter()
        cold = (not self.warm_start or self.ritz_vectors is None
                or (self.cold_every is not None and self._checks % self.cold_every == 0))
        extra: dict[str, Any] = {}
        with self._at_w():
            op = self._operator()
            products_before = int(op.num_matvecs)
            kwargs: dict[str, Any] = {"k": self.k, "tol": self.tol, "seed": self.seed + self._checks}
            if self.max_iter is not None:
                kwargs["max_iter"] = self.max_iter
            if self.look_ahead is not None:
                kwargs["look_ahead"] = self.look_ahead
            if not cold:
                v0 = self.ritz_vectors.sum(dim=0)
                if bool(torch.linalg.vector_norm(v0) > 0):
                    kwargs["v0"] = v0
                    # a warm start needs few steps: a small basis (thick restarts if exceeded)
                    # saves allocating and zeroing max_basis x n numbers at every check
                    kwargs["max_basis"] = min(int(op.shape[0]), 2 * self.k + 10)
                    kwargs.setdefault("look_ahead", 0)
                else:
                    cold = True
            res = top_eigenpairs(op, data_stderr=False, **kwargs)  # a probe batch: no data SE
            # the product method "auto" timed at the first check serves every later one (the
            # model's architecture and the probe batch's shape do not change)
            self._method = op.method
            lanczos = int(res.num_matvecs)
            self.ritz_vectors = res.eigenvectors.detach().clone()
            if self.trace_probes:
                from .trace import hessian_trace

                extra["trace"] = float(hessian_trace(op, num_matvecs=self.trace_probes,
                                                     method="hutchinson", data_stderr=False,
                                                     seed=self.seed + self._checks).estimate)
            if self.momentum_curvature:
                from .directions import momentum_direction

                v = momentum_direction(self.optimizer, self.model)
                extra["momentum_curvature"] = (directional_curvature(op, v)
                                               if bool(torch.linalg.vector_norm(v) > 0) else None)
            hvps = int(op.num_matvecs) - products_before
            op.clear_cache()
            if self._probe is not None:
                try:
                    if self.cosine:
                        extra["cos_v_g"] = self._probe.cosine(self._probe_batch)["cos_v_g"]
                    if self.msam_loss:
                        m = self._probe.msam_loss(self._probe_batch)
                        extra["loss"], extra["loss_msam"] = m["loss"], m["loss_msam"]
                except ValueError:  # no momentum yet
                    pass
        lr = None
        if self.optimizer is not None and self.optimizer.param_groups:
            lr_v = self.optimizer.param_groups[0].get("lr")
            lr = float(lr_v) if lr_v is not None else None
        eig = tuple(float(e) for e in res.eigenvalues.tolist())
        rec = TrackerRecord(step=int(step), lambda_max=eig[0], eigenvalues=eig,
                            lanczos_hvps=lanczos, hvps=hvps, converged=bool(res.converged),
                            warm=not cold, lr=lr, seconds=time.perf_counter() - t0, **extra)
        self._records.append(rec)
        self._checks += 1
        return rec

    def state_dict(self) -> dict[str, Any]:
        """The Ritz vectors and records (to resume tracking with a warm start)."""
        return {"ritz_vectors": self.ritz_vectors, "checks": self._checks,
                "history": self.history.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.ritz_vectors = state.get("ritz_vectors")
        self._checks = int(state.get("checks", 0))
        self._records = list(TrackerHistory.from_dict(state.get("history", {})).records)

