"""The memory-bounded Krylov basis of :mod:`analysis.lanczos` and its float64 reductions.

The basis is a list of row chunks allocated as it grows (``first`` rows, then chunks of at most
:data:`CHUNK_BYTES`, one row at least: :func:`chunk_rows`), so a run that stops early holds only
what it used, to within one chunk: at 124M float32 parameters (0.5 GB a row) the basis grows a
row at a time, where it grew 16 rows (8 GB) at a time before. Each Gram-Schmidt pass is one
matrix-vector product per chunk (blocked BLAS: the basis is read once per pass, which is the
cost floor of full reorthogonalization, ``m n`` numbers per pass); rotations
``Q[:p] <- S^T Q[:m]`` (thick restarts, Ritz vectors) are done in place, slab of columns by
slab, with temporaries of about one vector.

Reductions that decide convergence accumulate in float64 without float64 copies of whole
vectors: :func:`dot64` and :func:`norm64` cast a slab that fits in cache to float64 and sum
its products there; low-precision projections are two-level (working-precision partial sums over
``EXACT_SLAB`` entries, added in float64), since a plain float32 product over ``5e6`` entries is off by ``~1e-4`` relative (its
error scales with ``|q| |w|``, not ``|q . w|``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["KrylovBasis", "OmegaRecurrence", "Reorthogonalizer", "dot64", "norm64", "lanczos_tridiagonal",
           "lanczos_tridiagonals", "default_max_basis", "default_max_iter", "memory_bound_bytes",
           "basis_dtypes", "breakdown_eps", "chunk_rows", "CHUNK_BYTES", "MAX_CHUNK_ROWS"]

#: Entries per slab of the float64 reductions and the in-place basis rotations (bounds their
#: temporaries to a few slabs instead of whole ``n``-vectors).
SLAB = 1 << 20
#: Slab of the two-level low-precision projections (partial sums of this many entries).
EXACT_SLAB = 8192
#: Slab of :func:`dot64` on the CPU (its float64 copies stay in cache: 512 KiB).
CAST_SLAB = 1 << 16
#: Columns per slab of :meth:`KrylovBasis.subtract` over several chunks (a slab of ``w`` in cache).
SUBTRACT_SLAB = 1 << 16
#: Bytes of one chunk of the Krylov basis after the first (a chunk holds one row at least).
CHUNK_BYTES = 256 * 2**20
#: Rows of one chunk at most (small vectors: fewer, larger BLAS calls per pass).
MAX_CHUNK_ROWS = 16
#: DGKS: a second Gram-Schmidt pass when the first kept less than this fraction of the norm.
DGKS_ETA = 0.7071
#: Initial rounding terms of :class:`OmegaRecurrence`, in units of ``eps ||T||`` (raised by
#: :meth:`OmegaRecurrence.calibrate` when a Gram-Schmidt pass finds more than estimated).
OMEGA_NOISE = 30.0


def dot64(a: torch.Tensor, b: torch.Tensor, reduce: Any = None) -> float:
    """``a . b`` accumulated in float64, with no float64 copy of a whole vector.

    * float64: one BLAS product;
    * on the CPU (any other dtype): slabs of ``CAST_SLAB`` entries cast to float64 (small
      enough to stay in cache, so the casts cost about one read of ``a`` and ``b``); their
      products, exact in float64 for float32 inputs, are summed in float64:
      ``|error| <= n u_64 sum_i |a_i b_i|``;
    * on an accelerator: slabs of ``SLAB`` entries cast to float64, summed on the device, one
      synchronization per call.

    A float32 accumulation instead drifts by ``~sqrt(n) u_32`` and more: 3.6e-4 relative over
    1.1e7 entries. Two-level float32 partial sums (BLAS over slabs of 16384, added in float64)
    were tried and are not enough: on a 3e5-entry diagonal their Rayleigh quotients were off by
    ``2e-6`` relative (33 ``u_32``), above the error bounds (``tests/analysis/test_lanczos.py``).

    ``reduce``: for sharded vectors, the sum over ranks of the local parts
    (:meth:`analysis.shards.VectorShards.sum`, one all-reduce); ``None`` for whole vectors.
    """
    if reduce is not None:
        return reduce(dot64(a, b))
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return float(torch.dot(a, b))
    if a.device.type != "cpu":
        return _dot_device(a, b)
    total = 0.0
    for s in range(0, a.numel(), CAST_SLAB):
        total += float(torch.dot(a[s:s + CAST_SLAB].double(), b[s:s + CAST_SLAB].double()))
    return total


def _dot_device(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a . b`` for accelerator tensors: slabs of ``SLAB`` entries cast to float64 (exact
    products, 16 MB of temporaries), summed on the device in float64, one synchronization."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for s in range(0, a.numel(), SLAB):
        total += torch.dot(a[s:s + SLAB].double(), b[s:s + SLAB].double())
    return float(total)


def chunk_rows(n: int, itemsize: int) -> int:
    """Rows per chunk of a basis of ``n``-vectors of ``itemsize`` bytes:
    ``clamp(CHUNK_BYTES // (n itemsize), 1, MAX_CHUNK_ROWS)``, so that a chunk holds at most
    ``max(one vector, CHUNK_BYTES)``: 16 rows up to 4.2M float32 entries, one row from 67M."""
    return int(max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(1, n * itemsize))))


def norm64(a: torch.Tensor, reduce: Any = None) -> float:
    """``||a||_2`` accumulated in float64 (see :func:`dot64`; ``reduce`` for sharded vectors)."""
    return math.sqrt(max(dot64(a, a, reduce), 0.0))


class KrylovBasis:
    """Orthonormal rows stored in chunks that are allocated as the basis grows.

    Rows live in chunks of ``first`` rows (the first chunk, which ends up holding the returned
    eigenvectors) and then ``chunk`` rows (default :func:`chunk_rows`: at most
    ``max(one vector, CHUNK_BYTES)`` a chunk), never more than ``capacity`` rows in all, on
    ``device`` (optionally pinned host memory). Each Gram-Schmidt pass is one matrix-vector
    product per chunk (blocked BLAS); rotations ``Q[:p] <- S^T Q[:m]`` are done in place, slab of
    columns by slab, so their temporaries hold about ``n`` numbers (one vector).
    """

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: Any, *,
                 first: int, chunk: int | None = None, pin: bool = False,
                 work_dtype: torch.dtype | None = None):
        self.n, self.capacity, self.dtype = n, capacity, dtype
        #: the dtype of the vectors it is applied to; a narrower ``dtype`` (a narrow basis,
        #: :func:`basis_dtypes`) is cast to it slab by slab, and float16 rows are stored times
        #: :attr:`scale` (a power of two near ``sqrt(n)``: unit rows of 1e8 entries would be
        #: float16 subnormals)
        self.work = dtype if work_dtype is None else work_dtype
        self.narrow = self.work != dtype
        self.scale = 2.0 ** round(math.log2(math.sqrt(n))) if (
            self.narrow and dtype == torch.float16) else 1.0
        self.device = torch.device(device)
        self.first = max(1, min(first, capacity))
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.chunk = chunk_rows(n, itemsize) if chunk is None else max(1, chunk)
        self.pin = pin
        #: accumulate projections in float64 (two-level) for low-precision bases: a float32
        #: gemv over 5e6 entries is off by ~1e-4 relative whatever the number of passes (its
        #: error scales with |q| |w|, not |q . w|), which moved Ritz values by 3e-3
        self.exact = self.work != torch.float64 or self.narrow
        self.chunks: list[torch.Tensor] = []
        #: the sum over ranks of :meth:`project` for sharded rows (``n`` is then this rank's
        #: length; :meth:`analysis.shards.VectorShards.sum`), ``None`` for whole vectors
        self.reduce: Any = None
        self.size = 0
        self.peak_rows = 0

    @property
    def allocated_rows(self) -> int:
        return sum(c.shape[0] for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return self.allocated_rows * self.n * torch.empty((), dtype=self.dtype).element_size()

    def _grow(self) -> None:
        have = self.allocated_rows
        rows = self.first if not self.chunks else min(self.chunk, self.capacity - have)
        if rows <= 0:
            raise RuntimeError("the Krylov basis is full")
        t = torch.empty(rows, self.n, dtype=self.dtype, device=self.device,
                        pin_memory=self.pin)
        self.chunks.append(t)
        self.peak_rows = max(self.peak_rows, self.allocated_rows)

    def _locate(self, i: int) -> tuple[torch.Tensor, int]:
        for c in self.chunks:
            if i < c.shape[0]:
                return c, i
            i -= c.shape[0]
        raise IndexError(i)

    def row(self, i: int) -> torch.Tensor:
        c, r = self._locate(i)
        return c[r]

    def set_row(self, i: int, v: torch.Tensor) -> None:
        while i >= self.allocated_rows:
            self._grow()
        c, r = self._locate(i)
        if self.scale == 1.0:
            c[r].copy_(v)
        else:
            for a in range(0, self.n, SLAB):
                c[r, a:a + SLAB].copy_(v[a:a + SLAB] * self.scale)
        self.size = max(self.size, i + 1)

    def _parts(self, m: int):
        """``(chunk[:rows], start)`` over the first ``m`` rows."""
        start = 0
        for c in self.chunks:
            if start >= m:
                break
            rows = min(c.shape[0], m - start)
            yield c[:rows], start
            start += rows

    def project(self, w: torch.Tensor, m: int) -> torch.Tensor:
        """``Q[:m] w`` (one product per chunk), as a float64 CPU vector (summed over ranks by
        :attr:`reduce` for sharded rows).

        Low precision: two-level, the working-precision partial sums over ``EXACT_SLAB``
        entries are written into an ``(n / EXACT_SLAB, m)`` matrix (no temporaries per slab)
        and added up in float64.
        """
        if self.reduce is not None:
            return self.reduce(self._project(w, m))
        return self._project(w, m)

    def _project(self, w: torch.Tensor, m: int) -> torch.Tensor:
        parts = list(self._parts(m))
        if not self.exact:
            h = torch.empty(m, dtype=self.dtype, device=self.device)
            for part, s in parts:
                torch.mv(part, w, out=h[s:s + part.shape[0]])
            return h.to(device="cpu", dtype=torch.float64)
        width, work = EXACT_SLAB, self.work
        P = torch.empty(-(-self.n // width), m, dtype=work, device=self.device)
        for i, a in enumerate(range(0, self.n, width)):
            wa = w[a:a + width]
            for part, s in parts:
                torch.mv(part[:, a:a + width].to(work), wa, out=P[i, s:s + part.shape[0]])
        h = P.sum(0, dtype=torch.float64).cpu()
        return h / self.scale if self.scale != 1.0 else h

    def subtract(self, w: torch.Tensor, h: torch.Tensor, m: int) -> torch.Tensor:
        """``w - Q[:m]^T h`` in place (no temporary vector).

        Slab of columns by slab when the basis has several chunks, so that the slab of ``w``
        stays in cache while every chunk is applied to it (``w`` is read and written once).
        """
        hh = (h / self.scale).to(device=self.device, dtype=self.work)
        parts = [(part, hh[s:s + part.shape[0]]) for part, s in self._parts(m)]
        if len(parts) == 1 and not self.narrow:
            w.addmv_(parts[0][0].T, parts[0][1], alpha=-1)
            return w
        for a in range(0, self.n, SUBTRACT_SLAB):
            wa = w[a:a + SUBTRACT_SLAB]
            for part, ha in parts:
                wa.addmv_(part[:, a:a + SUBTRACT_SLAB].T.to(self.work), ha, alpha=-1)
        return w

    def rotate(self, S: torch.Tensor, m: int, out: torch.Tensor | None = None) -> None:
        """``Q[:p] <- S^T Q[:m]`` in place for an ``(m, p)`` float64 matrix ``S``, ``p <= m``
        (or into ``out``, a ``(p, n)`` tensor of the working dtype, the basis left as it is).

        Slab of columns by slab: ``Y = sum_c S_c^T Q_c`` over the chunks ``c`` (one product
        each, read in place, no gathered copy of the slab), then ``Y`` written back into the
        first ``p`` rows; the temporary ``Y`` holds ``p * width <= ~n`` numbers (with ``out``:
        none, the slabs of a narrow basis cast to the working dtype one chunk at a time).
        """
        p, work = S.shape[1], self.work
        St = S.T.to(device=self.device, dtype=work)
        if out is not None:
            St = St / self.scale
        width = max(1024, min(SLAB, self.n // p))
        parts = [(part, St[:, s:s + part.shape[0]]) for part, s in self._parts(m)]
        outs = [(out, 0)] if out is not None else list(self._parts(p))
        Y = None if out is not None else torch.empty(p, min(width, self.n), dtype=work,
                                                    device=self.device)
        for a in range(0, self.n, width):
            b = min(a + width, self.n)
            Ya = out[:, a:b] if out is not None else Y[:, :b - a]
            for i, (part, Sc) in enumerate(parts):
                if i:
                    Ya.addmm_(Sc, part[:, a:b].to(work))
                else:
                    torch.mm(Sc, part[:, a:b].to(work), out=Ya)
            if out is None:
                for part, s in outs:
                    part[:, a:b].copy_(Ya[s:s + part.shape[0]])
        if out is None:
            self.size = p

    def truncate(self, p: int) -> None:
        """Free every chunk past row ``p``."""
        keep, have = [], 0
        for c in self.chunks:
            if have >= p:
                break
            keep.append(c)
            have += c.shape[0]
        self.chunks = keep
        self.size = min(self.size, p)


def lanczos_tridiagonals(op: Any, V0: torch.Tensor, num_iter: int,
                         basis_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Independent Lanczos runs from the columns of ``V0`` (``(n, b)``), in lockstep.

    The same as :func:`lanczos_tridiagonal` for each column, but each step applies the operator
    to the ``b`` current vectors at once (``op.matmat`` when it has one: one batched pass over
    the data); a run that breaks down early drops out of the block. Memory: ``b`` bases of up
    to ``num_iter`` vectors and a block of ``b`` products. An operator with ``shards``
    (:class:`analysis.shards.VectorShards`) takes this rank's shards: ``V0`` and the bases hold
    ``shards.local_numel`` rows, and every reduction is summed over the ranks.

    ``basis_dtype`` (:func:`basis_dtypes`): the bases stored narrower; each run then keeps its
    ``q_j`` and ``q_{j-1}`` in the working dtype and subtracts the three-term recurrence with them
    before the two Gram-Schmidt passes (two more vectors per run).
    """
    n = int(op.shape[0])
    num_iter = min(int(num_iter), n)
    shards = getattr(op, "shards", None)
    reduce, n_local = (None, n) if shards is None else (shards.sum, shards.local_numel)
    device, op_dtype = op.device, op.dtype
    dtype, store = (op_dtype, op_dtype) if basis_dtype is None else basis_dtypes(op_dtype,
                                                                                 basis_dtype)
    narrow, eps = store != dtype, breakdown_eps(dtype, store, n)
    b = V0.shape[1]
    bases, cur, prev = [], [], [None] * b
    for r in range(b):
        q = V0[:, r].to(device=device, dtype=dtype).clone()
        basis = KrylovBasis(n_local, num_iter, store, device, work_dtype=dtype,
                            first=chunk_rows(n_local, store.itemsize))
        basis.reduce = reduce
        basis.set_row(0, q.div_(norm64(q, reduce)))
        bases.append(basis)
        cur.append(q if narrow else None)
    Ts = [torch.zeros(num_iter, num_iter, dtype=torch.float64) for _ in range(b)]
    sizes = [num_iter] * b
    active = list(range(b))
    for j in range(num_iter):
        if not active:
            break
        Q = torch.stack([cur[r] if narrow else bases[r].row(j) for r in active], 1).to(op_dtype)
        W = op.matmat(Q) if hasattr(op, "matmat") else torch.stack(
            [op.matvec(Q[:, i].contiguous()) for i in range(Q.shape[1])], 1)
        del Q
        still = []
        for c, r in enumerate(active):
            basis, T, w = bases[r], Ts[r], W[:, c].to(dtype).contiguous()
            m = j + 1
            alpha = dot64(cur[r] if narrow else basis.row(j), w, reduce)
            if narrow:  # the recurrence with the exact vectors, the passes clean up
                w.add_(cur[r], alpha=-alpha)
                if j:
                    w.add_(prev[r], alpha=-float(T[j - 1, j]))
            h = basis.project(w, m)
            basis.subtract(w, h, m)
            h2 = basis.project(w, m)
            basis.subtract(w, h2, m)
            T[j, j] = alpha + float(h2[j]) + (float(h[j]) if narrow else 0.0)
            if j + 1 == num_iter:
                continue
            beta = norm64(w, reduce)
            scale = float(T[: j + 1, : j + 1].abs().max())
            if beta <= max(scale, 1e-300) * eps * 10:
                sizes[r] = j + 1
                bases[r] = cur[r] = prev[r] = None  # free them
                continue
            T[j, j + 1] = T[j + 1, j] = beta
            basis.set_row(j + 1, w.div_(beta))
            if narrow:
                prev[r], cur[r] = cur[r], w
            still.append(r)
        del W
        active = still
    return [T[: sizes[r], : sizes[r]] for r, T in enumerate(Ts)]


def lanczos_tridiagonal(op: Any, v0: torch.Tensor, num_iter: int) -> torch.Tensor:
    """``num_iter`` Lanczos steps with full reorthogonalization from ``v0``; returns ``T``.

    ``T = Q^T H Q`` is the ``(m, m)`` symmetric tridiagonal matrix (float64, on the CPU) of the
    Krylov basis ``Q`` (not kept: it grows with the steps taken, at most ``num_iter * n``
    numbers, plus two vectors). ``m < num_iter`` when the Krylov space is invariant (a lucky
    breakdown). The diagonal and the norms are accumulated in float64. The one-column case of
    :func:`lanczos_tridiagonals`, which stochastic Lanczos quadrature (:mod:`analysis.density`)
    runs in blocks.
    """
    return lanczos_tridiagonals(op, v0.reshape(-1, 1), num_iter)[0]


class OmegaRecurrence:
    """Estimates ``omega_{j+1, i} ~ q_{j+1}^T q_i`` of the loss of orthogonality (Simon 1984).

    Partial reorthogonalization (H. D. Simon, *The Lanczos algorithm with partial
    reorthogonalization*, Math. Comp. 42, 1984; as in PROPACK, Larsen 1998) tracks the inner
    products of the newest basis vector with the older ones without reading the basis: from
    ``beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1} + f_j`` and ``H q_i = sum_l
    T[l, i] q_l + g_i`` (the columns of the projected matrix ``T``, tridiagonal or the arrowhead
    of a thick restart, with local rounding ``f``, ``g``),

        beta_j omega_{j+1, i} = sum_l T[l, i] omega_{j, l} - alpha_j omega_{j, i}
                                - beta_{j-1} omega_{j-1, i} + theta_{j, i},   i < j,
        omega_{j+1, j} = psi_j,    omega_{j+1, j+1} = 1,

    ``O(m^2)`` float64 numbers per step on the CPU. The rounding terms are
    ``|theta_{j, i}| = c eps ||T||``, added with the sign of the rest (so the estimate grows in
    magnitude), and ``psi_j = c eps ||T|| / beta_j``, with ``c = OMEGA_NOISE`` at first (plain
    float64 Lanczos needed ``c ~ 10`` to stay above the true values; PROPACK takes
    ``sqrt(n) / 2``) and raised whenever a pass measures a larger loss than estimated
    (:meth:`calibrate`: the products' own rounding, e.g. of a float32 HVP, is larger). The caller reorthogonalizes when
    :meth:`need` says ``max_i |omega_{j+1, i}| > sqrt(eps)`` (semi-orthogonality, which keeps
    the Ritz values accurate to working precision, Simon's Thm), and then at the next step too,
    and calls :meth:`reset` for each reorthogonalized vector (its estimates back to ``eps``).
    Needs column ``j`` of ``T`` to be tridiagonal (``T[i, j] = 0`` for ``i < j - 1``); the
    caller reorthogonalizes fully where it is not (the first step after a thick restart).
    """

    def __init__(self, size: int, eps: float):
        self.eps = eps
        self.threshold = math.sqrt(eps)
        self.prev = torch.zeros(size, dtype=torch.float64)  # omega_{j-1, :}
        self.cur = torch.zeros(size, dtype=torch.float64)  # omega_{j, :}
        self.cur[0] = 1.0
        self.new: torch.Tensor | None = None
        self.noise = OMEGA_NOISE

    def update(self, T: torch.Tensor, j: int, beta: float, tnorm: float) -> float:
        """The estimates of ``q_{j+1}`` (column ``j`` of ``T`` filled); returns their max."""
        eps, cur, prev = self.eps, self.cur, self.prev
        new = torch.zeros_like(cur)
        beta = max(beta, 1e-300)
        if j >= 1:
            raw = T[: j + 1, :j].T @ cur[: j + 1] - T[j, j] * cur[:j] - T[j - 1, j] * prev[:j]
            sign = torch.where(raw >= 0, 1.0, -1.0)
            new[:j] = (raw + sign * self.noise * eps * tnorm) / beta
        new[j] = self.noise * eps * max(tnorm, beta) / beta
        self.new = new
        return float(new[: j + 1].abs().max())

    def need(self, T: torch.Tensor, j: int, beta: float, tnorm: float, kept: int = 0) -> bool:
        """Whether ``q_{j+1}`` has lost semi-orthogonality (estimated); the first ``kept`` rows
        were orthogonalized against at this step (their estimates ``eps``)."""
        self.update(T, j, beta, tnorm)
        assert self.new is not None
        self.new[:kept] = self.eps
        return float(self.new[: j + 1].abs().max()) > self.threshold

    def calibrate(self, true: float, estimate: float) -> None:
        """A pass measured ``max_i |q_{j+1}^T q_i| = true`` where ``estimate`` was estimated:
        scale the rounding terms up when the estimate was low (never down)."""
        if true > estimate > 0:
            self.noise = min(self.noise * 2 * true / estimate, 1e8)

    def advance(self, j: int, reorthogonalized: bool) -> None:
        """Move to step ``j + 1`` (``q_{j+1}`` becomes the newest vector)."""
        assert self.new is not None
        new = self.new
        if reorthogonalized:
            new[: j + 1] = self.eps
        new[j + 1:] = 0.0
        if j + 1 < new.numel():
            new[j + 1] = 1.0
        self.prev, self.cur, self.new = self.cur, new, None

    def reset(self, j: int) -> None:
        """``q_j`` (and ``q_{j-1}``) orthogonal to working precision: every estimate ``eps``."""
        self.prev.fill_(self.eps)
        self.cur.fill_(self.eps)
        self.cur[j:] = 0.0
        self.cur[j] = 1.0
        self.prev[max(j - 1, 0):] = 0.0
        if j >= 1:
            self.prev[j - 1] = 1.0


class Reorthogonalizer:
    """The Gram-Schmidt passes of a Lanczos run over ``basis``, full or partial.

    :meth:`full` is one classical Gram-Schmidt pass over the first ``m`` rows and a second
    when the first cancelled more than ``1 - DGKS_ETA`` of the norm (DGKS); :meth:`partial`
    makes that pass only when :class:`OmegaRecurrence` estimates a loss of semi-orthogonality,
    and at the step after it (Simon 1984). After a thick restart the kept Ritz vectors are not
    Lanczos vectors: their relation ``H y_k = theta_k y_k + c_k q`` holds only to the
    reorthogonalization coefficients left out of ``T`` (``sqrt(eps)``-level), which the omega
    recurrence does not see (seen: a ghost copy of a converged eigenvalue), so every step
    orthogonalizes against them (selective orthogonalization against the kept, converged Ritz
    vectors, Parlett & Scott 1979: a pass over ``kept`` rows instead of ``m``), and the omega
    recurrence watches the rows built since. :attr:`passes` counts the passes (any length).
    """

    def __init__(self, basis: KrylovBasis, eps: float, size: int | None = None):
        self.basis = basis  # ``size``: the estimates kept (default the basis's capacity)
        self.omega = OmegaRecurrence(basis.capacity if size is None else size, eps)
        self.force = 0  # the step after a triggered reorthogonalization reorthogonalizes too
        self.passes = 0
        self.kept = 0  # rows kept by the last thick restart (orthogonalized against each step)

    def full(self, w: torch.Tensor, m: int, w1: float) -> tuple[torch.Tensor, float]:
        """``w`` orthogonalized in place against rows ``0..m-1``; ``(projections, ||w||)``."""
        basis = self.basis
        h = basis.project(w, m)
        basis.subtract(w, h, m)
        wn = norm64(w, basis.reduce)
        self.passes += 1
        if not wn >= DGKS_ETA * w1:
            h2 = basis.project(w, m)
            basis.subtract(w, h2, m)
            h += h2
            wn = norm64(w, basis.reduce)
            self.passes += 1
        return h, wn

    def partial(self, w: torch.Tensor, T: torch.Tensor, j: int, alpha: float, c: float,
                tnorm: float) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Step ``j`` after the three-term recurrence: ``(w, ||w||, column j of T)``.

        The column keeps only the tridiagonal entries ``alpha``, ``c`` (the reorthogonalization
        coefficients are rounding errors, not part of ``T``: Simon 1984); ``T`` gets it here,
        since the estimates need it.
        """
        m, basis = j + 1, self.basis
        h = torch.zeros(m, dtype=torch.float64)
        h[j] = alpha
        if j >= 1:
            h[j - 1] = c
        T[:m, j] = h
        T[j, :m] = h
        if self.kept and not self.force:
            basis.subtract(w, basis.project(w, self.kept), self.kept)
            self.passes += 1
        wn = norm64(w, basis.reduce)
        lost = self.omega.need(T, j, wn, max(tnorm, wn + abs(alpha) + abs(c)), self.kept)
        done = bool(self.force or lost)
        if done:
            estimate = float(self.omega.new[:m].abs().max())
            hr, wn2 = self.full(w, m, wn)
            self.omega.calibrate(float(hr.abs().max()) / wn, estimate)
            wn = wn2
        self.force = int(lost and not self.force)
        self.omega.advance(j, done)
        return w, wn, h

    def reset(self, j: int) -> None:
        """Row ``j`` was orthogonalized to working precision (restart, breakdown, full step)."""
        self.omega.reset(j)
        self.force = 0

    def restart(self, w: torch.Tensor, keep: int) -> float:
        """After a thick restart to ``keep`` rows: ``w`` orthogonalized against them (it was
        semi-orthogonal), the estimates back to ``eps``; returns ``||w||`` after the pass."""
        _, wn = self.full(w, keep, 1.0)
        self.kept = keep
        self.reset(keep)
        return wn


def default_max_basis(n: int, k: int) -> int:
    """The default Krylov basis size of :func:`analysis.top_eigenpairs`: ``min(n, max(2k + 1, 20))``,
    ARPACK's (and ``scipy.sparse.linalg.eigsh``'s) ``ncv``. On the scale benchmark's ResNet-18
    (11.2M parameters, top-5) it took 38 products with 3 thick restarts where ``max(2k + 20,
    40)``, the default before, took 36 with none, at half the basis memory (0.94 vs 1.65 GB)."""
    return min(n, max(2 * k + 1, 20))


def default_max_iter(n: int, k: int) -> int:
    """The default cap on products of :func:`analysis.top_eigenpairs`: ``min(max(300, 30k), 10n)``."""
    return min(max(300, 30 * k), 10 * n)


def memory_bound_bytes(n: int, max_basis: int, itemsize: int, basis_itemsize: int | None = None,
                       k: int = 1) -> int:
    """The bound on the peak extra memory of :func:`analysis.top_eigenpairs` outside the products.

    ``(max_basis + 3) * n * itemsize`` (eigenvectors included), ``itemsize`` that of the
    working vectors (float32 for a half-precision operator); with a narrow basis
    (``basis_itemsize < itemsize``, :func:`basis_dtypes`) ``max_basis * n * basis_itemsize +
    max(3, k) * n * itemsize``: the
    stored rows, then the current and previous Lanczos vectors and the product (or, at the end,
    the ``k`` eigenvectors) in the working dtype.
    """
    b = itemsize if basis_itemsize is None else int(basis_itemsize)
    if b >= itemsize:
        return int((max_basis + 3) * n * itemsize)
    return int(max_basis * n * b + max(3, k) * n * itemsize)


def basis_dtypes(op_dtype: torch.dtype, basis_dtype: Any = None) -> tuple[torch.dtype, torch.dtype]:
    """``(working dtype, stored basis dtype)`` of Lanczos on an operator of ``op_dtype``.

    The working dtype (products' results, current vectors, rotations) is the operator's, float32
    for a bfloat16 / float16 operator; the basis is stored in ``basis_dtype`` (default: the
    working dtype), a floating dtype no wider than the working one (``torch.bfloat16``,
    ``torch.float16``, or ``torch.float32`` under a float64 operator).

    Raises:
        TypeError: ``basis_dtype`` is not a ``torch.dtype``.
        ValueError: it is not one of bfloat16, float16, float32, float64, or it is wider than
            the working dtype.
    """
    work = torch.float32 if op_dtype in (torch.bfloat16, torch.float16) else op_dtype
    if basis_dtype is None:
        return work, work
    if not isinstance(basis_dtype, torch.dtype):
        raise TypeError(f"basis_dtype must be a torch.dtype or None, got {basis_dtype!r}")
    if basis_dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64) or \
            basis_dtype.itemsize > work.itemsize:
        allowed = "torch.bfloat16, torch.float16" + (
            ", torch.float32" if work == torch.float64 else "")
        raise ValueError(f"basis_dtype must be a floating dtype no wider than the working dtype "
                         f"{work} ({allowed}), got {basis_dtype}")
    return work, basis_dtype


def breakdown_eps(work: torch.dtype, store: torch.dtype, n: int) -> float:
    """The relative level below which a Lanczos step's ``beta`` is a breakdown (``beta <= 10 eps
    ||T||``): the working dtype's epsilon, or with a narrower stored basis (:func:`basis_dtypes`)
    at least ``eps_b / sqrt(n)``, the level to which ``w`` can be orthogonal to the rounded rows
    (a smaller ``beta`` is rounding, not a new direction: normalized, it blew a bfloat16 run's
    Ritz values up to 9e4)."""
    eps = torch.finfo(work).eps
    return max(eps, torch.finfo(store).eps / math.sqrt(n)) if store != work else eps
