"""The ``landscape`` command line: sharpness, Hessian spectra, slices and reports of checkpoints.

Usage (``landscape COMMAND --help`` shows every option with an example)::

    landscape sharpness ckpts/ --model mypkg.models:resnet --data mypkg.data:val_loader
    landscape hessian model.pt --model net.py:build --data net.py:data --top-k 5 --trace
    landscape slice model.pt --model net.py:build --data net.py:data --dims 2 --out fig.html
    landscape report a.pt b.pt --model net.py:build --data net.py:data --out report.html
    landscape demo --out demo_out

Models and data are named as ``module:function`` or ``path/to/file.py:function``: a callable
that returns an ``nn.Module``, or the data (a DataLoader, an ``(X, y)`` tuple or a list of
``(x, y)`` batches). The object itself may also be given (``module:MODEL``).

Exit codes: 0 success, 2 usage errors (including ``--top-k``/``--m`` above what the model or the
data allow, checked before any forward pass), 1 runtime failures (a one-line cause on stderr;
the traceback only with ``--debug``; under torchrun from rank 0 only). Every checkpoint is
header-checked before anything is computed (one line names every bad file); when one of several
checkpoints fails mid-run, ``sharpness`` and ``report`` keep the others (in the table, the report
and ``--json``, with ``"errors"``) and exit 1. Every file is written atomically
(:mod:`landscape._atomic`); option defaults come from :mod:`landscape.defaults`. Tables go to stdout, progress bars to stderr; ``--json PATH``
(``-`` for stdout) writes a stable machine-readable document (``"schema": "landscape.<command>/1"``).
Under ``torchrun`` (or with ``--distributed``) the data is sharded across processes and only rank 0
prints and writes files. Before ``sharpness``, ``hessian``, ``slice`` and ``report`` start their
data passes, one line per analysis on stderr predicts its cost (Hessian-vector products or
forward passes, data passes, peak extra memory; :mod:`landscape.cli.estimate`), also in the JSON
document under ``"estimate"``.

One concept per module: :mod:`._common` (errors, argument types), :mod:`.output` (context, JSON
envelope, atomic writes), :mod:`.specs` (``--model``/``--data``/``--loss``), :mod:`.setup`
(model, data, loss, device of a run), :mod:`.files` (checkpoint arguments), :mod:`.estimate`
(cost formulas), :mod:`.options` and :mod:`.parser` (the parser), one module per subcommand
(:mod:`.sharpness`, :mod:`.hessian`, :mod:`.slice`, :mod:`.report`, :mod:`.demo`, each with
``register(subparsers)`` and ``run(args, ctx)``) and :mod:`.entry` (:func:`main`). Nothing in
the library imports the CLI.
"""


from __future__ import annotations

from landscape._format import format_table

from ._common import CLIError, UsageError
from ._common import first_line as _first_line
from ._common import positive_float as _positive_float
from ._common import positive_int as _positive_int
from .demo import run as cmd_demo
from .entry import main
from .entry import start_distributed as _start_distributed
from .files import checkpoint_paths as _checkpoints
from .files import header_problem as _header_problem
from .files import keys_note as _keys_note
from .files import label as _label
from .files import one_checkpoint as _one_checkpoint
from .files import per_file as _per_file
from .files import raise_failures as _raise_failures
from .hessian import run as cmd_hessian
from .options import HelpFormatter as _HelpFormatter
from .options import Parser as _Parser
from .options import rank0 as _rank0
from .output import SCHEMA_VERSION
from .output import Ctx as _Ctx
from .output import check_writable as _check_writable
from .output import envelope as _envelope
from .output import save_figure as _save_figure
from .output import write_text as _write_text
from .parser import build_parser
from .report import run as cmd_report
from .setup import Setup as _Setup
from .sharpness import data_size_check as _data_size_check
from .sharpness import run as cmd_sharpness
from .sharpness import settings_notes as _settings_notes
from .slice import parse_direction as _parse_direction
from .slice import run as cmd_slice
from .specs import load_data, load_model, load_object
from .specs import resolve_loss as _resolve_loss

__all__ = ["main", "build_parser", "load_object", "load_model", "load_data", "CLIError", "UsageError"]

# the old module's private names, kept reachable from ``landscape.cli`` (tests and users' code)
_PRIVATE = (_first_line, _positive_float, _positive_int, _start_distributed, _checkpoints,
            _header_problem, _keys_note, _label, _one_checkpoint, _per_file, _raise_failures,
            _HelpFormatter, _Parser, _rank0, _Ctx, _check_writable, _envelope, _save_figure,
            _write_text, _Setup, _data_size_check, _settings_notes, _parse_direction, _resolve_loss,
            format_table, SCHEMA_VERSION, cmd_demo, cmd_hessian, cmd_report, cmd_sharpness, cmd_slice)
