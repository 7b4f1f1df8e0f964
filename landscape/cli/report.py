"""``landscape report``: a self-contained HTML report (metrics, 1-D/2-D slices, densities)."""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

from landscape._format import STDERR_LINE, WithError, format_table
from landscape.defaults import cli_default

from . import estimate as E
from ._common import UsageError
from .files import checkpoint_paths, label, per_file, raise_failures
from .options import add_command, add_common_options
from .output import Ctx, check_writable, envelope
from .setup import Setup

__all__ = ["EPILOG", "costs", "register", "run"]

EPILOG = """example:
  landscape report sgd.pt msam.pt --model net.py:build --data net.py:data --out report.html"""


def register(sub: Any) -> None:
    """Add the ``report`` subcommand to the subparsers ``sub``."""
    p = add_command(sub, "report", "self-contained HTML report: metrics, 1-D/2-D slices, spectral densities",
                    EPILOG)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files or directories")
    p.add_argument("--out", required=True, help="the .html (or .htm) file to write")
    p.add_argument("--title", default=cli_default("report", "--title"), help="the report's heading")
    p.add_argument("--steps-1d", type=int, default=cli_default("report", "--steps-1d"),
                   help="points of each 1-D slice (>= 2)")
    p.add_argument("--steps-2d", type=int, default=cli_default("report", "--steps-2d"),
                   help="points per axis of the 2-D slice (>= 2)")
    p.add_argument("--radius", type=float, default=cli_default("report", "--radius"),
                   help="slices span [-radius, radius] (> 0)")
    p.add_argument("--no-density", action="store_true", help="skip the spectral density")
    add_common_options(p)
    p.set_defaults(func=run)


def costs(args: argparse.Namespace, n: int, itemsize: int, num_samples: int) -> list[E.Cost]:
    """The predicted cost of each stage of :func:`landscape.analyze_checkpoint` with its
    defaults: lambda_max, worst-case m-sharpness, the density (SLQ, 30 steps x 2 runs), the
    1-D slices along a random and the gradient direction, and the 2-D slice."""
    from analysis.sharpness.m_sharpness import sharpness

    from ..report.compute import analyze_checkpoint

    rep = E.defaults_of(analyze_checkpoint)
    sh = E.defaults_of(sharpness)
    m = min(int(cli_default("sharpness", "--m")), num_samples)
    out = [E.lanczos_cost(n, 1, itemsize, label="lambda_max (Lanczos, k=1)"),
           E.m_sharpness_cost(num_samples, kind="worst", m=m, n_eval=sh["n_eval"], steps=sh["steps"],
                              init=sh["init"], restarts=sh["restarts"], label="sharpness (worst)")]
    if not args.no_density:
        out.append(E.density_cost(n, itemsize, num_iter=30, num_runs=2))
    for kind in rep["directions_1d"]:
        if kind == "gradient":
            out.append(E.Cost("gradient direction", forward_passes=1, backward_passes=1,
                              data_passes=1, memory_bytes=n * itemsize))
        out.append(E.slice_cost(n, itemsize, dims=1, steps=args.steps_1d,
                                label=f"1-D slice along {kind} ({args.steps_1d} points)"))
    out.append(E.slice_cost(n, itemsize, dims=2, steps=args.steps_2d))
    return out


def run(args: argparse.Namespace, ctx: Ctx) -> int:
    """Analyse every checkpoint and write the report; exit 1 when some checkpoints failed."""
    import dataclasses

    from ..report import checkpoint_keys, describe_checkpoint_keys
    from ..report.compute import analyze_checkpoint
    from ..report.render import write_report

    if not pathlib.Path(args.out).is_dir() and pathlib.Path(args.out).suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {args.out}: the report is HTML; use a .html or .htm file")
    if args.steps_1d < 2:
        raise UsageError(f"--steps-1d {args.steps_1d}: need at least 2")
    if args.steps_2d < 2:
        raise UsageError(f"--steps-2d {args.steps_2d}: need at least 2")
    if not (math.isfinite(args.radius) and args.radius > 0):
        raise UsageError(f"--radius {args.radius}: need a finite number > 0")
    out = check_writable(args.out, "--out")
    paths = checkpoint_paths(args.checkpoints, keep_going=True)
    setup = Setup(args, ctx)
    planned = costs(args, setup.num_params, setup.itemsize, setup.data.num_samples())
    E.announce(planned, ctx.log, checkpoints=len(paths))
    setup.check_memory(planned)

    def work(path: pathlib.Path) -> Any:
        ctx.log(f"[{path}] metrics, slices and spectral density")
        model, ckpt = setup.load(path)
        entry = analyze_checkpoint(model, setup.loss_fn, setup.data, name=label(path, paths),
                                   steps_1d=args.steps_1d, steps_2d=args.steps_2d,
                                   radius=args.radius, seed=args.seed, progress=ctx.progress,
                                   density=not args.no_density)
        keys = checkpoint_keys(ckpt)
        return dataclasses.replace(entry, checkpoint_keys=keys) if any(keys.values()) else entry

    entries, failures = per_file(paths, ctx, work)
    failed_notes = [f"failed: {label(pathlib.Path(f['checkpoint']), paths)}: {f['error']}" for f in failures]
    if ctx.main and entries:
        write_report(entries, out, title=args.title, notes=failed_notes)
        ctx.log(f"wrote {out}")
    header = ["checkpoint", "loss", "accuracy", "lambda_max +- SE", "sharpness +- SE"]
    text = format_table(header, [[e.name + (" *" if e.checkpoint_keys else ""), e.metrics.get("loss"),
                                  e.metrics.get("accuracy"),
                                  *[WithError(e.metrics.get(k), e.stderr.get(k))
                                    for k in ("lambda_max", "sharpness")]] for e in entries])
    if entries:
        text += "\n" + STDERR_LINE
    notes = [f"* {e.name}: {describe_checkpoint_keys(e.checkpoint_keys)}" for e in entries if e.checkpoint_keys]
    ctx.out("\n".join([text, *notes, *failed_notes]))
    ctx.write_json(envelope("report", out=str(out), checkpoints=[e.summary() for e in entries],
                             errors=failures, estimate=[c.to_dict() for c in planned]))
    raise_failures(failures, paths, " and written to the report" + (" and --json" if args.json else ""))
    return 0

