"""The parser's building blocks: the parser class (one-line usage errors, exit 2), the help
formatter, one subcommand's parser, and the option groups the analysis commands share."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from landscape.defaults import cli_default

from ._common import positive_int

__all__ = ["HelpFormatter", "Parser", "add_command", "add_common_options", "add_model_data_options",
           "add_output_options", "rank0"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends ``(default: X)`` where the help has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" not in text and not any(default is v for v in (None, False, argparse.SUPPRESS))
                and action.option_strings and not isinstance(action, argparse._HelpAction)):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text += f" (default: {shown})"
        return text


#: Numbers that argparse must read as values, not options: ``-1``, ``-.5``, ``-1e-3``, ``-2E+4``.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def rank0() -> bool:
    """False on the non-zero ranks of a torchrun job (their error lines would repeat rank 0's).
    Only a complete torchrun environment counts: a stray ``RANK=1`` alone silences nothing."""
    from analysis.distributed import torchrun_environment_complete

    return not torchrun_environment_complete() or os.environ.get("RANK", "0") in ("", "0")


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors (exit 2, a hint to the closest choice and
    to ``--help``, printed on rank 0 only) and negative numbers such as ``-1e-3`` read as values."""
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's own misses 1e-3 forms

    def error(self, message: str):  # exit 2, one line, with a hint (rank 0 only)
        message += _choice_hint(message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n" if rank0() else None)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """As argparse's, with the closest known option suggested for a mistyped one."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser: argparse.ArgumentParser = self
            for action in self._actions:  # the subcommand's parser knows its options
                if isinstance(action, argparse._SubParsersAction) and getattr(ns, action.dest, None):
                    parser = action.choices.get(getattr(ns, action.dest), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}" + _suggest(parser, extras))
        return ns


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)$")


def _choice_hint(message: str) -> str:
    """``" (did you mean 'hessian'?)"`` for an invalid choice close to a valid one (Python 3.11's
    argparse does not suggest one itself)."""
    import difflib

    m = _INVALID_CHOICE.search(message)
    if not m or "did you mean" in message:
        return ""
    close = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _suggest(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """``" (did you mean --top-k?)"`` for unknown ``--options`` close to one of ``parser``'s
    (difflib, cutoff 0.6); empty when none is close."""
    import difflib

    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    hints, several = [], sum(w.startswith("--") for w in extras) > 1
    for word in extras:
        name = word.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) if name.startswith("--") else []
        if close:
            hints.append(f"{close[0]} for {name}" if several else close[0])
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def add_command(sub: Any, name: str, help_: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (its help as description, its example as epilog)."""
    return sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                          formatter_class=HelpFormatter)


def add_model_data_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--data``, ``--loss`` and the options of how they are loaded."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="SPEC",
                   help="module:function or path/file.py:function returning an nn.Module")
    g.add_argument("--data", required=True, metavar="SPEC",
                   help="module:function or file.py:function returning a DataLoader, an (X, y) "
                        "tuple or a list of (x, y) batches")
    g.add_argument("--loss", default="cross_entropy", metavar="LOSS",
                   help="cross_entropy, mse, lm (next-token, over counted tokens), model (the model's "
                        "output.loss), model_lm, or module:function(outputs, targets) returning "
                        "the batch mean")
    g.add_argument("--device", default="cpu", help="torch device")
    g.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default=None,
                   help="cast the model (default: keep its dtype); in bfloat16 / float16 the "
                        "eigenvalues are resolved to about 3%% / 0.4%% at best and Lanczos stops "
                        "at that floor")
    g.add_argument("--no-memory-check", action="store_true",
                   help="start even when the estimated peak memory exceeds the memory available "
                        "on the device (MemAvailable / CUDA free memory)")
    g.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="split an (X, y) tuple into batches of N (default: one batch)")
    g.add_argument("--max-samples", type=positive_int, default=None, metavar="N",
                   help="use only the first N samples")
    g.add_argument("--trust-pickle", action="store_true",
                   help="load checkpoints that need full unpickling (RUNS CODE from the file; "
                        "only for files you created)")
    g.add_argument("--non-strict", action="store_true",
                   help="load checkpoints whose keys or shapes differ from the model (listed)")
    g.add_argument("--prefix", default=None, metavar="PREFIX",
                   help="take the checkpoint keys under PREFIX, e.g. model. for a Lightning module "
                        "(default: detected when exactly one prefix fits; '' turns that off)")


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``--json``, ``--seed``, ``--quiet``, ``--debug`` and ``--distributed``."""
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", default=None,
                   help="write machine-readable results to PATH ('-' for stdout)")
    o.add_argument("--seed", type=int, default=cli_default("*", "--seed"),
                   help="seed for random directions and probes")
    o.add_argument("--quiet", action="store_true",
                   help="no progress bars, cost estimates or messages on stderr")
    o.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors")
    o.add_argument("--distributed", action="store_true",
                   help="shard the data across torchrun processes (automatic under torchrun)")


def add_common_options(p: argparse.ArgumentParser, *, needs_model: bool = True) -> None:
    """The shared option groups: model and data (for the analysis commands), then output."""
    if needs_model:
        add_model_data_options(p)
    add_output_options(p)
