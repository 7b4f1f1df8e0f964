"""``landscape reproduce``: the command line of :mod:`landscape.reproduce` (the MSAM paper's experiments)."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import torch

from ..reproduce import (
    EXPERIMENTS,
    ExperimentResult,
    ReproConfig,
    load_results,
    render_markdown,
    run_all,
    run_experiment,
    write_report,
)
from ._common import CLIError, UsageError, positive_int

__all__ = ["register", "cmd_reproduce"]


def _config_from_args(args: argparse.Namespace) -> ReproConfig:
    kw: dict[str, Any] = {"device": args.device}
    if args.seeds is not None:
        kw["seeds"] = args.seeds
        kw["sweep_seeds"] = min(args.seeds, ReproConfig().sweep_seeds if not args.quick else 1)
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    return ReproConfig.quick(**kw) if args.quick else ReproConfig.full(**kw)


def cmd_reproduce(args: argparse.Namespace, ctx: Any = None) -> int:
    """CLI handler of ``landscape reproduce`` (returns the exit code)."""
    choices = list(EXPERIMENTS) + ["all", "report"]
    if args.experiment not in choices:
        raise UsageError(f"unknown experiment {args.experiment!r}; choose from {', '.join(choices)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = pathlib.Path(args.out)
    if args.experiment == "report":
        if not args.markdown:
            raise UsageError("`landscape reproduce report` needs --markdown PATH")
        if not load_results(out):
            raise CLIError(f"--out {out}: no experiment JSONs to render")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"--out {out}: {exc.strerror or exc}") from None
    progress = bool(getattr(ctx, "progress", False))
    log = getattr(ctx, "log", None)
    emit = getattr(ctx, "out", None) or (lambda s: None)
    results: list[ExperimentResult] = []
    if args.experiment == "all":
        results = run_all(config, out=out, progress=progress, log=log)
    elif args.experiment != "report":
        results = [run_experiment(args.experiment, config, out=out, progress=progress)]
    if results:
        emit(render_markdown(results).split("\n\n### ")[0])
    if args.markdown:
        path = pathlib.Path(args.markdown)
        write_report(out, path)
        if log is not None:
            log(f"wrote {path}")
    if ctx is not None and hasattr(ctx, "write_json"):
        ctx.write_json({"schema": "landscape.reproduce/1",
                        "results": [r.to_dict() for r in results]})
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``landscape reproduce EXPERIMENT [--quick] [--out DIR] [--seeds N] [--device D]``."""
    p = subparsers.add_parser(
        "reproduce", help="rerun the MSAM paper's experiments at small scale (digits)",
        description="Rerun the MSAM paper's experiments on the bundled digits: "
                    + ", ".join(EXPERIMENTS) + ", or all. Writes NAME.json and NAME.png into --out.",
        epilog="example: landscape reproduce all --out docs/reproduction "
               "--markdown docs/REPRODUCTION.md\n         landscape reproduce cosine --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", metavar="EXPERIMENT",
                   help="one of " + ", ".join(list(EXPERIMENTS) + ["all"])
                        + "; 'report' only renders --markdown from the JSONs in --out")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny data)")
    p.add_argument("--out", default="reproduction", help="output directory (default: reproduction)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="number of seeds (default: 5, 1 with --quick)")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs per run")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="also render every JSON in --out into a markdown report at PATH")
    p.add_argument("--json", default=None, metavar="PATH", help="machine-readable results ('-': stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_reproduce)
    return p
