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
prints and writes files.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import pathlib
import re
import stat
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from landscape._format import format_table, format_value
from landscape.defaults import cli_default

from ._common import CLIError, UsageError
from ._common import positive_float as _positive_float
from ._common import positive_int as _positive_int

__all__ = ["main", "build_parser", "load_object", "load_model", "load_data", "CLIError", "UsageError"]

SCHEMA_VERSION = 1




# ---------------------------------------------------------------------------------------------
# output helpers (rank 0 only)


class _Ctx:
    """Per-invocation settings: progress, distributed, where output goes."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.progress = not getattr(args, "quiet", False)
        self.distributed = False
        self.main = True

    def log(self, msg: str) -> None:
        if self.main and self.progress:
            print(msg, file=sys.stderr, flush=True)

    def out(self, text: str) -> None:
        """A table or summary: stdout, or stderr when stdout carries the JSON document."""
        if not self.main:
            return
        stream = sys.stderr if getattr(self.args, "json", None) == "-" else sys.stdout
        print(text, file=stream, flush=True)

    def write_json(self, doc: dict) -> None:
        target = getattr(self.args, "json", None)
        if not target or not self.main:
            return
        from analysis.results import to_jsonable

        text = json.dumps(to_jsonable(doc), indent=2, sort_keys=False, allow_nan=False)
        if target == "-":
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        else:
            _write_text(target, text + "\n")
            self.log(f"wrote {target}")


def _check_writable(path: str | os.PathLike, what: str = "output") -> pathlib.Path:
    """Fail early (before any computation) when ``path`` cannot be written.

    The path must not be a directory; its parent must exist (or be created here) and accept a
    new file (probed with a temporary file, so that read-only or virtual file systems such as
    ``/proc`` fail now rather than after the computation); an existing file must be writable.
    """
    import tempfile

    p = pathlib.Path(path)
    if p.is_dir():
        raise CLIError(f"cannot write {what} {p}: it is a directory")
    parent = p.parent if str(p.parent) else pathlib.Path(".")
    for anc in [parent, *parent.parents]:
        if anc.exists():
            if not anc.is_dir():
                raise CLIError(f"cannot write {what} {p}: {anc} is a file, not a directory")
            break
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"cannot write {what} {p}: cannot create directory {parent}: "
                           f"{exc.strerror or exc}") from None
    if not parent.is_dir():
        raise CLIError(f"cannot write {what} {p}: {parent} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".landscape-probe-"):
            pass
    except OSError as exc:
        raise CLIError(f"cannot write {what} {p}: directory {parent} is not writable "
                       f"({exc.strerror or exc})") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise CLIError(f"cannot write {what} {p}: the file is not writable")
    return p


def _write_text(path: str | os.PathLike, text: str) -> None:
    from .._atomic import atomic_write

    p = _check_writable(path)
    try:
        with atomic_write(p) as f:  # an old file survives a full disk
            f.write(text)
    except OSError as exc:
        raise CLIError(f"cannot write {p}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# model / data specs


def load_object(spec: str, what: str = "object") -> Any:
    """Import ``module:attr`` or ``path/to/file.py:attr`` (``attr`` may be dotted).

    Raises:
        UsageError: the spec has no ``:`` or an empty part.
        CLIError: the module or file does not import, or has no such attribute.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise UsageError(
            f"--{what} {spec!r} must look like 'module:function' or 'path/to/file.py:function'"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"--{what} {spec!r}: both the module and the function name are needed")
    try:
        if target.endswith(".py") or os.sep in target or "/" in target:
            path = pathlib.Path(target)
            if not path.is_file():
                raise CLIError(f"--{what} {spec!r}: file {target} not found")
            name = f"_landscape_spec_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                sys.path.insert(0, str(path.resolve().parent))
                mod_spec = importlib.util.spec_from_file_location(name, path)
                if mod_spec is None or mod_spec.loader is None:
                    raise CLIError(f"--{what} {spec!r}: cannot import {target}")
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module
                try:
                    mod_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(f"--{what} {spec!r}: importing {target} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--{what} {spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str) -> Any:
    """Build the model named by ``spec`` (a callable returning an ``nn.Module``, or a module)."""
    from torch import nn

    obj = load_object(spec, "model")
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise CLIError(f"--model {spec!r} is a {type(obj).__name__}, not a callable or an nn.Module")
        try:
            obj = obj()
        except Exception as exc:
            raise CLIError(f"--model {spec!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(obj, nn.Module):
        raise CLIError(f"--model {spec!r} returned a {type(obj).__name__}, expected a torch.nn.Module")
    return obj


def load_data(spec: str, *, batch_size: int | None = None, max_samples: int | None = None,
              shard: bool = False) -> Any:
    """The data named by ``spec`` as a :class:`analysis.data.DataSource`."""
    from torch.utils.data import DataLoader

    from analysis.data import as_data

    obj = load_object(spec, "data")
    if callable(obj) and not isinstance(obj, (DataLoader, tuple, list)):
        try:
            obj = obj()
        except Exception as exc:
            raise CLIError(f"--data {spec!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        source = as_data(obj, batch_size=batch_size, max_samples=max_samples, shard=shard)
        if shard:
            from analysis.data import batch_size_of
            from analysis.distributed import get_world_size

            world = get_world_size()
            if source.kind == "pair" and batch_size is None:
                # one batch per process, so that every rank gets a share of the samples
                n = batch_size_of(obj[1])
                if max_samples is not None:
                    n = min(n, max_samples)
                source = as_data(obj, batch_size=max(1, math.ceil(n / world)),
                                 max_samples=max_samples, shard=True)
            elif source.kind == "batches" and len(obj) < world:
                raise CLIError(f"--data {spec!r}: {len(obj)} batches for {world} processes; "
                               "every process needs at least one batch")
        return source
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--data {spec!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_loss(spec: str) -> Callable:
    from analysis.evaluation import resolve_loss

    if spec in ("cross_entropy", "mse", "lm", "causal_lm", "model", "model_lm"):
        return resolve_loss(spec)
    fn = load_object(spec, "loss")
    if not callable(fn):
        raise CLIError(f"--loss {spec!r} is not callable")
    return fn


class _Setup:
    """Model factory, data, loss and device for the analysis commands."""

    def __init__(self, args: argparse.Namespace, ctx: _Ctx, *,
                 check_data: Callable[[Any], None] | None = None,
                 check_model: Callable[[Any], None] | None = None):
        """``check_data(source)`` runs right after the data is loaded, ``check_model(model)``
        right after the model is built, both before any forward pass (for option values that
        depend on the data size or the number of parameters)."""
        import torch

        self.args = args
        self.ctx = ctx
        self.loss_fn = _resolve_loss(args.loss)
        try:
            self.device = torch.device(args.device)
        except RuntimeError as exc:
            raise UsageError(f"--device {args.device!r}: {_first_line(exc)}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
        self.dtype = {"float32": torch.float32, "float64": torch.float64, None: None}[args.dtype]
        self.data = load_data(args.data, batch_size=args.batch_size, max_samples=args.max_samples,
                              shard=ctx.distributed)
        if check_data is not None:
            check_data(self.data)
        # build one model now: a bad spec or data that do not fit fail before any work
        self._spare: Any = self.model()
        if check_model is not None:
            check_model(self._spare)
        self.check_fit(self._spare)

    def model(self) -> Any:
        spare, self._spare = getattr(self, "_spare", None), None
        if spare is not None:
            return spare
        m = load_model(self.args.model)
        if self.dtype is not None:
            m = m.to(self.dtype)
        return m.to(self.device)

    def load(self, path: pathlib.Path) -> tuple[Any, Any]:
        """A fresh model with the checkpoint's weights, and the :class:`Checkpoint`."""
        from ..checkpoints import load_checkpoint

        model = self.model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = load_checkpoint(path, model, map_location=self.device, strict=not self.args.non_strict,
                                   allow_pickle=self.args.trust_pickle, prefix=getattr(self.args, "prefix", None))
        for w in caught:
            self.ctx.log(f"warning: {w.message}")
        from ..report import checkpoint_keys, describe_checkpoint_keys

        text = describe_checkpoint_keys(checkpoint_keys(ckpt))
        if text:
            self.ctx.log(f"warning: {path}: {text}")
        return model, ckpt

    def check_fit(self, model: Any) -> None:
        """Run the first batch through the model: wrong shapes fail here in one line."""
        import torch

        from analysis.data import DataSource, to_device
        from analysis.evaluation import forward, model_device_dtype, model_mode

        device, dtype = model_device_dtype(model)
        src = self.data
        unsharded = DataSource(src.data, batch_size=src.batch_size, max_samples=src.max_samples)
        batch = next(iter(unsharded))
        try:
            with torch.no_grad(), model_mode(model, "eval"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. mse broadcasting: the error below says it
                out = forward(model, to_device(batch.inputs, device, dtype))
                loss = self.loss_fn(out, to_device(batch.targets, device, dtype))
        except Exception as exc:
            hint = ("; --loss mse needs float targets shaped like the outputs (class labels need "
                    "cross_entropy)" if self.args.loss == "mse" else "")
            raise CLIError(
                f"the data does not fit the model: {type(exc).__name__}: {_first_line(exc)}{hint}"
            ) from None
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise CLIError("the loss function must return a scalar (the batch mean)")


_CKPT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def _checkpoint_format(path: pathlib.Path) -> str | None:
    """``"torch"`` (zip archive or legacy pickle), ``"safetensors"`` or ``None``, by the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "unknown"  # let the loader report the real error
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip / pickle protocol >= 2
        return "torch"
    if len(head) >= 9 and 0 < int.from_bytes(head[:8], "little") < 1 << 32 and head[8:9] == b"{":
        return "safetensors"  # u64 little-endian header length, then a JSON object
    return None


def _header_problem(path: pathlib.Path) -> str | None:
    """What is wrong with ``path`` as a checkpoint, from a cheap look at it (``None``: looks fine).

    A regular, non-empty file; a zip archive (``torch.save``) must have a readable central
    directory (a truncated copy has none), a safetensors file a JSON header and at least the
    bytes its header announces; a legacy pickle is accepted as is. Reads a few bytes (plus the
    zip directory at the end of the file), never the tensors.
    """
    import zipfile

    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                "a directory" if stat.S_ISDIR(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        return f"is {kind}, not a regular file"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if head.startswith(b"PK"):
                try:
                    zipfile.ZipFile(f).close()
                except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                    return f"is a damaged or truncated zip archive ({_first_line(exc)})"
                return None
            if head[:1] == b"\x80":
                return None
            fmt = _checkpoint_format(path)
            if fmt == "safetensors":
                n = int.from_bytes(head[:8], "little")
                if 8 + n > st.st_size:
                    return f"is a truncated safetensors file (header of {n} bytes, file of {st.st_size})"
                f.seek(8)
                try:
                    header = json.loads(f.read(n))
                except (ValueError, UnicodeDecodeError) as exc:
                    return f"has a damaged safetensors header ({_first_line(exc)})"
                if not isinstance(header, dict):
                    return "has a damaged safetensors header (not a JSON object)"
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"
                        and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
                        and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)]
                need = 8 + n + max(ends, default=0)
                if need > st.st_size:
                    return f"is a truncated safetensors file ({need} bytes announced, {st.st_size} present)"
                return None
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if path.suffix in _CKPT_SUFFIXES:
        kind = ("a PNG image" if head.startswith(b"\x89PNG") else
                "text/JSON" if head.lstrip()[:1] in (b"{", b"[") else f"starts with {head[:8]!r}")
        return (f"is not a checkpoint (its content is {kind}, neither a torch.save archive or "
                "pickle nor safetensors)")
    return None


def _checkpoints(paths: Sequence[str]) -> list[pathlib.Path]:
    """Expand files and directories; refuse, in one line naming each, files that are not
    readable checkpoints (before anything is computed)."""
    from ..checkpoints import CheckpointError, checkpoint_format, find_checkpoints

    found = find_checkpoints(list(paths))
    problems = []
    for p in found:
        if p.is_dir():  # a Hugging Face save_pretrained folder: the loader checks its files
            continue
        problem = _header_problem(p)
        if problem is not None:
            problems.append(f"{p} {problem}")
            continue
        if p.suffix in _CKPT_SUFFIXES:
            continue
        try:  # any name: the format is read from the content (never opens a FIFO)
            checkpoint_format(p)
        except CheckpointError as exc:
            problems.append(_first_line(exc))
    if len(problems) == 1:
        raise CLIError(problems[0] + ("" if len(found) == 1 else " (nothing was computed)"))
    if problems:
        raise CLIError(f"{len(problems)} of {len(found)} checkpoints cannot be used (nothing was "
                       f"computed): " + "; ".join(problems))
    return found


def _one_checkpoint(command: str, spec: str) -> pathlib.Path:
    paths = _checkpoints([spec])
    if len(paths) != 1:
        raise UsageError(f"{command} takes one checkpoint; {spec} holds {len(paths)} "
                         f"({', '.join(p.name for p in paths[:4])}{', ...' if len(paths) > 4 else ''})")
    return paths[0]


def _label(path: pathlib.Path, all_paths: Sequence[pathlib.Path]) -> str:
    names = [p.name for p in all_paths]
    return path.name if names.count(path.name) == 1 else str(path)


def _envelope(command: str, **body: Any) -> dict:
    return {"schema": f"landscape.{command}/{SCHEMA_VERSION}", "command": command, **body}


# ---------------------------------------------------------------------------------------------
# commands


def _data_size_check(args: argparse.Namespace, ctx: _Ctx) -> Callable[[Any], None]:
    """``--m`` must not exceed the samples (after --max-samples; per process under torchrun)."""

    def check(source: Any) -> None:
        if args.m is None:
            return
        n = source.num_samples()
        if args.m > n:
            where = f" (this process's share of {ctx.args.data} under torchrun)" if ctx.distributed else ""
            cap = f" after --max-samples {args.max_samples}" if args.max_samples else ""
            raise UsageError(f"--m {args.m} is larger than the {n} samples of --data{cap}{where}; "
                             f"pass --m {n} or less")

    return check


def _keys_note(records: Sequence[dict], paths: Sequence[pathlib.Path]) -> list[str]:
    from ..report import describe_checkpoint_keys

    notes = []
    for r in records:
        text = describe_checkpoint_keys(r.get("checkpoint_keys") or {})
        if text:
            notes.append(f"* {_label(pathlib.Path(r['checkpoint']), paths)}: {text}")
    return notes


def _per_file(paths: Sequence[pathlib.Path], ctx: _Ctx, work: Callable[[pathlib.Path], Any]
              ) -> tuple[list[Any], list[dict]]:
    """Run ``work`` on every checkpoint; a failure of one of several files is recorded
    (``{"checkpoint", "error"}``) and the others go on, so nothing computed is lost."""
    results: list[Any] = []
    failures: list[dict] = []
    for path in paths:
        try:
            results.append(work(path))
        except (KeyboardInterrupt, UsageError):
            raise
        except Exception as exc:
            if len(paths) == 1:
                raise
            msg = _first_line(exc)
            if not isinstance(exc, (CLIError, ValueError, TypeError, OSError)):
                msg = f"{type(exc).__name__}: {msg}"
            failures.append({"checkpoint": str(path), "error": msg})
            ctx.log(f"error: {path}: {msg}")
    return results, failures


def _raise_failures(failures: Sequence[dict], paths: Sequence[pathlib.Path], kept: str) -> None:
    if failures and len(failures) == len(paths):
        raise CLIError(f"all {len(paths)} checkpoints failed; first error: {failures[0]['checkpoint']}: "
                       f"{failures[0]['error']}")
    if failures:
        names = ", ".join(_label(pathlib.Path(f["checkpoint"]), paths) for f in failures)
        raise CLIError(f"{len(failures)} of {len(paths)} checkpoints failed ({names}); the others "
                       f"were computed{kept}; first error: {failures[0]['error']}")


def cmd_sharpness(args: argparse.Namespace, ctx: _Ctx) -> int:
    from ..report import METRIC_NAMES, checkpoint_keys, checkpoint_metrics

    metrics = args.metric or list(METRIC_NAMES[:3])
    if args.rho is not None and not (math.isfinite(args.rho) and args.rho > 0):
        raise UsageError(f"--rho {args.rho}: need a finite number > 0")
    paths = _checkpoints(args.checkpoints)
    setup = _Setup(args, ctx, check_data=_data_size_check(args, ctx))

    def work(path: pathlib.Path) -> dict:
        ctx.log(f"[{path}] computing {', '.join(metrics)}")
        model, ckpt = setup.load(path)
        values = checkpoint_metrics(model, setup.loss_fn, setup.data, metrics, rho=args.rho,
                                    m=args.m, seed=args.seed, progress=ctx.progress)
        keys = checkpoint_keys(ckpt)
        return {"checkpoint": str(path), "perturbed": ckpt.perturbed, **values,
                **({"checkpoint_keys": keys} if any(keys.values()) else {})}

    records, failures = _per_file(paths, ctx, work)
    header = ["checkpoint", "loss", "accuracy", *metrics]
    rows = [[_label(pathlib.Path(r["checkpoint"]), paths) + (" *" if r.get("checkpoint_keys") else ""),
             r["loss"], r["accuracy"], *[r["metrics"][m] for m in metrics]] for r in records]
    rows += [[_label(pathlib.Path(f["checkpoint"]), paths) + " (failed)", None, None,
              *[None] * len(metrics)] for f in failures]
    text = format_table(header, rows)
    notes = _settings_notes(metrics, records, m_given=args.m is not None)
    notes += _keys_note(records, paths)
    notes += [f"failed: {_label(pathlib.Path(f['checkpoint']), paths)}: {f['error']}" for f in failures]
    if notes:
        text += "\n" + "\n".join(notes)
    ctx.out(text)
    settings = records[0].get("settings", {}) if records else {}
    ctx.write_json(_envelope("sharpness", metrics=metrics, rho=args.rho, m=args.m,
                             settings={k: settings.get(k, {}) for k in metrics}, checkpoints=records,
                             errors=failures))
    _raise_failures(failures, paths, " and written to --json" if args.json else "")
    return 0


def cmd_hessian(args: argparse.Namespace, ctx: _Ctx) -> int:
    from ..report import checkpoint_keys, hessian_summary

    if args.density:
        _check_writable(args.density, "--density")
        if pathlib.Path(args.density).suffix not in (".png", ".pdf", ".svg", ".html"):
            raise UsageError(f"--density {args.density}: use .png, .pdf, .svg or .html")
    path = _one_checkpoint("hessian", args.checkpoint)

    def check_top_k(model: Any) -> None:  # known once the model exists, before any data pass
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if args.top_k > n:
            raise UsageError(f"--top-k {args.top_k} is larger than the model's {n} trainable "
                             f"parameters; pass --top-k {n} or less")

    setup = _Setup(args, ctx, check_model=check_top_k)
    model, ckpt = setup.load(path)
    ctx.log(f"[{path}] top-{args.top_k} Hessian eigenvalues" + (" + trace" if args.trace else ""))
    summary = hessian_summary(model, setup.loss_fn, setup.data, top_k=args.top_k, trace=args.trace,
                              density=bool(args.density), seed=args.seed, progress=ctx.progress,
                              tol=args.tol, density_iter=args.density_iter,
                              density_runs=args.density_runs)
    res = summary.get("residuals") or [None] * len(summary["eigenvalues"])
    rows = [[i + 1, float(v), r] for i, (v, r) in enumerate(zip(summary["eigenvalues"], res))]
    text = format_table(["k", "eigenvalue", "residual ||Hv - lambda v||"], rows)
    if summary.get("converged") is False:
        text += "\nwarning: Lanczos stopped before reaching --tol (see the residuals)"
    if summary.get("trace") is not None:
        text += f"\ntrace ~ {summary['trace']:.6g} (Hutch++, standard error {summary['trace_stderr']:.2g})"
    if getattr(args, "per_layer", False):
        from analysis.blocks import per_layer_spectrum

        layers = per_layer_spectrum(model, setup.loss_fn, setup.data, k=args.top_k,
                                    trace=args.trace, tol=args.tol, seed=args.seed,
                                    progress=ctx.progress)
        rows = [[lay.name, lay.num_params, lay.eigenvalues[0], lay.trace] for lay in layers.layers]
        text += "\n\nper-layer diagonal Hessian blocks\n" + format_table(
            ["module", "parameters", "top eigenvalue", "trace"], rows)
        summary["per_layer"] = layers.to_dict()["layers"]
    ctx.out(text)
    if args.density and ctx.main:
        if pathlib.Path(args.density).suffix == ".html":
            from ..report import density_figure

            fig = density_figure({path.name: summary["density"]})
        else:
            from ..plots import plot_spectral_density

            fig = plot_spectral_density(summary["density"], label=path.name)
        _save_figure(fig, args.density)
        ctx.log(f"wrote {args.density}")
    doc = {k: v for k, v in summary.items() if k != "density"}
    if summary.get("density") is not None:
        doc["density"] = {"grid": summary["density"]["grid"], "density": summary["density"]["density"]}
    ctx.write_json(_envelope("hessian", checkpoint=str(path), checkpoint_keys=checkpoint_keys(ckpt), **doc))
    return 0


def _settings_notes(metrics: Sequence[str], records: Sequence[dict], *, m_given: bool = True) -> list[str]:
    """One footnote per worst/average metric: the rho, m and steps/samples it used (and, when
    the default m was capped at a small data set's size, that it was)."""
    default_m = cli_default("sharpness", "--m")
    notes = []
    for name in metrics:
        if name.removesuffix("_plain") not in ("worst", "average"):
            continue
        seen = {(st.get("rho"), st.get("m"), st.get("steps"), st.get("samples"), st.get("adaptive"))
                for st in (r.get("settings", {}).get(name, {}) for r in records)}
        for rho, m, steps, samples, adaptive in sorted(seen, key=str):
            capped = not m_given and isinstance(m, int) and m < default_m
            parts = [f"rho={format_value(rho)}",
                     f"m={m}" + (f" (the default {default_m} capped at the {m} samples; set --m "
                                 "to choose)" if capped else "")]
            parts.append(f"{steps} ascent steps" if steps is not None else f"{samples} samples")
            parts.append("adaptive (c=|w|)" if adaptive else "plain (c=1)")
            notes.append(f"{name}: " + ", ".join(parts))
    return notes


def _parse_direction(spec: str) -> tuple[str, str | None]:
    kind, _, arg = spec.partition(":")
    if kind not in ("random", "gradient", "eigen", "interpolate", "pca"):
        raise UsageError(
            f"--direction {spec!r}: choose random, gradient, eigen, interpolate:CKPT2 or pca:DIR"
        )
    if kind in ("interpolate", "pca") and not arg:
        raise UsageError(f"--direction {kind} needs an argument: {kind}:PATH")
    return kind, (arg or None)


def cmd_slice(args: argparse.Namespace, ctx: _Ctx) -> int:
    from ..report import checkpoint_keys, compute_slice

    kind, arg = _parse_direction(args.direction)
    if kind == "interpolate" and args.dims != 1:
        raise UsageError("--direction interpolate:CKPT2 gives a 1-D slice; use --dims 1")
    out = _check_writable(args.out, "--out")
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
        _check_writable(args.store, "--store")
    elif args.restart:
        raise UsageError("--restart applies to --store (it replaces the store file)")
    path = _one_checkpoint("slice", args.checkpoint)
    # the checkpoints the direction needs are header-checked up front too
    extra = _one_checkpoint("slice", arg) if kind == "interpolate" else (
        _checkpoints([arg]) if kind == "pca" else None)  # type: ignore[list-item]
    setup = _Setup(args, ctx)
    model, ckpt = setup.load(path)
    other = None
    if kind == "interpolate":
        other, _ = setup.load(extra)  # type: ignore[arg-type]
    elif kind == "pca":
        other = [setup.load(p)[0].state_dict() for p in extra]  # type: ignore[union-attr]
    ctx.log(f"[{path}] {args.dims}-D slice along {args.direction}, {args.steps} steps per axis")
    res = compute_slice(model, setup.loss_fn, setup.data, dims=args.dims, direction=kind, other=other,
                        lo=lo, hi=hi, steps=args.steps, seed=args.seed, store=args.store,
                        normalization=args.normalization, progress=ctx.progress, label=path.name,
                        overwrite=args.restart)
    if ctx.main:
        if out.suffix == ".html":
            fig = res.plot_interactive() if args.dims == 1 else res.plot_interactive(kind="surface")
            _save_figure(fig, out)
        else:
            _save_figure(res.plot(), out)
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
    ctx.write_json(_envelope("slice", **summary, grid=grid, out=str(out)))
    return 0


def cmd_report(args: argparse.Namespace, ctx: _Ctx) -> int:
    import dataclasses

    from ..report import analyze_checkpoint, checkpoint_keys, describe_checkpoint_keys, write_report

    if not pathlib.Path(args.out).is_dir() and pathlib.Path(args.out).suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {args.out}: the report is HTML; use a .html or .htm file")
    if args.steps_1d < 2:
        raise UsageError(f"--steps-1d {args.steps_1d}: need at least 2")
    if args.steps_2d < 2:
        raise UsageError(f"--steps-2d {args.steps_2d}: need at least 2")
    if not (math.isfinite(args.radius) and args.radius > 0):
        raise UsageError(f"--radius {args.radius}: need a finite number > 0")
    out = _check_writable(args.out, "--out")
    paths = _checkpoints(args.checkpoints)
    setup = _Setup(args, ctx)

    def work(path: pathlib.Path) -> Any:
        ctx.log(f"[{path}] metrics, slices and spectral density")
        model, ckpt = setup.load(path)
        entry = analyze_checkpoint(model, setup.loss_fn, setup.data, name=_label(path, paths),
                                   steps_1d=args.steps_1d, steps_2d=args.steps_2d,
                                   radius=args.radius, seed=args.seed, progress=ctx.progress,
                                   density=not args.no_density)
        keys = checkpoint_keys(ckpt)
        return dataclasses.replace(entry, checkpoint_keys=keys) if any(keys.values()) else entry

    entries, failures = _per_file(paths, ctx, work)
    failed_notes = [f"failed: {_label(pathlib.Path(f['checkpoint']), paths)}: {f['error']}" for f in failures]
    if ctx.main and entries:
        write_report(entries, out, title=args.title, notes=failed_notes)
        ctx.log(f"wrote {out}")
    header = ["checkpoint", "loss", "accuracy", "lambda_max", "sharpness"]
    text = format_table(header, [[e.name + (" *" if e.checkpoint_keys else ""), e.metrics.get("loss"),
                                  e.metrics.get("accuracy"), e.metrics.get("lambda_max"),
                                  e.metrics.get("sharpness")] for e in entries])
    notes = [f"* {e.name}: {describe_checkpoint_keys(e.checkpoint_keys)}" for e in entries if e.checkpoint_keys]
    ctx.out("\n".join([text, *notes, *failed_notes]))
    ctx.write_json(_envelope("report", out=str(out), checkpoints=[e.summary() for e in entries],
                             errors=failures))
    _raise_failures(failures, paths, " and written to the report" + (" and --json" if args.json else ""))
    return 0


def cmd_demo(args: argparse.Namespace, ctx: _Ctx) -> int:
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
    ctx.write_json(_envelope("demo", **result.to_dict()))
    return 0


def _save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Write a matplotlib or plotly figure atomically (temporary file + rename)."""
    from .._atomic import atomic_path, atomic_write

    p = _check_writable(path)
    try:
        if hasattr(fig, "savefig"):
            import matplotlib.pyplot as plt

            try:
                with atomic_path(p) as tmp:
                    fig.savefig(tmp, format=p.suffix.lstrip(".").lower(), dpi=120, bbox_inches="tight")
            finally:
                plt.close(fig)
        elif p.suffix == ".html":
            with atomic_write(p) as f:
                fig.write_html(f, include_plotlyjs=True)
        else:
            raise CLIError(f"cannot write a {type(fig).__name__} to {p}")
    except OSError as exc:
        raise CLIError(f"cannot write {p}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# parser

_EPILOG = {
    "sharpness": """example:
  landscape sharpness runs/ --model mypkg.models:resnet18 --data mypkg.data:val_loader \\
      --metric worst --metric worst_plain --metric lambda_max --json sharpness.json""",
    "hessian": """example:
  landscape hessian model.pt --model net.py:build --data net.py:data --top-k 5 --trace \\
      --density density.png""",
    "slice": """example:
  landscape slice model.pt --model net.py:build --data net.py:data --dims 2 \\
      --direction random --range -1 1 --steps 21 --out surface.html --store grid.npz""",
    "report": """example:
  landscape report sgd.pt msam.pt --model net.py:build --data net.py:data --out report.html""",
    "demo": """example:
  landscape demo --out demo_out            # about 1-2 minutes on 2 CPU cores
  landscape demo --out /tmp/d --quick      # seconds (a smoke test)""",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
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


def _rank0() -> bool:
    """False on the non-zero ranks of a torchrun job (their error lines would repeat rank 0's)."""
    return os.environ.get("RANK", "0") in ("", "0")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's own misses 1e-3 forms

    def error(self, message: str):  # exit 2, one line, with a hint (rank 0 only)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n" if _rank0() else None)


def _common(p: argparse.ArgumentParser, *, needs_model: bool = True) -> None:
    g = p.add_argument_group("model and data")
    if needs_model:
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
        g.add_argument("--dtype", choices=["float32", "float64"], default=None,
                       help="cast the model (default: keep its dtype)")
        g.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help="split an (X, y) tuple into batches of N (default: one batch)")
        g.add_argument("--max-samples", type=_positive_int, default=None, metavar="N",
                       help="use only the first N samples")
        g.add_argument("--trust-pickle", action="store_true",
                       help="load checkpoints that need full unpickling (RUNS CODE from the file; "
                            "only for files you created)")
        g.add_argument("--non-strict", action="store_true",
                       help="load checkpoints whose keys or shapes differ from the model (listed)")
        g.add_argument("--prefix", default=None, metavar="PREFIX",
                       help="take the checkpoint keys under PREFIX, e.g. model. for a Lightning module "
                            "(default: detected when exactly one prefix fits; '' turns that off)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", default=None,
                   help="write machine-readable results to PATH ('-' for stdout)")
    o.add_argument("--seed", type=int, default=cli_default("*", "--seed"),
                   help="seed for random directions and probes")
    o.add_argument("--quiet", action="store_true", help="no progress bars or messages on stderr")
    o.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors")
    o.add_argument("--distributed", action="store_true",
                   help="shard the data across torchrun processes (automatic under torchrun)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``landscape`` command (subcommands and their options)."""
    from ..report import METRIC_NAMES

    parser = _Parser(
        prog="landscape",
        description="Sharpness, Hessian spectra, loss-landscape slices and reports for PyTorch "
                    "checkpoints, and a demo comparing SGD, NAG, SAM and MSAM.",
        formatter_class=_HelpFormatter,
        epilog="\n\n".join(_EPILOG.values()),
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=_EPILOG.get(name),
                              formatter_class=_HelpFormatter)

    p = add("sharpness", "table of sharpness metrics for one or many checkpoints")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files or directories")
    p.add_argument("--metric", action="append", choices=list(METRIC_NAMES), metavar="NAME",
                   help=f"repeatable; one of {', '.join(METRIC_NAMES)} "
                        f"(default: {', '.join(METRIC_NAMES[:3])})")
    p.add_argument("--rho", type=float, default=None,
                   help="perturbation radius rho of the worst/average metrics (default: each metric's "
                        "own, recorded in the JSON and shown under the table)")
    p.add_argument("--m", type=_positive_int, default=None, metavar="M",
                   help="samples per batch m of the worst/average m-sharpness metrics "
                        f"(default: min({cli_default('sharpness', '--m')}, N), N the samples)")
    _common(p)
    p.set_defaults(func=cmd_sharpness)

    p = add("hessian", "top-k Hessian eigenvalues (Lanczos), trace and spectral density")
    p.add_argument("checkpoint", metavar="CKPT", help="one checkpoint file")
    p.add_argument("--top-k", type=_positive_int, default=cli_default("hessian", "--top-k"), metavar="K",
                   help="number of largest eigenvalues (Lanczos)")
    p.add_argument("--trace", action="store_true", help="also estimate the trace (Hutch++)")
    p.add_argument("--per-layer", action="store_true",
                   help="also the top-k eigenvalues (and with --trace the trace) of each module's "
                        "diagonal Hessian block")
    p.add_argument("--density", metavar="OUT", default=None,
                   help="write the spectral density (SLQ) figure to OUT (.png/.pdf/.svg/.html)")
    p.add_argument("--tol", type=_positive_float, default=cli_default("hessian", "--tol"),
                   help="relative tolerance of the eigenvalues (> 0)")
    p.add_argument("--density-iter", type=_positive_int, default=cli_default("hessian", "--density-iter"),
                   metavar="N", help="Lanczos steps per SLQ run")
    p.add_argument("--density-runs", type=_positive_int, default=cli_default("hessian", "--density-runs"),
                   metavar="N",
                   help="random start vectors of SLQ")
    _common(p)
    p.set_defaults(func=cmd_hessian)

    p = add("slice", "1-D or 2-D loss-landscape slice through a checkpoint")
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
    _common(p)
    p.set_defaults(func=cmd_slice)

    p = add("report", "self-contained HTML report: metrics, 1-D/2-D slices, spectral densities")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files or directories")
    p.add_argument("--out", required=True, help="the .html (or .htm) file to write")
    p.add_argument("--title", default=cli_default("report", "--title"), help="the report's heading")
    p.add_argument("--steps-1d", type=int, default=cli_default("report", "--steps-1d"),
                   help="points of each 1-D slice (>= 2)")
    p.add_argument("--steps-2d", type=int, default=cli_default("report", "--steps-2d"),
                   help="points per axis of the 2-D slice (>= 2)")
    p.add_argument("--radius", type=float, default=cli_default("report", "--radius"),
                   help="slices span [-radius, radius] (> 0)")
    p.add_argument("--no-density", action="store_true", help="skip the spectral density")
    _common(p)
    p.set_defaults(func=cmd_report)

    p = add("demo", "train a small CNN on the bundled digits with SGD, NAG, SAM and MSAM; report")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs per optimizer")
    p.add_argument("--optimizers", nargs="+", default=None, metavar="NAME",
                   choices=["sgd", "nag", "sam", "msam"], help="subset of sgd nag sam msam")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads (1 by default: the models are tiny; 0 keeps torch's default)")
    _common(p, needs_model=False)
    p.set_defaults(func=cmd_demo)

    from . import (
        reproduce as _reproduce_cmd,  # a broken import is an error, never a silently missing command
    )

    _reproduce_cmd.register(sub)
    return parser


def _start_distributed(args: argparse.Namespace, ctx: _Ctx) -> None:
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
    ctx = _Ctx(args)
    prog = f"landscape {args.command}"
    try:
        _start_distributed(args, ctx)
        target = getattr(args, "json", None)
        if target and target != "-":
            _check_writable(target, "--json")
        t0 = time.perf_counter()
        code = args.func(args, ctx)
        ctx.log(f"done in {time.perf_counter() - t0:.1f} s")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
