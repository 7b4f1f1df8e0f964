"""The argument parser of the ``landscape`` command: one subcommand module after the other."""

from __future__ import annotations

import argparse

from . import demo, hessian, report, sharpness
from . import estimate_command as estimate_cmd
from . import reproduce as reproduce_cmd
from . import slice as slice_
from .options import HelpFormatter, Parser

__all__ = ["COMMANDS"]

#: The subcommand modules, in the order of ``landscape --help``.
COMMANDS = (sharpness, hessian, slice_, report, demo, estimate_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``landscape`` command (subcommands and their options)."""
    parser = Parser(
        prog="landscape",
        description="Sharpness, Hessian spectra, loss-landscape slices and reports for PyTorch "
                    "checkpoints, and a demo comparing SGD, NAG, SAM and MSAM.",
        formatter_class=HelpFormatter,
        epilog="\n\n".join(command.EPILOG for command in COMMANDS),
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub)

    reproduce_cmd.register(sub)  # its help has its own epilog (the experiments' list)
    return parser
