"""The entry point: parse, run the subcommand, and turn every failure into one line and an exit
code (2 usage, 1 runtime, 130 interrupted), from rank 0 only under torchrun."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Sequence

from ._common import CLIError, UsageError
from ._common import first_line as _first_line
from .options import rank0 as _rank0
from .output import Ctx, check_writable
from .parser import build_parser

__all__ = ["start_distributed"]


def start_distributed(args: argparse.Namespace, ctx: Ctx) -> None:
    """Join the torchrun process group (with --distributed, or automatically under torchrun)."""
    from analysis import distributed as dist

    wanted = getattr(args, "distributed", False) or (
        hasattr(dist, "launched_by_torchrun") and dist.launched_by_torchrun()
    )
    if not wanted:
        return
    if not hasattr(dist, "init_from_env"):
        raise CLIError("--distributed: this installation has no analysis.distributed.init_from_env")
    active = dist.init_from_env()
    if not active and getattr(args, "distributed", False):
        raise CLIError("--distributed needs the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR...)")
    ctx.distributed = active and dist.get_world_size() > 1
    ctx.main = dist.is_main_process()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``landscape`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    debug = bool(getattr(args, "debug", False)) or "--debug" in argv
    ctx = Ctx(args)
    prog = f"landscape {args.command}"
    try:
        start_distributed(args, ctx)
        target = getattr(args, "json", None)
        if target and target != "-":
            check_writable(target, "--json")
        t0 = time.perf_counter()
        code = args.func(args, ctx)
        ctx.log(f"done in {time.perf_counter() - t0:.1f} s")
        from analysis import distributed as dist

        # every rank done before any tears the group down: a rank that destroyed its gloo group
        # while rank 0 still wrote its output was seen to abort ("terminate called ...") in CI
        dist.barrier()
        return code
    except UsageError as exc:
        if not (ctx.main and _rank0()):  # under torchrun rank 0 alone says it
            return 2
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ctx.main and _rank0():
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not (ctx.main and _rank0()):
            return 1
        if debug:
            traceback.print_exc()
        msg = _first_line(exc)
        # the library suggests a keyword argument; the CLI has no such flag
        msg = msg.replace(" or pass check_deterministic=False", "").replace(
            "pass check_deterministic=False", "build the DataLoader with shuffle=False")
        if not isinstance(exc, (CLIError, ValueError, TypeError, OSError)):
            msg = f"{type(exc).__name__}: {msg}"
        print(f"{prog}: error: {msg}" + ("" if debug else " (--debug for the traceback)"), file=sys.stderr)
        return 1
    finally:
        from analysis import distributed as dist

        dist.shutdown()  # no-op unless init_from_env created the group (also a 1-rank torchrun)


