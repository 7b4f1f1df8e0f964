"""A Krylov basis on disk: :func:`analysis.top_eigenpairs` with ``basis_device="disk"``.

At language-model scale the rows of the Lanczos basis are the memory: GPT-2 small's 124M
float32 parameters make a row 0.5 GB, so the default ``max_basis = 20`` is 10 GB and GPT-2
medium's (355M) 28 GB. :class:`DiskBasis` keeps the rows in a temporary file instead and
streams them through a buffer of a fixed size, column slab by column slab, for each pass of
Gram-Schmidt, each rotation of a thick restart and the Ritz vectors at the end. What stays in
memory is the working set of Lanczos: the current Lanczos vector and the product (the previous
one is read back from its row for the three-term recurrence when the rows are stored in the
working dtype, and kept in memory beside narrower rows), or at the end the ``k`` eigenvectors,
in the working dtype, and the slab buffers:

    peak extra memory  <=  max(4, k) n s + DISK_BUFFER_BYTES        (outside the products)

(:func:`disk_memory_bound_bytes`; ``s`` the working itemsize), whatever ``max_basis``: four
vectors cover the start and a breakdown's fresh vector (a float64 Gaussian, two float32 vectors'
worth, its float32 copy and the current vector or the gradient); the steps of a run in the
working dtype hold two, three beside narrower rows. The
file holds ``max_basis`` rows in the stored dtype (``basis_dtype``, default the working one)
and grows a row at a time; it is created unlinked in :func:`tempfile.gettempdir` (set
``TMPDIR`` to choose the disk), so it disappears when the run ends, also when it fails.

The rows pass through the operating system's page cache: on a machine with free memory they
are read back from it at memory speed (the cache is not part of the process's resident set
and the kernel reclaims it when memory is short); otherwise every Gram-Schmidt pass reads
``m`` rows from the disk. Partial reorthogonalization (the default) reads the basis only on
the steps that need it. The arithmetic is that of the in-memory basis: projections
accumulate in float64 in two levels (working-precision partial sums over
:data:`~analysis.krylov.EXACT_SLAB` entries), rotations multiply slab by slab; the eigenvalues
agree with an in-memory run to rounding (``tests/analysis/test_disk_basis.py``).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import torch

from .krylov import EXACT_SLAB

__all__ = ["DiskBasis", "DISK_BUFFER_BYTES", "DISK", "ON_DISK", "check_basis_device",
           "disk_memory_bound_bytes"]

#: The ``basis_device`` value that puts the Krylov basis on disk.
DISK = "disk"
#: Marks the previous Lanczos vector as read back from its row when needed (not kept in memory).
ON_DISK = object()
#: Bytes of all slab temporaries of a :class:`DiskBasis` together (read buffer, its
#: working-dtype copy and a rotation's output slab).
DISK_BUFFER_BYTES = 64 * 2**20


def disk_memory_bound_bytes(n: int, itemsize: int, k: int = 1,
                            buffer_bytes: int = DISK_BUFFER_BYTES) -> int:
    """The bound on the peak extra memory of :func:`analysis.top_eigenpairs` outside the
    products with the basis on disk: ``max(4, k) n s + buffer_bytes`` (in the working dtype of
    ``itemsize`` bytes: the current Lanczos vector and the product, the previous one beside
    narrower rows, a fresh float64 Gaussian at the start or after a breakdown; at the end the
    ``k`` eigenvectors; the slab temporaries)."""
    return int(max(4, k) * n * itemsize + buffer_bytes)


def check_basis_device(basis_device: Any) -> bool:
    """Whether ``basis_device`` puts the Krylov basis on disk (:data:`DISK`); otherwise it must
    be ``None`` or a device (a ``torch.device`` or a string ``torch.device`` accepts).

    Raises:
        ValueError: anything else, with the value.
    """
    if isinstance(basis_device, str) and basis_device == DISK:
        return True
    try:
        if basis_device is not None:
            torch.device(basis_device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"basis_device must be a device (e.g. 'cpu', 'cuda:0') or {DISK!r}, "
                         f"got {basis_device!r}") from None
    return False


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (so equality is bitwise: NaN, -0.0 included)."""
    return t.view(_BITS[t.element_size()])


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (any dtype, bfloat16 included), without a copy."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class DiskBasis:
    """Rows of ``n`` entries in an unlinked temporary file, streamed through slab buffers.

    The interface of :class:`analysis.krylov.KrylovBasis` that Lanczos uses with a narrow
    basis (``project``, ``subtract``, ``rotate``, ``set_row``, ``truncate``; the current
    Lanczos vectors are kept by the caller, so rows are never handed out as views).

    Args:
        n: the length of a row.
        capacity: rows at most (``max_basis``).
        dtype: the stored dtype of the rows.
        device: the device of the vectors it is applied to (slabs are moved there).
        work_dtype: the dtype of those vectors (default ``dtype``).
        directory: where the file is made (default :func:`tempfile.gettempdir`).
        buffer_bytes: the bytes of all slab temporaries together.
    """

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: Any, *,
                 work_dtype: torch.dtype | None = None, directory: str | None = None,
                 buffer_bytes: int = DISK_BUFFER_BYTES):
        self.n, self.capacity, self.dtype = int(n), int(capacity), dtype
        self.work = dtype if work_dtype is None else work_dtype
        self.narrow = self.work != dtype
        self.scale = 2.0 ** round(math.log2(math.sqrt(n))) if (
            self.narrow and dtype == torch.float16) else 1.0
        self.device = torch.device(device)
        self.itemsize = dtype.itemsize
        # slab width: the read buffer (capacity x width, stored dtype), its working-dtype copy
        # and a rotation's output (at most capacity x width, working dtype) fit buffer_bytes
        per_column = self.capacity * (self.itemsize + 2 * self.work.itemsize)
        width = max(EXACT_SLAB, buffer_bytes // per_column // EXACT_SLAB * EXACT_SLAB)
        self.width = min(width, -(-self.n // EXACT_SLAB) * EXACT_SLAB)
        self.buffer = torch.empty(self.capacity, self.width, dtype=dtype)
        self.file = tempfile.TemporaryFile(dir=directory)
        self.fd = self.file.fileno()
        self.reduce: Any = None  # (sharded rows: see KrylovBasis.reduce)
        self.size = 0
        self.rows = 0  # rows written to the file
        self.peak_rows = 0

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def allocated_rows(self) -> int:
        return self.rows

    @property
    def nbytes(self) -> int:
        """Bytes of the rows in the file (not in memory)."""
        return self.rows * self.n * self.itemsize

    def close(self) -> None:
        """Close (and so delete) the file."""
        if not self.file.closed:
            self.file.close()

    def __del__(self) -> None:  # the file is unlinked: closing it frees the disk
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- I/O -----------------------------------------------------------------------------------
    def _offset(self, i: int, a: int) -> int:
        return (i * self.n + a) * self.itemsize

    def _read(self, m: int, a: int, b: int, first: int = 0) -> torch.Tensor:
        """Rows ``first..m-1``, columns ``a..b-1``: a ``(m - first, b - a)`` view of the
        buffer."""
        width = b - a
        for r, i in enumerate(range(first, m)):
            self._pread(self.buffer[r, :width], i, a)
        return self.buffer[:m - first, :width]

    def _pread(self, into: torch.Tensor, i: int, a: int) -> None:
        """Fill ``into`` (contiguous, CPU, stored dtype) from row ``i``, column ``a`` on."""
        view, done = _bytes_of(into), 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], self._offset(i, a) + done)
            if got <= 0:
                raise OSError(f"short read from the Krylov basis file at row {i}")
            done += got

    def _write(self, i: int, a: int, values: torch.Tensor) -> None:
        """Write ``values`` (CPU, stored dtype, contiguous) at row ``i``, column ``a``."""
        view, done = _bytes_of(values), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self._offset(i, a) + done)

    def _wrote(self, i: int) -> None:
        """Row ``i`` was written: the counts of rows in use, in the file and at most."""
        self.size = max(self.size, i + 1)
        self.rows = max(self.rows, i + 1)
        self.peak_rows = max(self.peak_rows, self.rows)

    def _slabs(self):
        for a in range(0, self.n, self.width):
            yield a, min(a + self.width, self.n)

    def _work(self, part: torch.Tensor) -> torch.Tensor:
        """A slab of rows on the vectors' device in the working dtype."""
        return part.to(device=self.device, dtype=self.work)

    # -- the basis -----------------------------------------------------------------------------
    def set_row(self, i: int, v: torch.Tensor) -> None:
        if i >= self.capacity:
            raise RuntimeError("the Krylov basis is full")
        for a, b in self._slabs():
            part = v[a:b] if self.scale == 1.0 else v[a:b] * self.scale
            self._write(i, a, part.to(device="cpu", dtype=self.dtype).contiguous())
        self._wrote(i)

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` read into a new tensor of the working dtype."""
        out = torch.empty(self.n, dtype=self.work, device=self.device)
        for a, b in self._slabs():
            out[a:b] = self._work(self._read(i + 1, a, b, first=i)[0]) / self.scale
        return out

    def write_tensors(self, i: int, tensors: list[torch.Tensor]) -> None:
        """Row ``i`` <- the tensors one after the other (CPU, the stored dtype; as many entries as
        a row): their bytes as they are, so :meth:`read_tensors` restores them bit for bit."""
        a = 0
        for t in tensors:
            self._write(i, a, t.detach().reshape(-1).contiguous())
            a += t.numel()
        self._wrote(i)

    def read_tensors(self, i: int, tensors: list[torch.Tensor]) -> None:
        """The tensors (contiguous, CPU, the stored dtype) <- row ``i``, read into their memory
        in place (no buffer)."""
        a = 0
        for t in tensors:
            self._pread(t.detach().view(-1), i, a)
            a += t.numel()

    def equal_tensors(self, i: int, tensors: list[torch.Tensor]) -> bool:
        """Whether row ``i`` holds the tensors' bytes exactly, as :meth:`write_tensors` wrote
        them (compared bit for bit, slab by slab through the buffer)."""
        if i >= self.rows:
            return False
        flat, a = self.buffer.view(-1), 0
        for t in tensors:
            src = t.detach().reshape(-1)
            for s in range(0, src.numel(), flat.numel()):
                part = src[s:s + flat.numel()]
                into = flat[:part.numel()]
                self._pread(into, i, a + s)
                if not torch.equal(_bits(into), _bits(part)):
                    return False
            a += src.numel()
        return True

    def add_row(self, w: torch.Tensor, i: int, alpha: float) -> torch.Tensor:
        """``w += alpha Q[i]`` in place, slab by slab (the same elementwise update as with the
        row in memory, so bit for bit when the rows are stored in the working dtype)."""
        for a, b in self._slabs():
            w[a:b].add_(self._work(self._read(i + 1, a, b, first=i)[0]), alpha=alpha / self.scale)
        return w

    def project(self, w: torch.Tensor, m: int) -> torch.Tensor:
        """``Q[:m] w`` as a float64 CPU vector: per slab, working-precision partial sums over
        ``EXACT_SLAB`` entries (exact for float64) added in float64."""
        h = torch.zeros(m, dtype=torch.float64)
        for a, b in self._slabs():
            part, wa = self._work(self._read(m, a, b)), w[a:b]
            if self.work == torch.float64:
                h += torch.mv(part, wa).cpu()
                continue
            P = torch.empty(-(-(b - a) // EXACT_SLAB), m, dtype=self.work, device=self.device)
            for r, s in enumerate(range(0, b - a, EXACT_SLAB)):
                torch.mv(part[:, s:s + EXACT_SLAB], wa[s:s + EXACT_SLAB], out=P[r])
            h += P.sum(0, dtype=torch.float64).cpu()
        h = h / self.scale if self.scale != 1.0 else h
        return self.reduce(h) if self.reduce is not None else h

    def subtract(self, w: torch.Tensor, h: torch.Tensor, m: int) -> torch.Tensor:
        """``w - Q[:m]^T h`` in place."""
        hh = (h / self.scale).to(device=self.device, dtype=self.work)
        for a, b in self._slabs():
            w[a:b].addmv_(self._work(self._read(m, a, b)).T, hh, alpha=-1)
        return w

    def rotate(self, S: torch.Tensor, m: int, out: torch.Tensor | None = None) -> None:
        """``Q[:p] <- S^T Q[:m]`` in place (or into ``out``, a ``(p, n)`` tensor of the working
        dtype on the vectors' device), slab by slab."""
        p = S.shape[1]
        St = S.T.to(device=self.device, dtype=self.work)
        if out is not None:
            St = St / self.scale
        for a, b in self._slabs():
            Y = St @ self._work(self._read(m, a, b))
            if out is not None:
                out[:, a:b] = Y
                continue
            Y = Y.to(device="cpu", dtype=self.dtype).contiguous()
            for i in range(p):
                self._write(i, a, Y[i])
        if out is None:
            self.size = p

    def truncate(self, p: int) -> None:
        """Keep rows ``0..p-1`` (the file is cut there)."""
        self.size = min(self.size, p)
        self.rows = min(self.rows, p)
        os.ftruncate(self.fd, self.rows * self.n * self.itemsize)
