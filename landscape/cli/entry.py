"""The entry point: parse, run the subcommand, and turn every failure into one line and an exit
code (2 usage, 1 runtime, 130 interrupted).

Under torchrun every rank that fails prints its own line, prefixed ``rank r:``; a failure that
the ranks shared at an agreement point (:func:`analysis.distributed.all_ranks_succeed`: loading
the data, the model or a checkpoint) is printed once, by rank 0, naming every failed rank. Every
rank exits non-zero; a rank waiting in a collective for a failed one gets an error as soon as
the failed process is gone (or after the collective timeout)."""

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
        if not _reports(exc, ctx):  # under torchrun rank 0 alone says it
            return 2
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_where(exc, ctx)}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ctx.main and _rank0():
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from analysis.distributed import RanksFailed

        code = 1
        if isinstance(exc, RanksFailed):  # usage errors on every failed rank: still a usage error
            code = 2 if all(kind == "UsageError" for _, kind, _ in exc.failures) else 1
        if not _reports(exc, ctx):
            return code
        if debug:
            traceback.print_exc()
        if isinstance(exc, RanksFailed):
            ranks = ", ".join(str(r) for r, _, _ in exc.failures)
            msg = f"{exc.step} failed on rank{'s' if len(exc.failures) > 1 else ''} {ranks}: " + \
                "; ".join(f"rank {r}: {_message(kind, text)}" for r, kind, text in exc.failures)
        else:
            msg = _message(type(exc).__name__, _first_line(exc),
                           plain=isinstance(exc, (CLIError, ValueError, TypeError, OSError)))
        print(f"{prog}: error: {_where(exc, ctx)}{msg}" + ("" if debug else " (--debug for the traceback)"),
              file=sys.stderr)
        return code
    finally:
        import gc

        from analysis import distributed as dist

        # an FSDP2 model (--fsdp) sits in reference cycles; freed only after the group is
        # destroyed, it made the process abort ("terminate called without an active
        # exception") in about one run of three
        gc.collect()
        dist.shutdown()  # no-op unless init_from_env created the group (also a 1-rank torchrun)


# the exception types whose message is shown without the type name
_PLAIN_KINDS = ("CLIError", "UsageError", "ValueError", "TypeError", "OSError", "FileNotFoundError",
                "PermissionError", "IsADirectoryError", "UnpicklingError")


def _message(kind: str, text: str, *, plain: bool | None = None) -> str:
    """One error line: the message (with its type name unless a plain kind), without the
    library's keyword-argument hints that the command line has no flag for."""
    # the library suggests a keyword argument; the CLI has no such flag
    text = text.replace(" or pass check_deterministic=False", "").replace(
        "pass check_deterministic=False", "build the DataLoader with shuffle=False")
    if plain is None:
        plain = kind in _PLAIN_KINDS
    return text if plain else f"{kind}: {text}"


def _reports(exc: BaseException, ctx: Ctx) -> bool:
    """Whether this process prints ``exc``. In a process group every rank prints its own
    failure (prefixed with its rank, :func:`_where`), and rank 0 alone a failure shared by
    :func:`analysis.distributed.all_ranks_succeed` (it names every failed rank). Without one,
    the process prints unless it is a non-zero rank of a complete torchrun environment (a stray
    ``RANK`` alone silences nothing)."""
    from analysis.distributed import RanksFailed

    if ctx.distributed:
        return ctx.main if isinstance(exc, RanksFailed) else True
    return _rank0()


def _where(exc: BaseException, ctx: Ctx) -> str:
    """``"rank r: "`` for a rank's own failure in a process group, else nothing."""
    from analysis.distributed import RanksFailed, get_rank

    return f"rank {get_rank()}: " if ctx.distributed and not isinstance(exc, RanksFailed) else ""
