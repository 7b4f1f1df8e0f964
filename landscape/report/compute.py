"""The per-checkpoint analysis behind the report (no HTML here).

:func:`analyze_checkpoint` measures one trained model: loss and accuracy, ``lambda_max`` (Lanczos),
worst-case adaptive m-sharpness (Andriushchenko et al. 2023), optionally the Hessian trace, 1-D
slices along a filter-normalized random direction and along the (filter-normalized) gradient, a
2-D slice on two orthogonal filter-normalized random directions (Li et al. 2018), and the Hessian
spectral density (stochastic Lanczos quadrature, Ghorbani et al. 2019). It returns a
:class:`ReportEntry`. The CLI's ``sharpness``, ``hessian`` and ``slice`` commands use
:func:`checkpoint_metrics`, :func:`hessian_summary` and :func:`compute_slice`;
:func:`checkpoint_keys` and :func:`describe_checkpoint_keys` describe a non-strict load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.data import Data
from analysis.losses import LossSpec
from analysis.results import Result, to_jsonable

try:  # the metric names understood by analysis.sharpness_report
    from analysis.sharpness import METRICS as _SHARPNESS_METRICS
except ImportError:  # pragma: no cover - only while the sharpness module is missing
    _SHARPNESS_METRICS = ("worst", "average", "epsilon", "pac_bayes", "pac_bayes_mag", "lambda_max", "trace")

#: Metric names accepted by :func:`checkpoint_metrics` (and ``landscape sharpness --metric``).
#: The first three are the default set.
METRIC_NAMES: tuple[str, ...] = ("worst", "average", "lambda_max", "trace") + tuple(
    m for m in _SHARPNESS_METRICS if m not in ("worst", "average", "lambda_max", "trace")
) + ("worst_plain", "average_plain")


# ---------------------------------------------------------------------------------------------
# measurements


def checkpoint_metrics(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    metrics: Sequence[str],
    *,
    rho: float | None = None,
    m: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy and the chosen sharpness metrics of one model.

    ``worst`` / ``average`` are adaptive (``c = |w|``) m-sharpness with the defaults of
    :func:`analysis.sharpness_report`; ``worst_plain`` / ``average_plain`` the same
    with ``c = 1``; ``lambda_max`` and ``trace`` the top Hessian eigenvalue (Lanczos) and the
    Hutchinson trace. ``rho`` overrides the radius of the worst/average metrics and ``m`` their
    batch size (default ``min(128, N)``, so that small data sets work; ``N`` is this process's
    share of the samples under torchrun).

    Returns:
        ``{"loss", "accuracy", "num_samples", "metrics": {name: value}, "stderr": {name: data
        SE}, "stderr_reason": {name: why undefined}, "settings": {name: {"rho", "m", "steps",
        "samples", "stderr", "num_batches", ...}}, "seconds": {name: s}}`` (``stderr`` the
        data-sampling standard error of each value, ``stderr_reason`` where it is ``nan``,
        :func:`analysis.uncertainty.headline_stderr`; ``settings`` what each metric actually used,
        from its result's ``to_dict()``). A metric undefined for this model and data (e.g.
        PAC-Bayes near chance accuracy) is ``None`` in ``metrics`` and ``{"undefined": reason}``
        in ``settings``.
    """
    from analysis.evaluation import evaluate
    from analysis.sharpness.report import sharpness_report

    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    ev = evaluate(model, loss_fn, data)
    values: dict[str, Any] = {}
    stderrs: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    settings: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name in metrics:
        base = name.removesuffix("_plain")
        opts: dict[str, Any] = {}
        if base in ("worst", "average"):
            opts["adaptive"] = not name.endswith("_plain")
            opts["m"] = m if m is not None else min(_default_m(), _local_samples(data))
            if rho is not None:
                opts["rho"] = rho
        t0 = time.perf_counter()
        rep = sharpness_report(model, loss_fn, data, [base], options={base: opts} if opts else None,
                               seed=seed, progress=progress)
        seconds[name] = time.perf_counter() - t0
        if base in rep.undefined:  # this metric does not exist here; the others are kept
            values[name] = None
            settings[name] = {"undefined": rep.undefined[base]}
            continue
        values[name] = float(rep.values[base])
        stderrs[name] = rep.stderrs.get(base)
        reason = getattr(getattr(rep.results.get(base), "data_sampling", None), "reason", None) \
            or getattr(rep.results.get(base), "stderr_reason", None)
        if reason:
            reasons[name] = reason
        result = rep.results.get(base)
        full = result.to_dict() if hasattr(result, "to_dict") else {}
        settings[name] = {k: full[k] for k in _SETTING_KEYS
                          if k in full and (full[k] is None or isinstance(full[k], (bool, int, float, str)))}
    return {"loss": ev.loss, "accuracy": ev.accuracy, "num_samples": ev.num_samples,
            "metrics": values, "stderr": stderrs, "stderr_reason": reasons, "settings": settings,
            "seconds": seconds}


#: The per-metric settings and error bars that :func:`checkpoint_metrics` records (those a
#: result carries; e.g. ``rho``/``m``/``steps`` for worst/average, ``num_matvecs`` for lambda_max).
_SETTING_KEYS = ("kind", "rho", "adaptive", "norm", "m", "steps", "samples", "stderr", "std_error",
                 "num_batches", "num_samples", "epsilon", "sigma", "method", "num_matvecs",
                 "residual", "converged", "mode", "forward_passes", "backward_passes")


def _default_m() -> int:
    """The default m of m-sharpness (:data:`landscape.defaults.DEFAULTS`, the same as
    :func:`analysis.sharpness`'s), capped at the data size by the callers."""
    from ..defaults import cli_default

    return int(cli_default("sharpness", "--m"))


def _local_samples(data: Any) -> int:
    """Samples this process sees (all of them on one process; its shard under torchrun)."""
    from analysis.data import as_data

    return as_data(data).num_samples()


def _density_dict(res: Any) -> dict[str, Any]:
    return {"grid": np.asarray(res.grid, dtype=np.float64), "density": np.asarray(res.density, dtype=np.float64)}


def hessian_summary(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    *,
    top_k: int = 5,
    trace: bool = False,
    density: bool = False,
    density_iter: int = 80,
    density_runs: int = 10,
    seed: int = 0,
    tol: float | None = None,
    progress: bool = False,
    operator: Any = None,
) -> dict[str, Any]:
    """Top-``k`` Hessian eigenvalues (Lanczos), optionally the trace and the spectral density.

    ``operator``: a :class:`~analysis.operators.hessian.HessianOperator` of ``model``,
    ``loss_fn`` and ``data`` to use (e.g. one whose first product was timed); its products
    before this call are not counted in ``num_matvecs``.

    Returns:
        ``{"eigenvalues": [...], "eigenvalue_stderr": [...], "residuals": [...], "converged":
        bool, "stop_reason": str (see :class:`analysis.EigenResult`), "num_matvecs": int,
        "trace": float | None, "trace_stderr": float | None, "trace_data_stderr": float | None,
        "density": {"grid", "density"} | None, "seconds": float}``: ``eigenvalue_stderr`` and
        ``trace_data_stderr`` the data-sampling standard errors (:mod:`analysis.uncertainty`),
        ``trace_stderr`` the Hutch++ probes' error.
    """
    from analysis.lanczos import top_eigenpairs
    from analysis.operators.hessian import HessianOperator

    t0 = time.perf_counter()
    op = HessianOperator(model, loss_fn, data) if operator is None else operator
    start = int(op.num_matvecs)
    kw: dict[str, Any] = {"k": top_k}
    if tol is not None:
        kw["tol"] = tol
    eig = top_eigenpairs(op, **kw)
    out: dict[str, Any] = {
        "eigenvalues": [float(v) for v in torch.as_tensor(eig.eigenvalues).reshape(-1).tolist()],
        "residuals": [float(v) for v in torch.as_tensor(eig.residuals).reshape(-1).tolist()],
        "converged": bool(eig.converged),
        "stop_reason": eig.stop_reason,
        "eigenvalue_stderr": [float(v) for v in eig.data_stderr.tolist()],
        "stderr_units": eig.data_sampling.units,
        "trace": None,
        "trace_stderr": None,
        "trace_data_stderr": None,
        "density": None,
    }
    if trace:
        from analysis.trace import hessian_trace

        tr = hessian_trace(op, seed=seed, data_stderr=True)
        out["trace"] = float(tr.estimate)
        out["trace_stderr"] = float(tr.std_error)
        out["trace_data_stderr"] = tr.data_stderr
    if density:
        from analysis.density import spectral_density

        out["density"] = _density_dict(spectral_density(op, seed=seed, num_iter=density_iter,
                                                        num_runs=density_runs))
    out["num_matvecs"] = int(op.num_matvecs) - start
    out["seconds"] = time.perf_counter() - t0
    return out


def _directions(kind: str, model: nn.Module, loss_fn: Any, data: Any, count: int, *, seed: int,
                normalization: str | None, other: Any = None) -> list[tuple[torch.Tensor, str]]:
    """``count`` (1 or 2) directions of one kind with their names."""
    from analysis import directions as D

    norm = None if normalization in (None, "none") else normalization
    if kind == "random":
        d1 = D.random_direction(model, seed=seed, normalization=norm)
        out = [(d1, "random1")]
        if count > 1:
            out.append((D.random_direction(model, seed=seed + 1, normalization=norm, orthogonal_to=d1),
                        "random2"))
        return out
    if kind == "gradient":
        g = D.gradient_direction(model, loss_fn, data)
        out = [((D.normalize_direction(g, model, normalization=norm) if norm else g), "gradient")]
        if count > 1:
            out.append((D.random_direction(model, seed=seed, normalization=norm, orthogonal_to=g),
                        "random (orthogonal to the gradient)"))
        return out
    if kind == "eigen":
        from analysis.lanczos import top_eigenpairs

        eig = top_eigenpairs(model, loss_fn, data, k=count, data_stderr=False)  # unit eigenvectors
        return [(eig.eigenvectors[i].reshape(-1), f"eigenvector {i + 1} (lambda={float(eig.eigenvalues[i]):.4g})")
                for i in range(count)]
    if kind == "pca":
        from analysis import pca_directions

        pca = pca_directions(other, k=count, model=model)
        return [(pca.directions[i].reshape(-1),
                 f"PC{i + 1} ({100 * float(pca.explained_variance_ratio[i]):.1f}% of the variance)")
                for i in range(count)]
    raise ValueError(f"unknown direction kind {kind!r}; choose random, gradient, eigen, interpolate or pca")


def compute_slice(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    *,
    dims: int = 1,
    direction: str = "random",
    other: Any = None,
    lo: float = -1.0,
    hi: float = 1.0,
    steps: int = 41,
    seed: int = 0,
    store: str | os.PathLike | None = None,
    normalization: str | None = "filter",
    progress: bool = False,
    label: str = "",
    overwrite: bool = False,
) -> Any:
    """A 1-D or 2-D slice through ``model`` along directions of one kind (the CLI's ``slice``).

    ``direction``: ``"random"`` (seeded, filter-normalized; Li et al. 2018), ``"gradient"`` (the
    dataset gradient, filter-normalized; its 2-D partner a random direction orthogonal to it),
    ``"eigen"`` (the top two Hessian eigenvectors, unit norm), ``"interpolate"`` (toward the
    model ``other``; 1-D) or ``"pca"`` (the top PCA directions of the state dicts ``other``).
    ``overwrite`` replaces an existing ``store`` file instead of resuming from it.
    """
    from ..slices import slice_1d, slice_2d

    coords = np.linspace(lo, hi, steps)
    if direction == "interpolate":
        from ..slices import interpolate

        return interpolate(model, other, loss_fn, data, coords, progress=progress)
    dirs = _directions(direction, model, loss_fn, data, dims, seed=seed, normalization=normalization,
                       other=other)
    if dims == 1:
        (d1, n1), = dirs
        return slice_1d(model, loss_fn, data, d1, coords, name=n1, label=label or n1, progress=progress)
    (d1, n1), (d2, n2) = dirs
    return slice_2d(model, loss_fn, data, d1, d2, coords, coords, store=store, names=(n1, n2),
                    label=label, progress=progress, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# report entries


def checkpoint_keys(ckpt: Any) -> dict[str, Any]:
    """``{"missing_keys", "unexpected_keys", "shape_mismatches"}`` of a loaded
    :class:`landscape.Checkpoint` (JSON-safe lists; empty lists for a clean load)."""
    return {
        "missing_keys": [str(k) for k in getattr(ckpt, "missing_keys", ()) or ()],
        "unexpected_keys": [str(k) for k in getattr(ckpt, "unexpected_keys", ()) or ()],
        "shape_mismatches": [[str(k), list(a), list(b)]
                             for k, a, b in getattr(ckpt, "shape_mismatches", ()) or ()],
    }


def describe_checkpoint_keys(keys: Mapping[str, Any], *, limit: int = 6) -> str | None:
    """One line on what a non-strict load left out, or ``None`` when every key matched.

    E.g. ``"2 missing keys left as initialized (head.weight, head.bias); 1 unexpected key
    ignored (extra.weight)"``.
    """

    def names(items: Sequence[Any]) -> str:
        shown = ", ".join(str(k) for k in items[:limit])
        return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

    parts = []
    missing = list(keys.get("missing_keys") or ())
    unexpected = list(keys.get("unexpected_keys") or ())
    mismatched = list(keys.get("shape_mismatches") or ())
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)} left as initialized "
                     f"({names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)} ignored "
                     f"({names(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)} left as "
                     f"initialized ({names([m[0] for m in mismatched])})")
    return "; ".join(parts) or None


@dataclass(frozen=True, repr=False)
class ReportEntry(Result):
    """Everything the report shows about one checkpoint.

    Attributes:
        name: the label (file name or optimizer).
        metrics: headline numbers, e.g. ``loss``, ``accuracy``, ``lambda_max``, ``sharpness``,
            ``trace``; ``None`` where not computed.
        slices_1d: :class:`landscape.Slice1D` results, their ``label`` the direction kind.
        slice_2d: a :class:`landscape.Slice2D` or ``None``.
        density: ``{"grid", "density"}`` of the Hessian spectrum or ``None``.
        eigenvalues: top Hessian eigenvalues.
        info: free-form extra fields shown in the table (e.g. wall time per epoch).
        settings: ``{metric: {setting: value}}``, what a metric used (e.g. ``rho``, ``m``,
            ``steps`` of ``sharpness``); shown as a note under the table and in the JSON.
        checkpoint_keys: how the checkpoint matched the model, ``{"missing_keys": [...],
            "unexpected_keys": [...], "shape_mismatches": [[key, ckpt_shape, model_shape]]}``
            (empty for a strict load); shown as a note under the table and in the JSON.
        stderr: ``{metric: data-sampling standard error}`` of the metrics that have one
            (``lambda_max``, ``sharpness``, ``trace``; :mod:`analysis.uncertainty`), shown in
            the table as ``value +- SE``.
    """

    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    slices_1d: tuple = ()
    slice_2d: Any = None
    density: dict[str, Any] | None = None
    eigenvalues: tuple[float, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint_keys: dict[str, Any] = field(default_factory=dict)
    stderr: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-safe headline numbers (no grids)."""
        out = {"name": self.name, **self.info, **self.metrics, "eigenvalues": list(self.eigenvalues)}
        if self.stderr:
            out["stderr"] = self.stderr
        if self.settings:
            out["settings"] = self.settings
        if self.checkpoint_keys:
            out["checkpoint_keys"] = self.checkpoint_keys
        return to_jsonable(out)

    def to_dict(self) -> dict[str, Any]:
        out = self.summary()
        out["slices_1d"] = [s.to_dict() for s in self.slices_1d]
        out["slice_2d"] = self.slice_2d.to_dict() if self.slice_2d is not None else None
        out["density"] = to_jsonable(self.density)
        return out

    def __repr__(self) -> str:
        nums = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}"
                         for k, v in self.metrics.items())
        return f"ReportEntry(name={self.name!r}, {nums}, slices_1d={len(self.slices_1d)}, " \
               f"slice_2d={'yes' if self.slice_2d is not None else 'no'})"


def analyze_checkpoint(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    *,
    name: str,
    steps_1d: int = 41,
    steps_2d: int = 21,
    radius: float = 1.0,
    seed: int = 0,
    sharpness_rho: float = 0.1,
    sharpness_options: Mapping[str, Any] | None = None,
    directions_1d: Sequence[str] = ("random", "gradient"),
    density: bool = True,
    density_options: Mapping[str, Any] | None = None,
    trace: bool = False,
    slice_data: Any = None,
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> ReportEntry:
    """Measure one model for the report (see the module docstring).

    Args:
        model, loss_fn, data: the network at the checkpoint, the loss and the data.
        name: label in tables and legends.
        steps_1d, steps_2d: points per axis of the slices on ``[-radius, radius]`` (0: skip).
        seed: seed of the random directions (the same seed for every checkpoint).
        sharpness_rho: radius of the worst-case adaptive m-sharpness (default 0.1).
        sharpness_options: more keyword arguments for :func:`analysis.sharpness`.
        directions_1d: 1-D slice directions: ``"random"``, ``"gradient"``.
        density: compute the spectral density (SLQ).
        density_options: keyword arguments for :func:`analysis.spectral_density`
            (default here ``num_iter=30, num_runs=2``: 60 Hessian-vector products).
        trace: also estimate the Hessian trace (Hutchinson).
        slice_data: data for the slices (default ``data``).
        info: extra fields for the table.
        progress: progress bars on stderr.
        log: called with a short message before each stage.
    """
    from analysis.evaluation import evaluate
    from analysis.lanczos import top_eigenpairs
    from analysis.operators.hessian import HessianOperator
    from analysis.sharpness.m_sharpness import sharpness

    _check_analyze_args(name, steps_1d, steps_2d, radius, sharpness_rho)
    say = log or (lambda _msg: None)
    slice_data = data if slice_data is None else slice_data
    ev = evaluate(model, loss_fn, data)
    metrics: dict[str, Any] = {"loss": ev.loss, "accuracy": ev.accuracy}
    say(f"{name}: lambda_max")
    op = HessianOperator(model, loss_fn, data)
    eig = top_eigenpairs(op, k=1)
    eigenvalues = tuple(float(v) for v in torch.as_tensor(eig.eigenvalues).reshape(-1).tolist())
    metrics["lambda_max"] = eigenvalues[0]
    stderr = {"lambda_max": float(eig.data_stderr[0])}
    say(f"{name}: sharpness")
    sh_opts = {"m": min(_default_m(), _local_samples(data)), **dict(sharpness_options or {})}
    sh = sharpness(model, loss_fn, data, rho=sharpness_rho, kind="worst", adaptive=True, seed=seed,
                   progress=progress, **sh_opts)
    metrics["sharpness"] = float(sh.value)
    stderr["sharpness"] = float(sh.stderr)
    settings = {"sharpness": {k: getattr(sh, k) for k in ("rho", "m", "steps", "adaptive", "norm", "num_batches")
                              if hasattr(sh, k)}}
    if trace:
        from analysis.trace import hessian_trace

        tr = hessian_trace(op, seed=seed, data_stderr=True)
        metrics["trace"], stderr["trace"] = float(tr.estimate), tr.data_stderr
    dens = None
    if density:
        say(f"{name}: spectral density")
        from analysis.density import spectral_density

        dopts = {"num_iter": 30, "num_runs": 2, **dict(density_options or {})}
        dens = _density_dict(spectral_density(op, seed=seed, **dopts))
    slices = []
    if steps_1d:
        for kind in directions_1d:
            say(f"{name}: 1-D slice along {kind}")
            s = compute_slice(model, loss_fn, slice_data, dims=1, direction=kind, lo=-radius, hi=radius,
                              steps=steps_1d, seed=seed, progress=progress, label=kind)
            slices.append(s)
    s2 = None
    if steps_2d:
        say(f"{name}: 2-D slice")
        s2 = compute_slice(model, loss_fn, slice_data, dims=2, direction="random", lo=-radius, hi=radius,
                           steps=steps_2d, seed=seed, progress=progress, label=name)
    return ReportEntry(name=name, metrics=metrics, slices_1d=tuple(slices), slice_2d=s2,
                       density=dens, eigenvalues=eigenvalues, info=dict(info or {}), settings=settings,
                       stderr=stderr)


def _check_analyze_args(name: Any, steps_1d: Any, steps_2d: Any, radius: Any, rho: Any) -> None:
    """One-line TypeError/ValueError for arguments of :func:`analyze_checkpoint`, before any work."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {name!r}")
    for label, steps in (("steps_1d", steps_1d), ("steps_2d", steps_2d)):
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"{label} must be an int (0 to skip, or >= 2), got {steps!r}")
        if steps != 0 and steps < 2:
            raise ValueError(f"{label}={steps}: a slice needs at least 2 points (0 skips it)")
    for label, v in (("radius", radius), ("sharpness_rho", rho)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise TypeError(f"{label} must be a number, got {v!r}")
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{label}={v}: need a finite number > 0")
