"""Atomic file writing: every file the toolkit writes goes through :func:`atomic_write`.

The content is written to a temporary file in the destination's own directory (so that the final
``os.replace`` is a rename on one file system, atomic on POSIX and Windows), flushed and fsynced,
given the usual file mode (``0o666`` minus the umask, like ``open(path, "w")``) and then moved
over the destination. On any failure -- a full disk, an exception in the caller's block, a
``KeyboardInterrupt`` -- the temporary file is removed and an existing destination is left as it
was: a reader sees either the old complete file or the new complete file, never a torn one.

Temporary files are named ``.<name>.<random>.tmp`` beside the destination;
:func:`remove_stale_temporaries` deletes those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_path", "remove_stale_temporaries", "temporary_prefix"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_prefix(path: str | os.PathLike) -> str:
    """The name prefix of the temporary files written for ``path`` (``.<name>.``)."""
    return f".{Path(path).name}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    For writers that want a file name rather than a file object (``Figure.savefig``,
    ``plotly``'s ``write_html``). Parent directories are created. The temporary file is removed
    if the block raises (any exception, ``KeyboardInterrupt`` included).
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(p), suffix=".tmp", dir=parent)
    except OSError as err:
        raise type(err)(err.errno, f"cannot write {p}: {err.strerror or err}", str(p)) from err
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # the caller's writer may not have synced
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, p)
    except OSError as err:  # a full disk, a quota: the message names the file being written
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if str(p) in str(err):
            raise
        raise type(err)(err.errno, f"cannot write {p}: {err.strerror or err} (nothing was "
                        "changed: the previous file, if any, is intact)", str(p)) from err
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; replace ``path`` with it on success.

    Args:
        path: the destination (parent directories are created).
        mode: ``"w"`` (text, default) or ``"wb"`` (binary).
        encoding: text encoding (ignored for ``"wb"``).

    Raises:
        ValueError: ``mode`` is not ``"w"`` or ``"wb"``.
        OSError: the directory cannot be written, or the disk is full (the message names
            ``path``; nothing is left behind and an existing file is intact).

    Example::

        with atomic_write("out.json") as f:
            f.write(text)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = {"encoding": encoding} if mode == "w" else {}
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` would use for ``path`` (left by a kill).

    Only files named ``.<name>.*.tmp`` in ``path``'s directory are removed. Call this only when
    no other process is writing ``path``. Returns the removed paths.
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return []
    prefix = temporary_prefix(p)
    removed = []
    for entry in parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed
