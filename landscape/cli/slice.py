"""``landscape slice``: a 1-D or 2-D loss-landscape slice through a checkpoint."""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

from landscape._format import format_table
from landscape.defaults import cli_default

from . import estimate as E
from ._common import UsageError
from .files import checkpoint_paths, one_checkpoint
from .fsdp import add_fsdp_option, sharded_model
from .options import add_command, add_common_options
from .output import Ctx, check_writable, envelope, save_figure
from .setup import Setup

__all__ = ["EPILOG", "costs", "parse_direction", "register", "run"]

EPILOG = """example:
  landscape slice model.pt --model net.py:build --data net.py:data --dims 2 \\
      --direction random --range -1 1 --steps 21 --out surface.html --store grid.npz"""


def register(sub: Any) -> None:
    """Add the ``slice`` subcommand to the subparsers ``sub``."""
    p = add_command(sub, "slice", "1-D or 2-D loss-landscape slice through a checkpoint", EPILOG)
    p.add_argument("checkpoint", metavar="CKPT", help="one checkpoint file")
    p.add_argument("--dims", type=int, choices=[1, 2], default=1,
                   help="1: a line through the checkpoint; 2: a plane (grid)")
    p.add_argument("--direction", default=cli_default("slice", "--direction"), metavar="KIND",
                   help="random (filter-normalized), gradient, eigen (top Hessian eigenvectors), "
                        "interpolate:CKPT2 or pca:DIR (a directory of trajectory checkpoints)")
    p.add_argument("--range", type=float, nargs=2, default=cli_default("slice", "--range"),
                   metavar=("MIN", "MAX"),
                   help="step sizes along each direction (interpolate: 0 is CKPT, 1 is CKPT2)")
    p.add_argument("--steps", type=int, default=cli_default("slice", "--steps"), help="points per axis (>= 2)")
    p.add_argument("--out", required=True, help="figure: .png/.pdf/.svg (matplotlib) or .html (plotly)")
    p.add_argument("--store", default=None, metavar="GRID.npz",
                   help="with --dims 2: save finished rows of the grid; rerun to resume")
    p.add_argument("--restart", action="store_true",
                   help="with --store: ignore an existing (damaged or other) store file and replace it")
    p.add_argument("--normalization", choices=["filter", "layer", "model", "none"],
                   default=cli_default("slice", "--normalization"),
                   help="scaling of random directions (filter: Li et al. 2018)")
    add_common_options(p)
    add_fsdp_option(p, "; with --fsdp the direction random")
    p.set_defaults(func=run)


def parse_direction(spec: str) -> tuple[str, str | None]:
    """``--direction KIND[:ARG]`` as ``(kind, arg)``; a usage error for an unknown kind."""
    kind, sep, arg = spec.partition(":")
    if kind not in ("random", "gradient", "eigen", "interpolate", "pca"):
        raise UsageError(
            f"--direction {spec!r}: choose random, gradient, eigen, interpolate:CKPT2 or pca:DIR"
        )
    if kind in ("interpolate", "pca") and not arg:
        raise UsageError(f"--direction {kind} needs an argument: {kind}:PATH")
    if kind not in ("interpolate", "pca") and sep:
        raise UsageError(f"--direction {spec!r}: {kind} takes no argument (only interpolate:CKPT2 "
                         "and pca:DIR do); pass --direction " + kind)
    return kind, (arg or None)


def costs(kind: str, dims: int, steps: int, n: int, itemsize: int, rows_done: int = 0) -> list[E.Cost]:
    """The predicted cost of the directions (gradient: one pass; eigen: Lanczos) and the grid
    (only its rows left when a store resumes ``rows_done`` rows)."""
    out = []
    if kind == "gradient":
        out.append(E.Cost("gradient direction", forward_passes=1, backward_passes=1, data_passes=1,
                          memory_bytes=n * itemsize))
    elif kind == "eigen":
        out.append(E.lanczos_cost(n, dims, itemsize, label=f"top-{dims} eigenvectors (Lanczos)",
                                  data_stderr=False))
    out.append(E.slice_cost(n, itemsize, dims=dims, steps=steps, rows_done=rows_done))
    return out


def rows_in_store(args: argparse.Namespace, ctx: Ctx) -> int:
    """Finished rows the ``--store`` file holds for this grid (read only, before the run; the
    run checks the rest of the fingerprint), with a message when it resumes."""
    if args.store is None or args.restart:
        return 0
    import numpy as np

    from ..store import stored_rows_done

    coords = np.linspace(args.range[0], args.range[1], args.steps)
    done = stored_rows_done(args.store, coords, coords)
    if done:
        ctx.log(f"resuming {args.store}: {done} of {args.steps} rows already computed, "
                f"{args.steps - done} left")
    return done or 0


def run(args: argparse.Namespace, ctx: Ctx) -> int:
    """Compute the slice, write the figure (and the store), print the summary."""
    from ..report import checkpoint_keys, compute_slice

    kind, arg = parse_direction(args.direction)
    if args.fsdp != "off" and kind != "random":
        raise UsageError(f"--fsdp slices along --direction random (drawn as on one process, each "
                         f"rank keeping its shards), not {args.direction}; leave --fsdp out for it")
    if kind == "interpolate" and args.dims != 1:
        raise UsageError("--direction interpolate:CKPT2 gives a 1-D slice; use --dims 1")
    out = check_writable(args.out, "--out")
    if out.suffix not in (".png", ".pdf", ".svg", ".html"):
        raise UsageError(f"--out {args.out}: use .png, .pdf, .svg or .html")
    lo, hi = args.range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UsageError(f"--range {lo} {hi}: need two finite numbers with MIN < MAX")
    if args.steps < 2:
        raise UsageError(f"--steps {args.steps}: need at least 2")
    if args.store is not None:
        if args.dims != 2:
            raise UsageError("--store applies to --dims 2 (a 1-D slice is not stored)")
        if pathlib.Path(args.store).suffix != ".npz":
            raise UsageError(f"--store {args.store}: use a .npz file")
        check_writable(args.store, "--store")
    elif args.restart:
        raise UsageError("--restart applies to --store (it replaces the store file)")
    path = one_checkpoint("slice", args.checkpoint)
    # the checkpoints the direction needs are header-checked up front too
    extra = one_checkpoint("slice", arg) if kind == "interpolate" else (
        checkpoint_paths([arg]) if kind == "pca" else None)  # type: ignore[list-item]
    setup = Setup(args, ctx)
    model, ckpt = setup.load(path)
    other = None
    if kind == "interpolate":
        other, _ = setup.load(extra)  # type: ignore[arg-type]
    elif kind == "pca":
        other = [setup.load(p)[0].state_dict() for p in extra]  # type: ignore[union-attr]
    planned = costs(kind, args.dims, args.steps, setup.num_params, setup.itemsize,
                    rows_in_store(args, ctx))
    E.announce(planned, ctx.log)
    model, _ = sharded_model(args, ctx, setup, planned, model, equal_batches=True)
    ctx.log(f"[{path}] {args.dims}-D slice along {args.direction}, {args.steps} steps per axis")
    res = compute_slice(model, setup.loss_fn, setup.data, dims=args.dims, direction=kind, other=other,
                        lo=lo, hi=hi, steps=args.steps, seed=args.seed, store=args.store,
                        normalization=args.normalization, progress=ctx.progress, label=path.name,
                        overwrite=args.restart)
    if ctx.main:
        if out.suffix == ".html":
            fig = res.plot_interactive() if args.dims == 1 else res.plot_interactive(kind="surface")
            save_figure(fig, out)
        else:
            save_figure(res.plot(), out)
        ctx.log(f"wrote {out}")
    summary = {"checkpoint": str(path), "checkpoint_keys": checkpoint_keys(ckpt),
               "dims": args.dims, "direction": args.direction,
               "loss_at_origin": res.loss_at_origin, "accuracy_at_origin": res.accuracy_at_origin}
    if args.dims == 1:
        i = int(max(range(len(res.loss)), key=lambda j: res.loss[j] if res.loss[j] == res.loss[j] else -1e300))
        ctx.out(format_table(["checkpoint", "L(w)", "max L on slice", "at alpha"],
                             [[path.name, res.loss_at_origin, float(res.loss[i]), float(res.alphas[i])]]))
        grid = {"alphas": res.alphas, "loss": res.loss, "accuracy": res.accuracy}
        summary["directions"] = [res.direction]
    else:
        import numpy as np

        ctx.out(format_table(["checkpoint", "L(w)", "max L on grid", "mean L on grid"],
                             [[path.name, res.loss_at_origin, float(np.nanmax(res.loss)), float(np.nanmean(res.loss))]]))
        grid = {"xs": res.xs, "ys": res.ys, "loss": res.loss, "accuracy": res.accuracy,
                "resumed_rows": res.resumed_rows}
        summary["directions"] = list(res.directions)
        summary["resumed_rows"] = int(res.resumed_rows)
        if res.resumed_rows:
            ctx.log(f"resumed {res.resumed_rows} of {args.steps} rows from {args.store}; computed "
                    f"{args.steps - res.resumed_rows}")
    ctx.write_json(envelope("slice", **summary, grid=grid, out=str(out),
                            estimate=[c.to_dict() for c in planned]))
    return 0

