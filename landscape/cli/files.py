"""The checkpoint arguments: files and directories expanded, header-checked before anything is
computed, and the per-file loop that keeps the other checkpoints when one of several fails."""

from __future__ import annotations

import json
import os
import pathlib
import stat
from collections.abc import Callable, Sequence
from typing import Any

from ._common import CLIError, UsageError
from ._common import first_line as _first_line
from .output import Ctx

__all__ = ["checkpoint_paths", "header_problem", "keys_note", "label", "one_checkpoint",
           "per_file", "raise_failures"]


def header_problem(path: pathlib.Path) -> str | None:
    """What is wrong with ``path`` as a checkpoint, from a cheap look at it (``None``: looks fine).

    A regular, non-empty file; a zip archive (``torch.save``) must have a readable central
    directory (a truncated copy has none), a safetensors file a JSON header and at least the
    bytes its header announces; a legacy pickle is accepted as is. Reads a few bytes (plus the
    zip directory at the end of the file), never the tensors.
    """
    import zipfile

    from ..checkpoints import CHECKPOINT_SUFFIXES, checkpoint_format
    from ..checkpoints.result import CheckpointError

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
            try:
                fmt: str | None = checkpoint_format(path)
            except CheckpointError as exc:  # a header length beyond the file: say so
                text = _first_line(exc)
                if "truncated safetensors" in text:
                    return text.removeprefix(f"{path} ")
                fmt = None  # the suffix decides below what to say
            if fmt == "safetensors":
                n = int.from_bytes(head[:8], "little")  # <= the file's size (checked above)
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
    if path.suffix in CHECKPOINT_SUFFIXES:
        kind = ("a PNG image" if head.startswith(b"\x89PNG") else
                "text/JSON" if head.lstrip()[:1] in (b"{", b"[") else f"starts with {head[:8]!r}")
        return (f"is not a checkpoint (its content is {kind}, neither a torch.save archive or "
                "pickle nor safetensors)")
    return None


def checkpoint_paths(paths: Sequence[str], *, keep_going: bool = False) -> list[pathlib.Path]:
    """Expand files and directories; refuse, in one line naming each, files that are not
    readable checkpoints (before anything is computed). Under torchrun a refusal on any rank
    stops every rank (:func:`analysis.distributed.all_ranks_succeed`), named by rank 0.

    With ``keep_going`` (commands that compute each checkpoint on its own: ``sharpness``,
    ``report``) bad files among several are kept in the list: :func:`per_file` records each
    with its reason and the good ones are computed; only when every file is bad is the run
    refused up front."""
    from analysis.distributed import all_ranks_succeed

    with all_ranks_succeed("checking the checkpoint files"):
        return _checkpoint_paths(paths, keep_going)


def _checkpoint_paths(paths: Sequence[str], keep_going: bool) -> list[pathlib.Path]:
    from ..checkpoints import CHECKPOINT_SUFFIXES, checkpoint_format
    from ..checkpoints.finding import find_checkpoints
    from ..checkpoints.result import CheckpointError

    found = find_checkpoints(list(paths))
    problems = []
    for p in found:
        if p.is_dir():  # a Hugging Face save_pretrained folder: the loader checks its files
            continue
        problem = header_problem(p)
        if problem is not None:
            problems.append(f"{p} {problem}")
            continue
        if p.suffix in CHECKPOINT_SUFFIXES:
            continue
        try:  # any name: the format is read from the content (never opens a FIFO)
            checkpoint_format(p)
        except CheckpointError as exc:
            problems.append(_first_line(exc))
    if keep_going and len(problems) < len(found):
        return found
    if len(problems) == 1:
        raise CLIError(problems[0] + ("" if len(found) == 1 else " (nothing was computed)"))
    if problems:
        raise CLIError(f"{len(problems)} of {len(found)} checkpoints cannot be used (nothing was "
                       f"computed): " + "; ".join(problems))
    return found


def one_checkpoint(command: str, spec: str) -> pathlib.Path:
    """The single checkpoint ``spec`` names; ``UsageError`` (naming ``command``) when it holds
    several or none."""
    paths = checkpoint_paths([spec])
    if len(paths) != 1:
        raise UsageError(f"{command} takes one checkpoint; {spec} holds {len(paths)} "
                         f"({', '.join(p.name for p in paths[:4])}{', ...' if len(paths) > 4 else ''})")
    return paths[0]


def label(path: pathlib.Path, all_paths: Sequence[pathlib.Path]) -> str:
    """``path``'s file name, or the whole path when another checkpoint has the same name."""
    names = [p.name for p in all_paths]
    return path.name if names.count(path.name) == 1 else str(path)


def keys_note(records: Sequence[dict], paths: Sequence[pathlib.Path]) -> list[str]:
    """One line per record whose checkpoint keys needed a note (prefixes stripped, tied or
    missing keys), labelled as in the table."""
    from ..report import describe_checkpoint_keys

    notes = []
    for r in records:
        text = describe_checkpoint_keys(r.get("checkpoint_keys") or {})
        if text:
            notes.append(f"* {label(pathlib.Path(r['checkpoint']), paths)}: {text}")
    return notes


def per_file(paths: Sequence[pathlib.Path], ctx: Ctx, work: Callable[[pathlib.Path], Any]
              ) -> tuple[list[Any], list[dict]]:
    """Run ``work`` on every checkpoint; a failure of one of several files is recorded
    (``{"checkpoint", "error"}``) and the others go on, so nothing computed is lost. A file
    that is not a readable checkpoint (:func:`header_problem`: truncated, empty...) is recorded
    with its reason without running ``work``."""
    results: list[Any] = []
    failures: list[dict] = []
    for path in paths:
        try:
            problem = None if len(paths) == 1 or path.is_dir() else header_problem(path)
            if problem is not None:
                raise CLIError(f"{path} {problem}")
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


def raise_failures(failures: Sequence[dict], paths: Sequence[pathlib.Path], kept: str) -> None:
    """Raise ``CLIError`` when checkpoints failed: all of them (the first error), or some (their
    names, ``kept`` saying what was still written, and the first error)."""
    if failures and len(failures) == len(paths):
        raise CLIError(f"all {len(paths)} checkpoints failed; first error: {failures[0]['checkpoint']}: "
                       f"{failures[0]['error']}")
    if failures:
        names = ", ".join(label(pathlib.Path(f["checkpoint"]), paths) for f in failures)
        raise CLIError(f"{len(failures)} of {len(paths)} checkpoints failed ({names}); the others "
                       f"were computed{kept}; first error: {failures[0]['error']}")

