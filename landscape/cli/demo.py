"""``landscape demo``: train a small CNN on the bundled digits with SGD, NAG, SAM and MSAM."""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

from ._common import CLIError, UsageError, positive_int
from .options import add_command, add_common_options
from .output import Ctx, envelope

__all__ = ["EPILOG", "register", "run"]

EPILOG = """example:
  landscape demo --out demo_out            # about 1-2 minutes on 2 CPU cores
  landscape demo --out /tmp/d --quick      # seconds (a smoke test)"""


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand to the subparsers ``sub``."""
    p = add_command(sub, "demo", "train a small CNN on the bundled digits with SGD, NAG, SAM and MSAM; report",
                    EPILOG)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs per optimizer")
    p.add_argument("--optimizers", nargs="+", default=None, metavar="NAME",
                   choices=["sgd", "nag", "sam", "msam"], help="subset of sgd nag sam msam")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads (1 by default: the models are tiny; 0 keeps torch's default)")
    add_common_options(p, needs_model=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx: Ctx) -> int:
    """Train, write the report and the checkpoints under ``--out``, print the table."""
    from ..demo import run_demo

    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be >= 0")
    out_dir = pathlib.Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out {out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {out_dir}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK):
        raise CLIError(f"--out {out_dir}: directory is not writable")
    result = run_demo(out_dir, quick=args.quick, epochs=args.epochs, seed=args.seed,
                      optimizers=args.optimizers, progress=ctx.progress, log=ctx.log,
                      threads=args.threads or None)
    ctx.out(result.table())
    ctx.out(f"\nreport: {result.report}")
    if result.config.get("width") == 16:
        ctx.out(f"checkpoints: landscape sharpness {out_dir / 'checkpoints'} "
                "--model landscape.demo:demo_model --data landscape.demo:demo_data")
    ctx.write_json(envelope("demo", **result.to_dict()))
    return 0

