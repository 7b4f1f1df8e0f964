"""``sharpness_report``: a chosen set of sharpness and curvature metrics in one call (used by
the CLI), with per-metric defaults and option checking."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..data import Data
from ..evaluation import resolve_loss
from ..losses import LossFn, LossSpec
from ..results import Result, to_jsonable
from ..uncertainty import headline_stderr
from ._common import check_model
from .epsilon import epsilon_sharpness
from .m_sharpness import sharpness
from .pac_bayes import UndefinedMetricError, pac_bayes_flatness
from .state import preserved_state

#: Metric names understood by :func:`sharpness_report`.
METRICS = ("worst", "average", "epsilon", "pac_bayes", "pac_bayes_mag", "lambda_max", "trace")


@dataclass(frozen=True, repr=False)
class SharpnessReport(Result):
    """Several metrics computed by :func:`sharpness_report`.

    Attributes:
        values: ``{metric: headline number}`` (sharpness value, PAC-Bayes flatness,
            ``lambda_max``, trace estimate); NaN for an undefined metric.
        results: ``{metric: full result object}`` (undefined metrics have none).
        seconds: wall-clock seconds per metric.
        undefined: ``{metric: reason}`` for the metrics that do not exist for this model and
            data (:class:`~analysis.sharpness.pac_bayes.UndefinedMetricError`, e.g. PAC-Bayes
            near chance accuracy); the other metrics are computed as usual.
        stderrs: ``{metric: data-sampling standard error of the headline number}``
            (:func:`analysis.uncertainty.headline_stderr`; ``nan`` where undefined, absent where
            turned off).
    """

    values: dict[str, float]
    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    undefined: dict[str, str] = field(default_factory=dict)
    stderrs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": to_jsonable(self.values),
            "results": {k: (v.to_dict() if hasattr(v, "to_dict") else to_jsonable(v))
                        for k, v in self.results.items()},
            "seconds": to_jsonable(self.seconds),
            "undefined": dict(self.undefined),
            "stderrs": to_jsonable(self.stderrs),
        }

    def __getitem__(self, metric: str) -> float:
        return self.values[metric]


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
        from ..operators.curvature import CurvatureOperator

        keys |= kw_only(CurvatureOperator.__init__)
    elif metric == "trace":  # the report builds the operator itself, with this mode
        keys |= {"mode"}
    return keys - {"progress", "kind"}


def sharpness_report(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
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
    plain and magnitude-aware), ``"lambda_max"`` (:func:`analysis.top_eigenpairs`) and
    ``"trace"`` (:func:`analysis.hessian_trace`).

    Args:
        model, loss_fn, data: as in :func:`sharpness`.
        metrics: which metrics, in order.
        options: per-metric keyword arguments overriding the defaults, e.g.
            ``{"worst": {"rho": 0.05, "m": 64}}``.
        seed, mode, progress: passed to every metric.

    Returns:
        :class:`SharpnessReport` with ``values[metric]`` the headline number,
        ``stderrs[metric]`` its data-sampling standard error and ``to_dict()`` JSON-ready. A
        metric that is undefined for this model and data (an
        :class:`~analysis.sharpness.pac_bayes.UndefinedMetricError`, such as PAC-Bayes
        flatness near chance accuracy) is NaN in ``values`` with its reason in ``undefined``;
        the other metrics are kept. Any other error is raised.
    """
    check_model(model)
    metrics, options = _check_report_args(metrics, options)
    loss_fn = resolve_loss(loss_fn)
    values: dict[str, float] = {}
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    undefined: dict[str, str] = {}
    stderrs: dict[str, float] = {}
    common = {"seed": seed, "mode": mode}
    for name in metrics:
        kw = {**_REPORT_DEFAULTS[name], **common, **dict(options.get(name, {}))}
        t0 = time.perf_counter()
        try:
            res, val = _run_metric(name, model, loss_fn, data, kw, seed=seed, mode=mode,
                                   progress=progress)
        except UndefinedMetricError as exc:  # this metric only: the others are kept
            undefined[name] = str(exc)
            res, val = None, float("nan")
        seconds[name] = time.perf_counter() - t0
        values[name] = float(val)
        if res is not None:
            results[name] = res
            se = headline_stderr(res)
            if se is not None:
                stderrs[name] = se
    return SharpnessReport(values=values, results=results, seconds=seconds, undefined=undefined,
                           stderrs=stderrs)


def _check_report_args(metrics: Any, options: Any) -> tuple[list[str], dict[str, Any]]:
    """:func:`sharpness_report`'s ``metrics`` as a list and ``options`` as a dict, checked."""
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
    return metrics, options


def _run_metric(name: str, model: nn.Module, loss_fn: LossFn, data: Data,
                kw: dict[str, Any], *, seed: int, mode: str | None,
                progress: bool) -> tuple[Any, float]:
    """One metric of :func:`sharpness_report`: ``(full result, headline number)``."""
    if name in ("worst", "average"):
        res = sharpness(model, loss_fn, data, kind=name, progress=progress, **kw)
        return res, res.value
    if name == "epsilon":
        res = epsilon_sharpness(model, loss_fn, data, progress=progress, **kw)
        return res, res.value
    if name in ("pac_bayes", "pac_bayes_mag"):
        kw.setdefault("magnitude_aware", name == "pac_bayes_mag")
        res = pac_bayes_flatness(model, loss_fn, data, progress=progress, **kw)
        return res, res.flatness
    if name == "lambda_max":
        from ..lanczos import top_eigenpairs

        with preserved_state(model):
            res = top_eigenpairs(model, loss_fn, data, **kw)
        return res, float(res.eigenvalues[0])
    from ..operators.hessian import HessianOperator  # trace
    from ..trace import hessian_trace

    kw.pop("seed", None)
    op_mode = kw.pop("mode", mode)
    with preserved_state(model):
        op = HessianOperator(model, loss_fn, data, mode=op_mode)
        kw.setdefault("data_stderr", True)  # the report shows it (data_stderr=False: not)
        res = hessian_trace(op, seed=seed, **kw)
    return res, float(res.estimate)
