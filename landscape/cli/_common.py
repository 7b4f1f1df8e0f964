"""What every subcommand of the ``landscape`` command line shares: its error types and argument
types and the one-line form of an error. Library code never imports the CLI; subcommand
modules import this one."""

from __future__ import annotations

import argparse
import math

__all__ = ["first_line", "positive_float", "positive_int", "unit_fraction"]


class CLIError(Exception):
    """A runtime failure reported as one line with exit code 1."""


class UsageError(CLIError):
    """A malformed argument value reported with exit code 2."""


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def unit_fraction(text: str) -> float:
    """argparse type: a number in the open interval (0, 1) (a relative tolerance)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v



def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
