"""``landscape hessian``: top-k Hessian eigenvalues (Lanczos), trace and spectral density."""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any

from landscape._format import STDERR_LINE, WithError, format_table, format_value
from landscape.defaults import cli_default

from . import estimate as E
from ._common import UsageError, positive_int, unit_fraction
from .files import one_checkpoint
from .fsdp import add_fsdp_option, sharded_model
from .options import add_command, add_common_options
from .output import Ctx, check_writable, envelope, save_figure
from .setup import Setup

__all__ = ["EPILOG", "costs", "register", "run"]

EPILOG = """example:
  landscape hessian model.pt --model net.py:build --data net.py:data --top-k 5 --trace \\
      --density density.png"""


def register(sub: Any) -> None:
    """Add the ``hessian`` subcommand to the subparsers ``sub``."""
    p = add_command(sub, "hessian", "top-k Hessian eigenvalues (Lanczos), trace and spectral density",
                    EPILOG)
    p.add_argument("checkpoint", metavar="CKPT", help="one checkpoint file")
    p.add_argument("--top-k", type=positive_int, default=cli_default("hessian", "--top-k"), metavar="K",
                   help="number of largest eigenvalues (Lanczos)")
    p.add_argument("--trace", action="store_true", help="also estimate the trace (Hutch++)")
    p.add_argument("--per-layer", action="store_true",
                   help="also the top-k eigenvalues (and with --trace the trace) of each module's "
                        "diagonal Hessian block")
    p.add_argument("--density", metavar="OUT", default=None,
                   help="write the spectral density (SLQ) figure to OUT (.png/.pdf/.svg/.html)")
    p.add_argument("--tol", type=unit_fraction, default=cli_default("hessian", "--tol"),
                   help="relative tolerance of the eigenvalues, in (0, 1)")
    p.add_argument("--density-iter", type=positive_int, default=cli_default("hessian", "--density-iter"),
                   metavar="N", help="Lanczos steps per SLQ run")
    p.add_argument("--density-runs", type=positive_int, default=cli_default("hessian", "--density-runs"),
                   metavar="N",
                   help="random start vectors of SLQ")
    add_common_options(p)
    add_fsdp_option(p)
    p.set_defaults(func=run)


def _block_sizes(model: Any) -> list[int]:
    """Trainable parameters of each module owning some directly (``per_layer_spectrum``'s blocks)."""
    sizes = [sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
             for m in model.modules()]
    return [s for s in sizes if s]


def costs(args: argparse.Namespace, n: int, itemsize: int, model: Any = None) -> list[E.Cost]:
    """The predicted cost of each analysis the options ask for."""
    out = [E.lanczos_cost(n, args.top_k, itemsize, label=f"top-{args.top_k} eigenvalues (Lanczos)")]
    if args.trace:
        out.append(E.trace_cost(n, itemsize, **E.trace_defaults()))
    if args.density:
        from analysis.density import spectral_density

        block = E.defaults_of(spectral_density)["block_size"]
        out.append(E.density_cost(n, itemsize, num_iter=args.density_iter,
                                  num_runs=args.density_runs, block_size=block))
    if getattr(args, "per_layer", False) and model is not None:
        sizes = _block_sizes(model)
        out.append(_summed(f"per-layer top-{args.top_k} eigenvalues ({len(sizes)} blocks, Lanczos)",
                           [E.lanczos_cost(nl, min(args.top_k, nl), itemsize, data_stderr=False)
                            for nl in sizes]))
        if args.trace:
            from analysis.blocks import per_layer_spectrum

            budget = E.defaults_of(per_layer_spectrum)["trace_matvecs"]
            # per_layer_spectrum: the exact trace (3n budget, 2n products) for small blocks
            out.append(_summed(f"per-layer trace ({len(sizes)} blocks, Hutch++)", [
                E.trace_cost(nl, itemsize, num_matvecs=3 * nl if 2 * nl <= budget else budget)
                for nl in sizes]))
    return out


def _summed(name: str, blocks: list[E.Cost]) -> E.Cost:
    """The blocks run one after the other: products and passes add up, memory is the largest."""
    return E.Cost(name, hvps=sum(c.hvps for c in blocks), data_passes=sum(c.data_passes for c in blocks),
                  memory_bytes=max((c.memory_bytes for c in blocks), default=0),
                  exact=all(c.exact for c in blocks))


def _analyses(args: argparse.Namespace, ctx: Ctx, setup: Setup, model: Any,
               planned: list[E.Cost], meter: E.Meter) -> dict[str, Any]:
    """Lanczos (``hessian_summary``), then the trace and the density on their own operator, so
    that each analysis's products are counted apart (same calls and seeds as
    ``hessian_summary(trace=..., density=...)``, hence the same numbers)."""
    import numpy as np

    from analysis.operators.hessian import HessianOperator

    from ..report import hessian_summary

    costs = iter(planned)

    op = HessianOperator(model, setup.loss_fn, setup.data)
    first = first_product(op, ctx.log)
    meter.seconds_per_product = first["product_s"]  # the time estimates start from it

    def lanczos() -> tuple[dict, int]:
        out = hessian_summary(model, setup.loss_fn, setup.data, top_k=args.top_k, seed=args.seed,
                              progress=ctx.progress, tol=args.tol, operator=op)
        return out, out["num_matvecs"]

    summary = meter.run(next(costs), lanczos)
    summary["first_product"] = first
    matvecs = {"lanczos": summary["num_matvecs"]}
    if args.trace:
        from analysis.trace import hessian_trace

        tr = meter.run(next(costs), lambda: _counted(hessian_trace(
            HessianOperator(model, setup.loss_fn, setup.data), seed=args.seed,
            data_stderr=True)))
        summary["trace"], summary["trace_stderr"] = float(tr.estimate), float(tr.std_error)
        summary["trace_data_stderr"] = tr.data_stderr
        matvecs["trace"] = int(tr.num_matvecs)
    if args.density:
        from analysis.density import spectral_density

        res = meter.run(next(costs), lambda: _counted(spectral_density(
            HessianOperator(model, setup.loss_fn, setup.data), seed=args.seed,
            num_iter=args.density_iter, num_runs=args.density_runs)))
        summary["density"] = {"grid": np.asarray(res.grid, dtype=np.float64),
                              "density": np.asarray(res.density, dtype=np.float64)}
        matvecs["density"] = int(res.num_matvecs)
    summary["num_matvecs"] = sum(matvecs.values())  # the whole-model analyses, as before
    if getattr(args, "per_layer", False):
        summary["per_layer_result"] = _per_layer(args, ctx, setup, model, list(costs), meter)
        matvecs["per_layer"] = summary["per_layer_result"].num_matvecs
    summary["num_matvecs_by_analysis"] = matvecs
    return summary


def _per_layer(args: argparse.Namespace, ctx: Ctx, setup: Setup, model: Any, per: list[E.Cost],
               meter: E.Meter) -> Any:
    """``per_layer_spectrum``; its seconds are split between its Lanczos and trace estimates in
    proportion to their products."""
    from analysis.blocks import per_layer_spectrum

    for cost in per:
        meter.estimate_time(cost)
    t0 = time.perf_counter()
    layers = per_layer_spectrum(model, setup.loss_fn, setup.data, k=args.top_k, trace=args.trace,
                                tol=args.tol, seed=args.seed, progress=ctx.progress)
    seconds = time.perf_counter() - t0
    for cost, hvps in zip(per, [layers.eigen_matvecs, layers.trace_matvecs]):
        meter.record(cost, hvps, seconds * hvps / max(1, layers.num_matvecs))
    return layers


def first_product(op: Any, log: Any) -> dict[str, Any]:
    """Settle ``op``'s product method (``"auto"``'s calibration) and time one product on a unit
    random vector, before the analyses: the time estimates of every analysis (Lanczos's first)
    start from it. Logs and returns ``{"method", "calibration_s", "product_s"}``; the product is
    not counted by the analyses (``hessian_summary(operator=op)`` counts from its call)."""
    import torch

    t0 = time.perf_counter()
    shards = getattr(op, "shards", None)  # FSDP2: finite differences on this rank's shards
    method = op.resolve_method() if shards is None else op.method
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], generator=gen, dtype=torch.float64) if shards is None \
        else shards.randn(gen)
    norm = v.norm() if shards is None else shards.sum(v @ v).sqrt()
    op @ (v / norm).to(device=op.device, dtype=op.dtype)
    t2 = time.perf_counter()
    log(f"first product: {t2 - t1:.3g} s ({method}; method='auto' chose it in "
        f"{t1 - t0:.3g} s of calibration)")
    return {"method": method, "calibration_s": t1 - t0, "product_s": t2 - t1}


def _counted(result: Any) -> tuple[Any, int]:
    return result, int(result.num_matvecs)


def run(args: argparse.Namespace, ctx: Ctx) -> int:
    """Eigenvalues (and the trace, the density figure, per-layer spectra) of one checkpoint."""
    from ..report import checkpoint_keys

    if args.density:
        check_writable(args.density, "--density")
        if pathlib.Path(args.density).suffix not in (".png", ".pdf", ".svg", ".html"):
            raise UsageError(f"--density {args.density}: use .png, .pdf, .svg or .html")
    path = one_checkpoint("hessian", args.checkpoint)

    def check_top_k(model: Any) -> None:  # known once the model exists, before any data pass
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if args.top_k > n:
            raise UsageError(f"--top-k {args.top_k} is larger than the model's {n} trainable "
                             f"parameters; pass --top-k {n} or less")

    setup = Setup(args, ctx, check_model=check_top_k)
    model, ckpt = setup.load(path)
    planned = costs(args, setup.num_params, setup.itemsize, model)
    E.announce(planned, ctx.log)
    model, memory = sharded_model(args, ctx, setup, planned, model)
    ctx.log(f"[{path}] top-{args.top_k} Hessian eigenvalues" + (" + trace" if args.trace else ""))
    meter = E.Meter(ctx.log)
    t0 = time.perf_counter()
    summary = _analyses(args, ctx, setup, model, planned, meter)
    summary["seconds"] = time.perf_counter() - t0
    layers = summary.pop("per_layer_result", None)
    res = summary.get("residuals") or [None] * len(summary["eigenvalues"])
    ses = summary.get("eigenvalue_stderr") or [None] * len(summary["eigenvalues"])
    rows = [[i + 1, WithError(float(v), se), r]
            for i, (v, se, r) in enumerate(zip(summary["eigenvalues"], ses, res))]
    text = format_table(["k", "eigenvalue +- SE", "residual ||Hv - lambda v||"], rows)
    text += "\n" + STDERR_LINE
    if summary.get("converged") is False:
        reason = str(summary.get("stop_reason") or "")
        text += ("\nwarning: Lanczos stopped before reaching --tol at the "
                 f"{reason}" if reason.startswith("precision floor") else
                 "\nwarning: Lanczos stopped before reaching --tol (see the residuals)")
    text += f"\nHessian-vector products used: {summary['num_matvecs_by_analysis']['lanczos']} (Lanczos)"
    if summary.get("trace") is not None:
        text += (f"\ntrace ~ {format_value(WithError(summary['trace'], summary['trace_data_stderr']))}"
                 f" (Hutch++; the probes' standard error {summary['trace_stderr']:.2g})")
    if layers is not None:
        rows = [[lay.name, lay.num_params, lay.eigenvalues[0], lay.trace, lay.num_matvecs]
                for lay in layers.layers]
        text += "\n\nper-layer diagonal Hessian blocks\n" + format_table(
            ["module", "parameters", "top eigenvalue", "trace", "products"], rows)
        summary["per_layer"] = layers.to_dict()["layers"]
    ctx.out(text)
    _write_density(args, ctx, path, summary)
    doc = {k: v for k, v in summary.items() if k != "density"}
    if summary.get("density") is not None:
        doc["density"] = {"grid": summary["density"]["grid"], "density": summary["density"]["density"]}
    ctx.write_json(envelope("hessian", checkpoint=str(path), checkpoint_keys=checkpoint_keys(ckpt), **doc,
                            estimate=meter.annotate(planned), memory_check=memory.to_dict()))
    return 0


def _write_density(args: argparse.Namespace, ctx: Ctx, path: pathlib.Path, summary: dict) -> None:
    if args.density and ctx.main:
        if pathlib.Path(args.density).suffix == ".html":
            from ..report import density_figure

            fig = density_figure({path.name: summary["density"]})
        else:
            from ..plots import plot_spectral_density

            fig = plot_spectral_density(summary["density"], label=path.name)
        save_figure(fig, args.density)
        ctx.log(f"wrote {args.density}")
