"""Where the command line's output goes: the per-invocation context (messages on stderr from rank
0 only, tables on stdout), the JSON envelope, and atomic writes of text files and figures."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

from ._common import CLIError

__all__ = ["SCHEMA_VERSION", "Ctx", "check_writable", "envelope", "save_figure", "write_text"]

SCHEMA_VERSION = 1


class Ctx:
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
            write_text(target, text + "\n")
            self.log(f"wrote {target}")


def envelope(command: str, **body: Any) -> dict:
    """The JSON document of ``command``: ``{"schema": "landscape.<command>/1", "command", ...}``."""
    return {"schema": f"landscape.{command}/{SCHEMA_VERSION}", "command": command, **body}


def check_writable(path: str | os.PathLike, what: str = "output") -> pathlib.Path:
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


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (an old file survives a full disk)."""
    from .._atomic import atomic_write

    p = check_writable(path)
    try:
        with atomic_write(p) as f:
            f.write(text)
    except OSError as exc:
        raise CLIError(f"cannot write {p}: {exc.strerror or exc}") from None


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Write a matplotlib or plotly figure atomically (temporary file + rename)."""
    from .._atomic import atomic_path, atomic_write

    p = check_writable(path)
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
