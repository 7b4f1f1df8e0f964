"""Resumable, atomic on-disk storage of landscape grids.

A 2-D slice over an ``nx x ny`` grid is computed row by row (row ``i`` = every ``ys`` at
``xs[i]``). :class:`GridStore` keeps the finished rows in one ``.npz`` file and rewrites it after
every row *atomically* (write a temporary file in the same folder, then ``os.replace``), so a run
killed at any moment leaves either the previous or the new complete file, never a torn one.

Every store carries a *fingerprint* of the arguments that determine the values: the grid, hashes
of the directions, of the model's parameters and buffers and of the data, the data size, the
loss, the mode and the metrics. Opening a store whose fingerprint differs is a clear
:class:`StoreMismatchError` naming the differing entries, and the file is left untouched. A
resumed run therefore continues exactly the computation that was interrupted; since each grid
value depends only on its coordinates (the parameters are set to ``w + x d1 + y d2`` from the
saved ``w`` at every point), the resumed grid equals an uninterrupted one bit for bit.

``path`` may be a file (``"grid.npz"``) or a directory: in a directory each fingerprint gets its
own file ``landscape-<hash>.npz``, so different grids can share one folder.

Lock protocol: a writer store holds an exclusive lock on ``<file>.lock`` (``fcntl.flock`` on
POSIX, ``msvcrt.locking`` on Windows) from opening until :meth:`GridStore.close` (or the end of
its ``with`` block, or its garbage collection); the lock file records the holder's process id,
host and start time. Everything that touches the file happens under the lock: reading the
finished rows, removing the temporary files a killed writer left, and every atomic rewrite. So
opening a store never deletes another process's in-flight temporary file, two processes never
write one store at once (the finished rows of one can never be replaced by the other's older
copy), and a second writer gets :class:`StoreLockedError` naming the holder, or waits for it
with ``lock_timeout=`` seconds (then reads the rows the holder finished). The operating system
drops the lock of a process that dies, so a killed run never blocks the next one. Within one
process, stores of the same file share the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_write, remove_stale_temporaries

__all__ = [
    "GridStore",
    "StoreMismatchError",
    "StoreCorruptError",
    "StoreLockedError",
    "tensor_hash",
    "tensors_hash",
    "fingerprint_hash",
    "stored_rows_done",
]

_FORMAT = "msam-landscape-grid/1"


class StoreMismatchError(ValueError):
    """An existing store was written with different arguments (it is left untouched)."""


class StoreCorruptError(StoreMismatchError):
    """An existing store file is damaged or not a valid store (it is left untouched).

    A subclass of :class:`StoreMismatchError`, so code catching that catches this too. The
    message names the file, what is wrong, and how to start over (delete the file, or pass
    ``overwrite=True`` / ``landscape slice --restart``).
    """


class StoreLockedError(RuntimeError):
    """Another process is writing the store (its process id, host and start time are named);
    nothing was read, removed or written. Wait for it, pass ``lock_timeout=`` to wait, or use
    another path."""


# the locks this process holds: lock file -> [open file, number of stores sharing it]
_HELD: dict[str, list] = {}


def _try_lock(fh: Any) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text(encoding="utf-8") or "{}")
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire_store_lock(store_path: Path, timeout: float = 0.0) -> tuple[str, bool]:
    """Take the writer lock of the store file ``store_path``; ``(key, first)`` where ``first``
    says no other store of this process held it (so nobody can be writing the file now).

    Raises:
        StoreLockedError: another process holds it and ``timeout`` seconds passed.
        OSError: the lock file cannot be created (an unwritable folder), naming it.
    """
    lock_path = store_path.with_name(store_path.name + ".lock")
    key = os.path.realpath(lock_path)
    if key in _HELD:
        _HELD[key][1] += 1
        return key, False
    deadline = time.monotonic() + max(float(timeout), 0.0)
    while True:
        try:
            fh = open(lock_path, "a+", encoding="utf-8")  # never truncates another holder's record
        except OSError as err:
            raise type(err)(err.errno, f"cannot create the store's lock file {lock_path} "
                            f"({err.strerror or err}); choose a writable folder") from None
        try:
            if _try_lock(fh):
                if _same_file(fh, lock_path):
                    break
                fh.close()  # the holder removed that lock file as it released it: take a new one
                continue
            if time.monotonic() >= deadline:
                waited = f" after waiting {timeout:g} s" if timeout else ""
                raise StoreLockedError(
                    f"the landscape store {store_path} is being written by {_holder(lock_path)}"
                    f"{waited} (lock file {lock_path}); nothing was read or changed. Wait for "
                    "it to finish, pass lock_timeout= to wait, or use another path")
        except BaseException:
            fh.close()
            raise
        fh.close()
        time.sleep(0.05)
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": datetime.datetime.now().isoformat(timespec="seconds")}))
    fh.flush()
    _HELD[key] = [fh, 1, lock_path]
    return key, True


def _same_file(fh: Any, path: Path) -> bool:
    """The locked open file is still the one at ``path`` (not unlinked by a releasing holder)."""
    try:
        a, b = os.fstat(fh.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def release_store_lock(key: str) -> None:
    """Release one store's share of a lock from :func:`acquire_store_lock`."""
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        with contextlib.suppress(OSError):  # a waiter that opened it re-checks, see _same_file
            os.unlink(held[2])
        held[0].close()  # closing the file drops the lock


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tensor_bytes(t: torch.Tensor) -> memoryview | bytes:
    """The bytes of ``t`` for hashing: a view of a contiguous CPU tensor's memory (no copy: a
    ``bytes`` copy of a 1.4 GB direction was one more vector at the peak of a slice)."""
    t = t.detach().reshape(-1).contiguous().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else b""


def tensors_hash(tensors: Iterable[Any]) -> str:
    """SHA-256 (hex, 16 characters) of tensors' dtypes, shapes and exact bytes, in order.

    Nested tuples, lists and dicts of tensors are walked in order; other leaves are hashed by
    ``repr``.
    """
    h = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
            h.update(_tensor_bytes(obj))
        elif isinstance(obj, np.ndarray):
            walk(torch.from_numpy(np.ascontiguousarray(obj)))
        elif isinstance(obj, Mapping):
            for k in obj:
                h.update(repr(k).encode())
                walk(obj[k])
        elif isinstance(obj, (tuple, list)):
            h.update(b"[")
            for v in obj:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(obj).encode())

    for t in tensors:
        walk(t)
    return h.hexdigest()[:16]


def tensor_hash(t: torch.Tensor) -> str:
    """SHA-256 (hex, 16 characters) of one tensor's dtype, shape and exact bytes."""
    return tensors_hash([t])


def _canonical(fp: Mapping[str, Any]) -> str:
    return json.dumps(fp, sort_keys=True, separators=(",", ":"))


def fingerprint_hash(fp: Mapping[str, Any]) -> str:
    """Short hash of a fingerprint dictionary (used for file names in a directory store)."""
    return hashlib.sha256(_canonical(fp).encode()).hexdigest()[:16]


def _normalize_fp(fp: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so that tuples and lists compare equal."""
    return json.loads(_canonical(fp))


class GridStore:
    """Finished rows of an ``nx x ny`` grid of metrics, saved atomically to an ``.npz`` file.

    Args:
        path: a ``.npz`` file, or a directory (one file per fingerprint inside it). A path that
            exists as a directory or ends with a path separator is a directory; a file path gets
            its parent folders created.
        fingerprint: JSON-serializable dictionary of the arguments that determine the values.
        xs, ys: the grid coordinates (row ``i`` is ``xs[i]``).
        metrics: names of the stored arrays, each of shape ``(nx, ny)``.
        resume: load the finished rows of an existing store with the same fingerprint (default).
            With ``False`` the rows are recomputed and the file replaced; a store with a
            different fingerprint is an error in both cases.
        writer: ``False`` keeps the store in memory only (never reads or writes the file); used
            on the non-zero ranks of a distributed run, which receive rank 0's rows with
            :meth:`adopt`.
        overwrite: ignore an existing file (damaged, or written with other arguments) and
            start over; it is replaced when the first row is saved.
        lock_timeout: seconds a writer waits for another process that writes the same store
            (default 0: :class:`StoreLockedError` at once, naming the holder).

    A writer store holds the store's lock (see the module docstring) until :meth:`close`; use
    it as a context manager. Once it holds the lock, it removes the temporary files a killed
    run left beside the file (``.<name>.*.tmp``, and ``<name>.*.tmp`` of older versions).

    Raises:
        StoreMismatchError: the file exists with another fingerprint or grid (nothing written).
        StoreCorruptError: the file is damaged or not a landscape store (nothing written); the
            message says how to start over.
        StoreLockedError: another process writes the store (named; nothing read or changed).
        OSError: the folder cannot be written (raised here, not at the first row).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: Mapping[str, Any],
        xs: Sequence[float] | np.ndarray,
        ys: Sequence[float] | np.ndarray,
        metrics: Sequence[str],
        *,
        resume: bool = True,
        writer: bool = True,
        overwrite: bool = False,
        lock_timeout: float = 0.0,
    ):
        self._lock: str | None = None
        self._closed = False
        self._merge = bool(resume) and not overwrite
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not (
                0 <= lock_timeout < float("inf")):
            raise ValueError(f"lock_timeout must be a finite number of seconds >= 0, got {lock_timeout!r}")
        self.writer = bool(writer)
        self.fingerprint = _normalize_fp(fingerprint)
        self.xs = np.asarray(xs, dtype=np.float64)
        self.ys = np.asarray(ys, dtype=np.float64)
        self.metrics = tuple(metrics)
        raw = os.fspath(path)
        p = Path(raw)
        if p.is_dir() or raw.endswith(("/", os.sep)):
            if self.writer:
                p.mkdir(parents=True, exist_ok=True)
            p = p / f"landscape-{fingerprint_hash(self.fingerprint)}.npz"
        elif p.suffix != ".npz":
            p = p.with_name(p.name + ".npz")
        self.path = p
        shape = (len(self.xs), len(self.ys))
        self.values = {m: np.full(shape, np.nan) for m in self.metrics}
        self.done = np.zeros(shape[0], dtype=bool)
        self.extra: dict[str, Any] = {}
        if not self.writer:
            return
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise NotADirectoryError(20, f"the store's folder {self.path.parent} is a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock, first = acquire_store_lock(self.path, lock_timeout)
        try:
            if first:  # no store of this process writes it, and the lock keeps others out
                self._remove_stale_temporaries()
            if self.path.exists() and not overwrite:
                self._check_and_load(resume)
        except BaseException:
            self.close()
            raise

    def _check_open(self) -> None:
        if self.writer and self._closed:
            raise ValueError(f"the store {self.path} is closed (its lock was released); open it "
                             "again to write")

    def close(self) -> None:
        """Release the store's lock (idempotent); the finished rows stay readable in memory."""
        self._closed = True
        if self._lock is not None:
            release_store_lock(self._lock)
            self._lock = None

    def __enter__(self) -> GridStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:  # no contextlib here: module globals may be gone at interpreter shutdown
            self.close()
        except Exception:
            pass

    def _remove_stale_temporaries(self) -> None:
        remove_stale_temporaries(self.path)
        legacy = self.path.name + "."  # tempfile.mkstemp names of earlier versions
        if self.path.parent.is_dir():
            for entry in self.path.parent.iterdir():
                if entry.name.startswith(legacy) and entry.name.endswith(".tmp") and entry.is_file():
                    with contextlib.suppress(OSError):
                        entry.unlink()

    # -- reading -------------------------------------------------------------------------
    def _corrupt(self, what: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"the landscape store {self.path} is damaged: {what}; it was left untouched. To start "
            "over, delete the file or pass overwrite=True (landscape slice --restart)"
        )

    def _check_and_load(self, resume: bool) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                files = set(z.files)
                if "format" not in files or str(z["format"]) != _FORMAT:
                    raise StoreCorruptError(
                        f"{self.path} exists but is not a landscape store (no {_FORMAT!r} format "
                        "entry); choose another path, delete the file or pass overwrite=True "
                        "(landscape slice --restart) to replace it"
                    )
                if "fingerprint" not in files:
                    raise self._corrupt("it has no 'fingerprint' entry")
                stored_fp = json.loads(str(z["fingerprint"]))
                arrays = {k: np.array(z[k]) for k in files}
        except StoreCorruptError:
            raise
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile,
                json.JSONDecodeError) as err:  # ValueError: e.g. an object array needing pickle
            raise self._corrupt(f"cannot read it ({type(err).__name__}: {_first_line(err)})") from None
        if not isinstance(stored_fp, dict):
            raise self._corrupt("its fingerprint is not a JSON object")
        diff = sorted(
            k for k in set(stored_fp) | set(self.fingerprint)
            if stored_fp.get(k) != self.fingerprint.get(k)
        )
        if diff:
            raise StoreMismatchError(
                f"the store {self.path} was written with different arguments "
                f"(differs in: {', '.join(diff)}); it was left untouched. Use the same "
                "arguments to resume, or another path, delete the file or pass overwrite=True "
                "(landscape slice --restart) to start over"
            )
        for name, ref in (("xs", self.xs), ("ys", self.ys)):
            got = arrays.get(name)
            if got is None:
                raise self._corrupt(f"it has no {name!r} array")
            if got.shape != ref.shape or not np.array_equal(got.astype(np.float64), ref):
                raise StoreMismatchError(
                    f"the store {self.path} holds another grid ({name} has {got.size} values, "
                    f"expected {ref.size} equal ones); it was left untouched. Use another path, "
                    "delete the file or pass overwrite=True (landscape slice --restart)"
                )
        nx = len(self.xs)
        done = arrays.get("done")
        if done is None:
            raise self._corrupt("it has no 'done' array")
        if done.dtype != np.bool_ or done.shape != (nx,):
            raise self._corrupt(f"its 'done' array has dtype {done.dtype} and shape {done.shape}, "
                                f"expected bool of shape ({nx},)")
        values = {}
        for m in self.metrics:
            v = arrays.get(m)
            if v is None:
                raise self._corrupt(f"it has no {m!r} array")
            if v.shape != self.values[m].shape or v.dtype.kind != "f":
                raise self._corrupt(f"its {m!r} array has dtype {v.dtype} and shape {v.shape}, "
                                    f"expected float of shape {self.values[m].shape}")
            mask = arrays.get(f"nan_{m}")
            if mask is not None:
                if mask.dtype != np.bool_ or mask.shape != v.shape:
                    raise self._corrupt(f"its 'nan_{m}' array has dtype {mask.dtype} and shape {mask.shape}")
                bad = np.flatnonzero(done & (np.isnan(v) != mask).any(axis=1))
                if bad.size:
                    raise self._corrupt(f"row {int(bad[0])} is marked done but its {m!r} values hold "
                                        "NaN where none was computed (or lost a recorded NaN)")
            values[m] = v.astype(np.float64)
        if not resume:
            return
        self.values.update(values)
        self.done = done.copy()
        for k, v in arrays.items():
            if k.startswith("extra_"):
                self.extra[k[len("extra_"):]] = v.item() if v.ndim == 0 else v

    @property
    def rows_done(self) -> int:
        """Number of finished rows."""
        return int(self.done.sum())

    @property
    def complete(self) -> bool:
        """True when every row is finished."""
        return bool(self.done.all())

    def pending_rows(self) -> list[int]:
        """Indices of the rows still to compute, in order."""
        return [int(i) for i in np.flatnonzero(~self.done)]

    def state(self) -> dict[str, Any]:
        """The finished rows and their values (picklable), for :meth:`adopt` on other ranks."""
        return {"done": self.done.copy(), "values": {k: v.copy() for k, v in self.values.items()},
                "path": str(self.path)}

    def adopt(self, state: Mapping[str, Any]) -> None:
        """Take over another store's finished rows (from :meth:`state`)."""
        self.done = np.asarray(state["done"], dtype=bool).copy()
        self.values = {k: np.asarray(v, dtype=np.float64).copy() for k, v in state["values"].items()}
        self.path = Path(state["path"])

    # -- writing -------------------------------------------------------------------------
    def set_extra(self, **values: Any) -> None:
        """Attach scalars or small arrays (e.g. the loss at the origin); saved with the next row."""
        self.extra.update(values)

    def write_row(self, i: int, row: Mapping[str, np.ndarray]) -> None:
        """Record row ``i`` (``{metric: values over ys}``) and save the store atomically."""
        self._check_open()
        for m in self.metrics:
            v = np.asarray(row[m], dtype=np.float64)
            if v.shape != (len(self.ys),):
                raise ValueError(f"row {i} of {m!r} has shape {v.shape}, expected ({len(self.ys)},)")
            self.values[m][i] = v
        self.done[i] = True
        self.save()

    def save(self) -> None:
        """Write the whole store to a temporary file and move it over ``path`` (atomic)."""
        if not self.writer:
            return
        self._check_open()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._merge_finished_rows()
        arrays: dict[str, Any] = {
            "format": np.array(_FORMAT),
            "fingerprint": np.array(_canonical(self.fingerprint)),
            "xs": self.xs,
            "ys": self.ys,
            "done": self.done,
        }
        arrays.update(self.values)
        for m, v in self.values.items():  # which NaN are results (a diverged point), not gaps
            arrays[f"nan_{m}"] = np.isnan(v) & self.done[:, None]
        for k, v in self.extra.items():
            arrays[f"extra_{k}"] = np.asarray(v)
        with atomic_write(self.path, "wb") as f:
            np.savez(f, **arrays)

    def _merge_finished_rows(self) -> None:
        """Keep the rows another store of this process (sharing the lock) finished in the file
        since this one was opened: finished rows never regress. Resumed stores only (a store
        opened with ``resume=False`` or ``overwrite=True`` recomputes every row)."""
        if not (self._merge and self.path.exists()):
            return
        done, values, extra = self.done.copy(), {k: v.copy() for k, v in self.values.items()}, dict(self.extra)
        try:
            self._check_and_load(resume=True)
        except StoreMismatchError:  # damaged or another grid: this store's rows replace it
            self.done, self.values, self.extra = done, values, extra
            return
        for m in self.metrics:
            self.values[m] = np.where(done[:, None], values[m], self.values[m])
        self.done = done | self.done
        self.extra.update(extra)

    def __repr__(self) -> str:
        return (
            f"GridStore({str(self.path)!r}, grid={len(self.xs)}x{len(self.ys)}, "
            f"rows_done={self.rows_done})"
        )


def stored_rows_done(path: str | os.PathLike, xs: Sequence[float] | np.ndarray,
                     ys: Sequence[float] | np.ndarray) -> int | None:
    """Rows already finished in the store file ``path`` for the grid ``xs x ys``, read only.

    For a cost estimate before a run: ``0`` when there is no file, ``None`` when it cannot be
    told without the fingerprint (a directory of stores, an unreadable file, another grid). The
    run itself still checks the fingerprint (:class:`GridStore`); a mismatch is an error there.
    """
    p = Path(os.fspath(path))
    if p.is_dir() or os.fspath(path).endswith(("/", os.sep)):
        return None
    if p.suffix != ".npz":
        p = p.with_name(p.name + ".npz")
    if not p.exists():
        return 0
    try:
        with np.load(p, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != _FORMAT:
                return None
            sx, sy, done = np.array(z["xs"]), np.array(z["ys"]), np.array(z["done"])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    same = (sx.shape == np.shape(xs) and sy.shape == np.shape(ys) and done.shape == (len(sx),)
            and np.array_equal(sx.astype(np.float64), np.asarray(xs, dtype=np.float64))
            and np.array_equal(sy.astype(np.float64), np.asarray(ys, dtype=np.float64)))
    return int(done.astype(bool).sum()) if same else None
