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

from ._common import CLIError, UsageError
from .entry import main
from .parser import build_parser
from .specs import load_data, load_model, load_object

__all__ = ["main", "build_parser", "load_object", "load_model", "load_data", "CLIError", "UsageError"]
