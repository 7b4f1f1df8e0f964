"""Extreme eigenpairs of the Hessian by Lanczos with full reorthogonalization and thick restarts.

Algorithm (symmetric Lanczos, Golub & Van Loan 10.1; thick restart of Wu & Simon 2000):

    q_0 = v0 / ||v0||                       (random Gaussian by default)
    for j = 0, 1, ...:
        w = H q_j                            (one matvec, on the operator's device and dtype)
        h = Q_j^T w ; w -= Q_j h             (full reorthogonalization, done twice: DGKS)
        beta_j = ||w|| ; q_{j+1} = w / beta_j
        T[:j+1, j] = T[j, :j+1] = h ; T[j+1, j] = T[j, j+1] = beta_j
        Rayleigh-Ritz: T_j = S diag(theta) S^T (float64, on the CPU: the matrix is tiny)
        residual of Ritz pair i:   r_i = ||H y_i - theta_i y_i|| = |beta_j * S[j, i]|
        stop when err_i <= tol * |theta_i| for the k wanted pairs

The stopping rule bounds the error of the **eigenvalues** a posteriori. For each Ritz pair
``(theta_i, y_i)`` with ``||y_i|| = 1`` and residual ``r_i``:

* there is an eigenvalue of ``H`` within ``r_i`` of ``theta_i`` (rigorous), and
* if no other eigenvalue lies within ``gap_i`` of ``theta_i``, then ``|lambda - theta_i| <=
  r_i^2 / gap_i`` (Kato-Temple / the residual-squared bound, Parlett, *The Symmetric Eigenvalue
  Problem*, Thm 11.7.1).

* for a cluster: if the ``p`` most extreme Ritz values (a block containing ``theta_i``) are
  separated by ``delta_p`` from the rest of the spectrum, every one of them is within
  ``sum_{j<=p} r_j^2 / delta_p`` of an eigenvalue (the quadratic residual bound for a block,
  Mathias 1998; Li & Li 2005), which stays small inside a tight cluster where ``gap_i`` does not.

``gap_i`` is estimated from the Ritz values as the distance from ``theta_i`` to the nearest other
Ritz value, reduced by that value's residual (``gap_i = min_j |theta_i - theta_j| - r_j``, at
least 0), and ``delta_p`` likewise as the distance from the block's innermost Ritz value to the
next one, less its residual; the estimate used is

    err_i = min(r_i, r_i^2 / gap_i, min_{p: i in block p} sum_{j<=p} r_j^2 / delta_p)

(the block term for ``which="LA"`` and ``"SA"``).

The gap is an estimate, not a guarantee: an eigenvalue that the Krylov space has not seen yet can
lie closer (it then usually surfaces as a new Ritz value within a few iterations; start vectors
are random, so it is seen with probability one). As a guard, the stop also requires the first
unwanted Ritz value to be resolved (residual below 10% of its distance to the wanted ones, or
converged to ``10 tol``), so that a close ``(k+1)``-th eigenvalue is located before the gaps are
trusted. A wanted eigenvalue that the Krylov space has not seen at all can still be missed, with
``converged=True``: when two eigenvalues near the ``k``-th are close, ask for ``k + 2`` pairs or a
smaller ``tol``. Single-vector Lanczos finds one copy of an
eigenvalue of multiplicity > 1 per invariant subspace hit; a lucky breakdown restarts from a fresh
random vector while fewer than ``k`` Ritz values exist.

Memory: one vector of length ``n`` is stored per basis vector, allocated as the basis grows (in
chunks: the first of ``k`` rows, then 16 rows), so a run that stops after 12 products holds
``max(k, 12)``-ish rows, not ``max_basis``. ``max_basis`` caps it (default
``min(n, max(2k + 20, 40))``); when the basis is full, Lanczos thick-restarts keeping the wanted
Ritz vectors, rotated **in place** (slab of columns by slab), and the returned eigenvectors are the
first ``k`` rows of the basis rotated in place, so the peak extra memory is

    peak <= (max_basis + 3) * n * itemsize  +  one product's working memory

(``max_basis + 1`` basis rows, the product ``w`` and one vector's worth of rotation slabs; the
eigenvectors are counted in it). :attr:`EigenResult.basis_bytes` reports the basis actually
allocated and :attr:`EigenResult.memory_bound_bytes` the formula. ``basis_device="cpu"`` keeps the
basis in host memory (pinned when the operator is on CUDA) while the products stay on the
accelerator; then only two vectors live on the accelerator next to the activations.
``max_iter`` caps the total number of matvecs.

Precision: the Lanczos coefficients ``alpha_j = q_j^T H q_j`` and ``beta_j = ||w||`` and every norm
are accumulated in float64 (slab by slab, without float64 copies of whole vectors); in float32 the
Gram-Schmidt projections are two-level (float32 partial sums over 8192 entries, added in float64),
since a plain float32 product over 5e6 entries is off by ~1e-4 relative and moved Ritz values by
3e-3. The eigenvectors are normalized in float64. The error bounds are floored by the
rounding level of the products, ``sqrt(m) * max(noise, 4 eps ||T||)`` with ``noise`` the largest
off-band ``|q_i^T H q_j|`` seen (zero in exact arithmetic), so they are not smaller than what the
working precision can resolve (in bfloat16 a ``tol`` of ``1e-3`` is then not reached, honestly).
A bfloat16 or float16 operator gets a float32 basis (``itemsize`` 4 in the formula below), since
a half-precision basis loses orthogonality at ``1e-2`` and with it whole eigenvalues.

Cost outside the products: each step is one or two classical Gram-Schmidt passes (the second
only when the first cancelled more than ``1/sqrt 2`` of ``w``, the DGKS criterion), each pass one
matrix-vector product per basis chunk; plus an ``m x m`` eigendecomposition on the CPU.

Example:
    >>> import torch
    >>> from analysis.lanczos import top_eigenpairs
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> res = top_eigenpairs(A, k=3)
    >>> [round(x) for x in res.eigenvalues.tolist()]
    [100, 99, 98]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .evaluation import progress_bar
from .hessian import HessianOperator
from .operators.adapters import _CallableOperator, _TensorOperator, as_linear_operator  # noqa: F401
from .results import Result

__all__ = ["EigenResult", "top_eigenpairs", "as_linear_operator", "lanczos_tridiagonal",
           "lanczos_tridiagonals"]


@dataclass(frozen=True, repr=False)
class EigenResult(Result):
    """Extreme eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` tensor, descending (for every ``which``).
        eigenvectors: ``(k, n)`` tensor of rows of unit norm (in float64), ``eigenvectors[i]``
            belongs to ``eigenvalues[i]``; in the operator's dtype, on its device (or on
            ``basis_device``), usable as landscape directions.
        residuals: ``(k,)`` tensor, ``||H x_i - lambda_i x_i||``.
        error_bounds: ``(k,)`` float64 tensor, the a-posteriori eigenvalue error estimate
            ``min(r_i, r_i^2 / gap_i, cluster bound)``, floored by the products' rounding level,
            that the stop used (see the module docstring).
        converged: True when every ``error_bounds[i] <= tol * |eigenvalues[i]|``.
        num_matvecs: matvecs used by this call.
        num_iter: Lanczos steps taken (equal to ``num_matvecs``).
        num_restarts: thick restarts performed.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        tol: the relative eigenvalue tolerance asked.
        basis_bytes: the largest size of the Krylov basis during the run, in bytes (it grows
            as needed, in chunks).
        memory_bound_bytes: ``(max_basis + 3) * n * itemsize``, the bound on the peak extra
            memory outside the products (eigenvectors included).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    error_bounds: torch.Tensor
    converged: bool
    num_matvecs: int
    num_iter: int
    num_restarts: int
    which: str
    tol: float
    basis_bytes: int = 0
    memory_bound_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary (the eigenvectors are left out: they are ``k x n`` numbers)."""
        d = super().to_dict()
        d["eigenvectors"] = {"shape": list(self.eigenvectors.shape),
                             "dtype": str(self.eigenvectors.dtype)}
        return d


# -- memory-bounded Krylov basis and float64 reductions -------------------------------------------

#: Entries per slab of the float64 reductions and the in-place basis rotations (bounds their
#: temporaries to a few slabs instead of whole ``n``-vectors).
SLAB = 1 << 20
#: Slab of the two-level low-precision projections (partial sums of this many entries).
EXACT_SLAB = 8192


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a . b`` accumulated in float64 (slab by slab, so no float64 copy of a whole vector)."""
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return float(torch.dot(a, b))
    n = a.numel()
    total = 0.0
    for s in range(0, n, SLAB):
        total += float(torch.dot(a[s:s + SLAB].double(), b[s:s + SLAB].double()))
    return total


def norm64(a: torch.Tensor) -> float:
    """``||a||_2`` accumulated in float64 (see :func:`dot64`)."""
    return math.sqrt(max(dot64(a, a), 0.0))


class KrylovBasis:
    """Orthonormal rows stored in chunks that are allocated as the basis grows.

    Rows live in chunks of ``first`` rows (the first chunk, which ends up holding the returned
    eigenvectors) and then ``chunk`` rows, never more than ``capacity`` rows in all, on
    ``device`` (optionally pinned host memory). Each Gram-Schmidt pass is one matrix-vector
    product per chunk (blocked BLAS); rotations ``Q[:p] <- S^T Q[:m]`` are done in place, slab of
    columns by slab, so their temporaries hold about ``n`` numbers (one vector).
    """

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: Any, *,
                 first: int, chunk: int = 16, pin: bool = False):
        self.n, self.capacity, self.dtype = n, capacity, dtype
        self.device = torch.device(device)
        self.first = max(1, min(first, capacity))
        self.chunk = max(1, chunk)
        self.pin = pin
        #: accumulate projections in float64 (slab by slab) for low-precision bases: a float32
        #: gemv over 5e6 entries is off by ~1e-4 relative whatever the number of passes (its
        #: error scales with |q| |w|, not |q . w|), which moved Ritz values by 3e-3
        self.exact = dtype != torch.float64
        self.chunks: list[torch.Tensor] = []
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
        c[r].copy_(v)
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
        """``Q[:m] w`` (one product per chunk), as a float64 CPU vector."""
        h = torch.empty(m, dtype=torch.float64)
        if self.dtype == torch.float64 or not self.exact:
            for part, s in self._parts(m):
                h[s:s + part.shape[0]] = (part @ w).cpu()
            return h
        # low precision: accumulate in float64, a slab of columns at a time (a float32 gemv
        # over 1e7 entries is off by ~1e-4 relative, enough to spoil the Ritz values)
        # two-level: working-precision partial sums over short slabs (error ~ sqrt(W) eps),
        # added up in float64 (no float64 copies of the basis: those casts cost more than
        # the whole projection)
        width = EXACT_SLAB
        parts = list(self._parts(m))
        acc = torch.zeros(m, dtype=torch.float64, device=self.device)
        for a in range(0, self.n, width):
            b = min(a + width, self.n)
            wa = w[a:b]
            for part, s in parts:
                acc[s:s + part.shape[0]] += part[:, a:b] @ wa
        h.copy_(acc.cpu())
        return h

    def subtract(self, w: torch.Tensor, h: torch.Tensor, m: int) -> torch.Tensor:
        """``w - Q[:m]^T h`` in place."""
        hh = h.to(device=self.device, dtype=self.dtype)
        for part, s in self._parts(m):
            w.addmv_(part.T, hh[s:s + part.shape[0]], alpha=-1)  # no temporary vector
        return w

    def rotate(self, S: torch.Tensor, m: int) -> None:
        """``Q[:p] <- S^T Q[:m]`` in place for an ``(m, p)`` float64 matrix ``S``, ``p <= m``."""
        p = S.shape[1]
        St = S.T.to(device=self.device, dtype=self.dtype)
        width = max(1024, min(SLAB, self.n // (m + p)))  # temporaries (m + p) * width <= ~n
        for a in range(0, self.n, width):
            b = min(a + width, self.n)
            X = torch.cat([part[:, a:b] for part, _ in self._parts(m)], 0)  # (m, s) copy
            Y = St @ X
            for part, s in self._parts(p):
                part[:, a:b].copy_(Y[s:s + part.shape[0]])
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


def _wanted(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted Ritz values (theta ascending)."""
    m = theta.numel()
    kk = min(k, m)
    if which == "LA":
        return torch.arange(m - 1, m - 1 - kk, -1)
    if which == "SA":
        return torch.arange(0, kk)
    return torch.argsort(theta.abs(), descending=True)[:kk]


def _error_bounds(theta: torch.Tensor, res: torch.Tensor, idx: torch.Tensor,
                  which: str = "LA") -> torch.Tensor:
    """Eigenvalue error estimates for the Ritz values ``idx`` (``theta`` ascending).

    ``min(r_i, r_i^2 / gap_i, block_i)``: the residual bound, the single-pair residual-squared
    bound with the gap to the other Ritz values (less their residuals), and for ``LA`` / ``SA``
    the cluster bound ``sum_{j in B} r_j^2 / delta_B`` over blocks ``B`` of extreme Ritz values
    that contain ``i`` (``delta_B`` the gap from the block to the next Ritz value, less its
    residual), which stays small inside a cluster of close eigenvalues.
    """
    m = theta.numel()
    r = res[idx]
    if m > 1:
        D = (theta[None, :] - theta[idx][:, None]).abs() - res[None, :]
        D[torch.arange(idx.numel()), idx] = math.inf
        gap = D.min(1).values.clamp_min(0.0)
        quad = torch.where(gap > 0, r * r / gap.clamp_min(1e-300),
                           torch.full_like(r, math.inf))
    else:
        quad = torch.full_like(r, math.inf)
    out = torch.minimum(r, quad)
    if which in ("LA", "SA") and m > 1:
        # blocks of the p most extreme Ritz values, p = 1 .. m-1 (Mathias 1998; Li & Li 2005:
        # |lambda_j - theta_j| <= ||R||^2 / delta for all j in the block, ||R||^2 = sum r_j^2)
        th = theta.flip(0) if which == "LA" else theta
        rs = res.flip(0) if which == "LA" else res
        r2 = torch.cumsum(rs * rs, 0)[:-1]  # blocks 1..m-1
        delta = ((th[:-1] - th[1:]).abs() - rs[1:]).clamp_min(0.0)
        # the gap below block p is min over the block's lowest member: th[p-1] vs th[p]
        bound = torch.where(delta > 0, r2 / delta, torch.full_like(delta, math.inf))
        # pair at extreme-rank q (0-based) is in every block p >= q + 1
        suffix_min = torch.flip(torch.cummin(torch.flip(bound, [0]), 0).values, [0])
        q = (m - 1 - idx) if which == "LA" else idx
        inner = q < m - 1
        cand = torch.where(inner, suffix_min[q.clamp_max(m - 2)], torch.full_like(out, math.inf))
        out = torch.minimum(out, cand)
    return out


#: Guard on the first unwanted Ritz value (see :func:`_guard_ok`).
GUARD_FACTOR = 10.0
GUARD_GAP_FRACTION = 0.1


def _guard_ok(theta: torch.Tensor, res: torch.Tensor, k: int, which: str, tol: float,
              eps: float) -> bool:
    """Whether the first unwanted Ritz value ``theta_g`` is resolved well enough to trust the gaps.

    The gaps in the error estimates of the wanted pairs are measured to the other Ritz values;
    while the eigenvalue just beyond the ``k`` wanted ones is not yet resolved, its Ritz value
    lies further away, the gap is overestimated and the stop can come too early (seen: two
    eigenvalues 1% apart at positions ``k`` and ``k + 1`` gave relative errors 2-3x ``tol``).
    So the stop also asks that ``theta_g`` is located either to ``GUARD_GAP_FRACTION`` of its
    distance to the nearest wanted Ritz value (residual ``r_g <= 0.1 * gap``: cheap when the
    wanted eigenvalues are well separated from the rest) or to ``GUARD_FACTOR * tol`` relative
    accuracy (when it sits close to them).
    """
    m = theta.numel()
    if m <= k:
        return True
    wanted = _wanted(theta, k, which)
    g = _wanted(theta, k + 1, which)[-1:]
    gap = float((theta[wanted] - theta[g]).abs().min())
    if float(res[g]) <= GUARD_GAP_FRACTION * gap:
        return True
    err = _error_bounds(theta, res, g, which)
    scale = torch.clamp(theta[g].abs(), min=math.sqrt(eps) * float(theta.abs().max()))
    return bool((err <= GUARD_FACTOR * tol * scale).all())


def top_eigenpairs(
    model_or_op: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    k: int = 5,
    which: str = "LA",
    tol: float = 1e-3,
    max_iter: int | None = None,
    max_basis: int | None = None,
    seed: int = 0,
    v0: torch.Tensor | str | None = "auto",
    progress: bool = False,
    basis_device: Any = None,
    pin_memory: bool | None = None,
    **operator_kwargs: Any,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of the Hessian (or any symmetric operator) by Lanczos.

    Lanczos with full reorthogonalization on the operator's device, thick restarts when the basis
    reaches ``max_basis``, and an a-posteriori stop on the eigenvalue error: the iteration ends as
    soon as ``min(r_i, r_i^2 / gap_i, cluster bound) <= tol * |theta_i|`` for all ``k`` wanted
    Ritz pairs (residual ``r_i``, gap to the other Ritz values ``gap_i``; see the module
    docstring for the bounds and their caveats). PyHessian's power iteration instead needs about 25 matvecs per
    eigenpair for ~1% error (MSAM paper, Table A.5 reports such top eigenvalues).

    Args:
        model_or_op: an ``nn.Module`` (then ``loss_fn`` and ``data`` are required and a
            :class:`~analysis.hessian.HessianOperator` is built with ``operator_kwargs``, e.g.
            ``mode``, ``params``, ``batch_size``), a curvature operator (e.g. a
            :class:`~analysis.hessian.GGNOperator`), a square tensor, or any object with
            ``shape`` and ``matvec``.
        loss_fn: loss name or callable (with a model).
        data: data (with a model), see :mod:`analysis.data`.
        k: number of eigenpairs (``1 <= k <= n``). Default 5.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic, ``"LM"``
            largest magnitude.
        tol: relative accuracy asked of the eigenvalues (default ``1e-3``).
        max_iter: cap on matvecs (default ``max(300, 30 k)``, at most ``10 n``).
        max_basis: stored basis vectors (memory ``max_basis * n`` numbers; default
            ``min(n, max(2k + 20, 40))``); thick restart when full.
        seed: seed of the random start vector (drawn on the CPU, so devices agree).
        v0: the start vector: ``"auto"`` (default) is ``"gradient"`` for a Hessian operator and
            ``"random"`` otherwise; ``"random"`` a Gaussian vector; ``"gradient"`` the sum of the
            unit loss gradient and a unit Gaussian vector (the gradient leans towards the top
            of the Hessian spectrum, Gur-Ari et al. 2018, which saves a few matvecs for
            ``which="LA"``; the random half keeps every eigendirection present; the gradient is
            free with the cached-graph Hessian); or a flat tensor of length ``n``.
        progress: show a tqdm bar over the iterations.
        basis_device: where the Krylov basis (and the returned eigenvectors) live; default the
            operator's device. ``"cpu"`` with a CUDA operator keeps the ``max_basis * n`` basis in
            host memory (each step moves two vectors over the bus).
        pin_memory: pin the host basis (default: when the basis is on the CPU and the operator
            on CUDA).

    Memory: peak extra ``<= (max_basis + 3) * n * itemsize`` plus one product's working memory
    (see the module docstring); reported in :attr:`EigenResult.basis_bytes` and
    :attr:`EigenResult.memory_bound_bytes`.

    Returns:
        :class:`EigenResult` with eigenvalues in descending order.

    Raises:
        ValueError: for ``k`` outside ``[1, n]``, an unknown ``which``, a bad ``tol``, or a
            ``max_basis`` too small for ``k``.
    """
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    op = as_linear_operator(model_or_op, loss_fn, data, **operator_kwargs)
    n = int(op.shape[0])
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n:
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")
    if max_basis is None:
        max_basis = min(n, max(2 * k + 20, 40))
    if not isinstance(max_basis, int) or max_basis < min(n, k + 2):
        raise ValueError(f"max_basis must be an integer >= k + 2 = {k + 2} (or n), got {max_basis!r}")
    max_basis = min(max_basis, n)
    if max_iter is None:
        max_iter = min(max(300, 30 * k), 10 * n)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")

    device, op_dtype = op.device, op.dtype
    # half-precision operators get a float32 basis: a bfloat16 basis loses orthogonality at
    # 1e-2 and with it whole eigenvalues
    dtype = torch.float32 if op_dtype in (torch.bfloat16, torch.float16) else op_dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    bdev = torch.device(device if basis_device is None else basis_device)
    if pin_memory is None:
        pin_memory = bdev.type == "cpu" and torch.device(device).type == "cuda"
    pin_memory = bool(pin_memory) and bdev.type == "cpu" and torch.cuda.is_available()
    eps = torch.finfo(dtype).eps  # the basis precision: breakdown and scale tests
    op_eps = torch.finfo(op_dtype).eps  # the products' precision: the floor of the bounds
    gen = torch.Generator().manual_seed(seed)

    def random_vector() -> torch.Tensor:
        return torch.randn(n, generator=gen, dtype=torch.float64).to(device=bdev, dtype=dtype)

    T = torch.zeros(max_basis + 1, max_basis + 1, dtype=torch.float64)
    if v0 == "auto" or v0 is None:
        v0 = "gradient" if isinstance(op, HessianOperator) and which == "LA" else "random"
    if isinstance(v0, str):
        if v0 not in ("random", "gradient"):
            raise ValueError(f"v0 must be 'auto', 'random', 'gradient' or a tensor, got {v0!r}")
        if v0 == "gradient" and not hasattr(op, "gradient"):
            raise ValueError("v0='gradient' needs a HessianOperator (or a model), got "
                             f"{type(op).__name__}")
        q = random_vector()
        if v0 == "gradient":
            g = op.gradient().to(device=bdev, dtype=dtype)
            gn = norm64(g)
            q.div_(norm64(q))
            if gn > 0 and math.isfinite(gn):
                q.add_(g, alpha=1.0 / gn)
            del g
    else:
        if not isinstance(v0, torch.Tensor) or v0.shape != (n,):
            raise ValueError(f"v0 must be a tensor of shape ({n},), got "
                             f"{tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
        q = v0.detach().to(device=bdev, dtype=dtype).clone()
    nrm = norm64(q)
    if not nrm > 0 or not math.isfinite(nrm):
        raise ValueError("the start vector v0 is zero or not finite")
    basis = KrylovBasis(n, max_basis + 1, dtype, bdev, first=k, pin=pin_memory)
    basis.set_row(0, q.div_(nrm))
    del q

    start_matvecs = op.num_matvecs
    j = 0  # index of the column being computed; basis rows 0..j are the basis
    band = 2  # off-band entries h[:j-1] are zero in exact arithmetic once j >= band
    noise = 0.0  # largest off-band |q_i^T H q_j|: the rounding level of the products
    restarts = 0
    steps = 0
    beta = 0.0
    theta = S = res = errs = idx = None
    converged = False

    def bounds(theta, res, idx, m):
        tnorm = float(theta.abs().max()) if theta.numel() else 0.0
        floor = math.sqrt(m) * max(noise, 4 * op_eps * tnorm)
        return torch.clamp(_error_bounds(theta, res, idx, which), min=floor)

    bar = progress_bar(range(max_iter), enabled=progress, desc="lanczos", unit="matvec")
    for _ in bar:
        qj = basis.row(j)
        w = op.matvec(qj if bdev == torch.device(device) and dtype == op_dtype else
                      qj.to(device=device, dtype=op_dtype, non_blocking=True))
        steps += 1
        if w.device != bdev or w.dtype != dtype:
            w = w.to(device=bdev, dtype=dtype)
        m = j + 1
        w0 = norm64(w)
        alpha = dot64(qj, w)
        h = basis.project(w, m)
        basis.subtract(w, h, m)
        wn = norm64(w)
        if wn < 0.7071 * w0:  # DGKS: a second pass only when cancellation happened
            h2 = basis.project(w, m)
            basis.subtract(w, h2, m)
            h = h + h2
            alpha += float(h2[j])
            wn = norm64(w)
        if j >= band and j > 1:
            noise = max(noise, float(h[: j - 1].abs().max()))
        h[j] = alpha
        beta = wn
        T[:m, j] = h
        T[j, :m] = h
        theta, S = torch.linalg.eigh(T[:m, :m])
        res = (beta * S[-1, :]).abs()
        idx = _wanted(theta, k, which)
        scale = torch.clamp(theta[idx].abs(), min=math.sqrt(eps) * float(theta.abs().max()))
        errs = bounds(theta, res, idx, m)
        tnorm = float(theta.abs().max())
        breakdown = beta <= max(tnorm, 1e-300) * eps * 10 or m == n
        if idx.numel() >= k and bool((errs <= tol * scale).all()) and _guard_ok(
                theta, res, k, which, tol, eps):
            converged = True
            break
        if breakdown and m >= n:
            converged = bool((errs <= tol * scale).all()) if idx.numel() >= k else False
            break
        if breakdown:
            # invariant subspace: continue with a fresh random vector orthogonal to the basis
            beta_new = 0.0
            for _try in range(3):
                w = random_vector()
                basis.subtract(w, basis.project(w, m), m)
                basis.subtract(w, basis.project(w, m), m)
                beta_new = norm64(w)
                if beta_new > eps * 100:
                    break
            w.div_(beta_new)
            T[m, j] = T[j, m] = 0.0
            beta = 0.0
        else:
            w.div_(beta)
            T[m, j] = T[j, m] = beta
        if m < max_basis:
            basis.set_row(m, w)
            del w
            j = m
            continue
        # thick restart: keep the wanted Ritz vectors (and a few more), then the residual
        keep = min(max(k + (max_basis - k) // 2, k), max_basis - 1)
        order = _wanted(theta, keep, which) if which != "LM" else torch.argsort(
            theta.abs(), descending=True)[:keep]
        coupling = beta * S[-1, order]
        basis.rotate(S[:, order], m)  # rows 0..keep-1 <- the Ritz vectors, in place
        basis.set_row(keep, w)
        del w
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[order])
        T[:keep, keep] = coupling
        T[keep, :keep] = coupling
        j = keep
        band = keep + 1
        restarts += 1
        # the Ritz pairs of the kept block (in case the iteration budget ends here)
        theta, S = torch.linalg.eigh(T[:keep, :keep])
        res = (S.T @ coupling).abs()
        idx = _wanted(theta, k, which)
        errs = bounds(theta, res, idx, keep)
    if hasattr(bar, "close"):
        bar.close()

    assert theta is not None and S is not None and res is not None and idx is not None
    m = S.shape[0]
    if idx.numel() < k:  # cannot happen for k <= n unless max_iter < k
        raise ValueError(f"max_iter={max_iter} is too small to find k={k} eigenpairs")
    order = torch.argsort(theta[idx], descending=True)
    idx = idx[order]
    errs = errs[order]
    # Ritz vectors in place in the first k rows of the basis; the rest is freed
    basis.rotate(S[:, idx], m)
    basis.truncate(k)
    peak_bytes = basis.peak_rows * n * itemsize
    vecs = basis.chunks[0][:k]
    del basis
    for i in range(k):
        vecs[i].div_(norm64(vecs[i]))
    if op_dtype != dtype:
        vecs = vecs.to(op_dtype)
    return EigenResult(
        eigenvalues=theta[idx].to(device=device, dtype=op_dtype),
        eigenvectors=vecs,
        residuals=res[idx].to(device=device, dtype=op_dtype),
        error_bounds=errs.to(device=device, dtype=torch.float64),
        converged=converged,
        num_matvecs=op.num_matvecs - start_matvecs,
        num_iter=steps,
        num_restarts=restarts,
        which=which,
        tol=float(tol),
        basis_bytes=int(peak_bytes),
        memory_bound_bytes=int((max_basis + 3) * n * itemsize),
    )


def lanczos_tridiagonals(op: Any, V0: torch.Tensor, num_iter: int) -> list[torch.Tensor]:
    """Independent Lanczos runs from the columns of ``V0`` (``(n, b)``), in lockstep.

    The same as :func:`lanczos_tridiagonal` for each column, but each step applies the operator
    to the ``b`` current vectors at once (``op.matmat`` when it has one: one batched pass over
    the data); a run that breaks down early drops out of the block. Memory: ``b`` bases of up
    to ``num_iter`` vectors and a block of ``b`` products.
    """
    n = int(op.shape[0])
    num_iter = min(int(num_iter), n)
    device, dtype = op.device, op.dtype
    eps = torch.finfo(dtype).eps
    b = V0.shape[1]
    bases = []
    for r in range(b):
        q = V0[:, r].to(device=device, dtype=dtype).clone()
        basis = KrylovBasis(n, num_iter, dtype, device, first=16)
        basis.set_row(0, q.div_(norm64(q)))
        bases.append(basis)
    Ts = [torch.zeros(num_iter, num_iter, dtype=torch.float64) for _ in range(b)]
    sizes = [num_iter] * b
    active = list(range(b))
    for j in range(num_iter):
        if not active:
            break
        Q = torch.stack([bases[r].row(j) for r in active], 1)
        W = op.matmat(Q) if hasattr(op, "matmat") else torch.stack(
            [op.matvec(Q[:, i].contiguous()) for i in range(Q.shape[1])], 1)
        del Q
        still = []
        for c, r in enumerate(active):
            basis, T, w = bases[r], Ts[r], W[:, c].contiguous()
            m = j + 1
            alpha = dot64(basis.row(j), w)
            basis.subtract(w, basis.project(w, m), m)
            h2 = basis.project(w, m)
            basis.subtract(w, h2, m)
            T[j, j] = alpha + float(h2[j])
            if j + 1 == num_iter:
                continue
            beta = norm64(w)
            scale = float(T[: j + 1, : j + 1].abs().max())
            if beta <= max(scale, 1e-300) * eps * 10:
                sizes[r] = j + 1
                bases[r] = None  # free it
                continue
            T[j, j + 1] = T[j + 1, j] = beta
            basis.set_row(j + 1, w.div_(beta))
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
