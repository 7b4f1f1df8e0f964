"""Extreme eigenpairs of the Hessian by Lanczos with partial or full reorthogonalization and thick
restarts.

Algorithm (symmetric Lanczos, Golub & Van Loan 10.1; thick restart of Wu & Simon 2000):

    q_0 = v0 / ||v0||                       (random Gaussian by default)
    for j = 0, 1, ...:
        w = H q_j                            (one matvec, on the operator's device and dtype)
        alpha = q_j^T w ; w -= alpha q_j + beta_{j-1} q_{j-1}     (three-term recurrence)
        h = Q_j^T w ; w -= Q_j h             (reorthogonalization: every step, or when needed)
        beta_j = ||w|| ; q_{j+1} = w / beta_j
        T[:j+1, j] = T[j, :j+1] = h + alpha e_j + beta_{j-1} e_{j-1}
        T[j+1, j] = T[j, j+1] = beta_j
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
trusted; the guard is waived once the residuals alone meet the tolerance (``r_i <= tol
|theta_i|`` for every wanted pair, the rigorous bound, which uses no gap: ARPACK's stopping rule),
since then no gap is trusted (on the scale benchmark's ResNet-18 the guard alone held the stop 11
products past the point where the gap bounds were met, 6 past the plain residuals).

Missed eigenvalues: no bound can certify that none above the ``k``-th Ritz value is missing; the
stop waits ``look_ahead`` products (default 3) after the rule first holds
(:class:`~analysis.ritz.LookAhead`, which has the measurements). Single-vector Lanczos finds one
copy of an eigenvalue of multiplicity > 1 per invariant subspace hit; a lucky breakdown (``beta
<= 10 ||T|| eps``, with a narrow basis ``eps >= eps_b / sqrt(n)``, the level to which ``w`` can be
orthogonal to its rows) goes on from a fresh random vector, so a look-ahead past it finds the
next copy.

Memory: one vector of length ``n`` is stored per basis vector, allocated as the basis grows (in
chunks: the first of ``k`` rows, then chunks of at most ``max(one vector, 256 MiB)``,
:func:`~analysis.krylov.chunk_rows`), so a run that stops after 12 products holds
``max(k, 12)``-ish rows, not ``max_basis``. ``max_basis`` caps it (default ``min(n, max(2k + 1,
20))``, ARPACK's ``ncv``); when the basis is full, Lanczos thick-restarts keeping the wanted Ritz
vectors, rotated **in place** (slab of columns by slab), and the returned eigenvectors are the
first ``k`` rows of the basis rotated in place, so the peak extra memory is

    peak <= (max_basis + 3) * n * itemsize  +  one product's working memory

(the basis rows, the product ``w`` and one vector's worth of rotation slabs; the eigenvectors
are counted in it). A narrower ``basis_dtype`` stores the rows in it while ``q_j``, ``q_{j-1}``,
the product and the eigenvectors stay in the working dtype: ``max_basis * n * basis_itemsize +
max(3, k) * n * itemsize`` (:func:`~analysis.krylov.memory_bound_bytes`; a default run holds
about ``max_basis + 1`` vectors, so bfloat16 under float32 saves memory from ``max_basis = 5``).
:attr:`EigenResult.basis_bytes` reports the basis actually allocated and
:attr:`EigenResult.memory_bound_bytes` the formula. ``basis_device="cpu"`` keeps the basis in
host memory (pinned with a CUDA operator); then two vectors live on the accelerator.

Precision: the Lanczos coefficients ``alpha_j = q_j^T H q_j`` and ``beta_j = ||w||`` and every norm
are accumulated in float64 (slab by slab, slabs that fit in cache, without float64 copies of
whole vectors); the three-term recurrence uses these coefficients; in float32 the Gram-Schmidt
projections are two-level (float32 partial sums over 8192 entries, added in float64),
since a plain float32 product over 5e6 entries is off by ~1e-4 relative and moved Ritz values by
3e-3. The eigenvectors are normalized in float64. The error bounds are floored by the
rounding level of the products, ``sqrt(m) * max(noise, 4 eps ||T||)`` with ``noise`` the largest
off-band ``|q_i^T H q_j|`` seen (zero in exact arithmetic), so they are not smaller than what the
working precision can resolve; a ``tol`` below it (``1e-3`` in bfloat16) stops there, unconverged
(:class:`~analysis.precision.FloorWatch`). A bfloat16 / float16 operator warns and gets float32
vectors and basis (``itemsize`` 4). A narrow ``basis_dtype`` raises the floor to at least
``eps_b / sqrt(n)`` relative (``4 eps_b^2`` after a thick restart; :meth:`FloorWatch.level
<analysis.precision.FloorWatch.level>`); the eigenvectors carry its rounding, ``~eps_b``.

Cost outside the products: each step subtracts the three-term recurrence (two vectors); with
``reorth="full"`` it then makes one classical Gram-Schmidt pass over the whole basis (one
matrix-vector product per basis chunk for ``Q^T w`` and one for ``w -= Q h``: the basis is read
twice, ``2 m n`` numbers), a second only when the first removed more than ``1 - 1/sqrt 2`` of the
norm (DGKS, measured after the recurrence). ``reorth="partial"`` (the default; Simon 1984, as in
PROPACK) estimates ``omega_{j+1, i} ~ q_{j+1}^T q_i`` from ``T`` alone (the omega recurrence of
:class:`~analysis.krylov.OmegaRecurrence`, ``O(m^2)`` on the CPU, its rounding terms calibrated
upwards at each pass against the measured ``Q^T w``) and makes the pass only when
``max |omega| > sqrt(eps)``, and at the next step (so the basis stays semi-orthogonal, which keeps
the Ritz values accurate to working precision; ``T`` stays tridiagonal). After a thick restart
every step also makes a pass over the kept Ritz vectors alone (selective orthogonalization,
Parlett & Scott 1979): their Lanczos relation holds only to ``sqrt(eps)``, which the recurrence
cannot see (a ghost copy of a converged eigenvalue, without it). Eigenvectors are then
orthonormal to about ``sqrt(eps)`` rather than ``eps`` (measured: 4e-13 in float64, 2e-6 in
float32; full: 1e-15, 9e-8). bfloat16 and float16 operators always get full passes (their
products' rounding, far above the basis ``eps``, is what the bounds' floor measures).
``benchmarks/lanczos_overhead.py`` measures both. The basis (:class:`~analysis.krylov.KrylovBasis`,
:func:`~analysis.krylov.dot64`) lives in :mod:`analysis.krylov`, the bounds in :mod:`analysis.ritz`.

Example:
    >>> import torch
    >>> from analysis import top_eigenpairs
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

from .checks import check_seed
from .data import Data
from .disk_basis import ON_DISK, DiskBasis, check_basis_device, disk_memory_bound_bytes
from .evaluation import progress_bar
from .krylov import (
    KrylovBasis,
    Reorthogonalizer,
    basis_dtypes,
    breakdown_eps,
    dot64,
    memory_bound_bytes,
    norm64,
)
from .lanczos_args import check_arguments, start_vector
from .losses import LossSpec
from .operators.adapters import as_linear_operator
from .precision import FloorWatch, autocast_disabled, warn_half_precision
from .results import Result
from .ritz import DEFAULT_LOOK_AHEAD, LookAhead, guard_ok, ritz_error_bounds, wanted_indices
from .uncertainty import DEFAULT_MIN_UNITS, DataStdError, check_stderr_args, with_eigen_stderr


@dataclass(frozen=True, repr=False)
class EigenResult(Result):
    """Extreme eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` tensor, descending (for every ``which``).
        eigenvectors: ``(k, n)`` tensor of rows of unit norm (in float64), ``eigenvectors[i]``
            belongs to ``eigenvalues[i]``, its sign fixed so that its entry of largest
            magnitude is positive (as scikit-learn's ``svd_flip``: reproducible across runs
            that differ by rounding); in the operator's dtype, on its device (or on
            ``basis_device``), usable as landscape directions.
        residuals: ``(k,)`` tensor, ``||H x_i - lambda_i x_i||`` as Lanczos estimates it
            (``beta_m |s_mi|``): with ``reorth="full"`` equal to the true residual to rounding;
            with ``"partial"`` after a thick restart, to about ``1e-11 ||H||`` in float64 (the
            basis is semi-orthogonal; measured 6.4e-12 true vs 4.6e-14 estimated at ``||H|| =
            3.4``, ``tests/oracle/test_curvlinops.py``).
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
            as needed, in chunks; the stored rows, in ``basis_dtype``).
        memory_bound_bytes: the bound on the peak extra memory outside the products
            (eigenvectors included; :func:`~analysis.krylov.memory_bound_bytes`).
        stop_reason: ``"converged"``, ``"max_iter"``, ``"exhausted"`` (the whole space) or
            ``"precision floor: ..."`` (:class:`~analysis.precision.FloorWatch`).
        data_stderr, data_sampling: the eigenvalues' data-sampling standard errors, ``(k,)``
            float64, and their :class:`~analysis.uncertainty.DataStdError` (``None``: not asked).
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
    stop_reason: str = ""
    data_stderr: torch.Tensor | None = None
    data_sampling: DataStdError | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary (the eigenvectors are left out: they are ``k x n`` numbers)."""
        d = super().to_dict()
        d["eigenvectors"] = {"shape": list(self.eigenvectors.shape),
                             "dtype": str(self.eigenvectors.dtype)}
        return d


@autocast_disabled()
def top_eigenpairs(
    model_or_op: Any,
    loss_fn: LossSpec = None,
    data: Data = None,
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
    reorth: str = "partial", basis_dtype: torch.dtype | None = None,
    look_ahead: int = DEFAULT_LOOK_AHEAD,
    data_stderr: bool = True, min_units: int = DEFAULT_MIN_UNITS,
    **operator_kwargs: Any,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of the Hessian (or any symmetric operator) by Lanczos.

    Lanczos with partial (or full) reorthogonalization on the operator's device, thick restarts
    when the basis reaches ``max_basis``, and an a-posteriori stop on the eigenvalue error: the iteration ends as
    soon as ``min(r_i, r_i^2 / gap_i, cluster bound) <= tol * |theta_i|`` for all ``k`` wanted
    Ritz pairs (residual ``r_i``, gap to the other Ritz values ``gap_i``; see the module
    docstring for the bounds and their caveats). PyHessian's power iteration instead needs about 25 matvecs per
    eigenpair for ~1% error (MSAM paper, Table A.5 reports such top eigenvalues).

    Args:
        model_or_op: an ``nn.Module`` (then ``loss_fn`` and ``data`` are required and a
            :class:`~analysis.HessianOperator` is built with ``operator_kwargs``, e.g.
            ``mode``, ``params``, ``batch_size``), a curvature operator (e.g. a
            :class:`~analysis.GGNOperator`), a square tensor, or any object with
            ``shape`` and ``matvec``.
        loss_fn: loss name or callable (with a model).
        data: data (with a model), see :mod:`analysis.data`.
        k: number of eigenpairs (``1 <= k <= n``). Default 5.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic, ``"LM"``
            largest magnitude.
        tol: relative accuracy asked of the eigenvalues (default ``1e-3``).
        max_iter: cap on matvecs (default ``max(300, 30 k)``, at most ``10 n``).
        max_basis: stored basis vectors (memory ``max_basis * n`` numbers; default
            ``min(n, max(2k + 1, 20))``, as ARPACK); thick restart when full.
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
            host memory (each step moves two vectors over the bus). ``"disk"``: the rows in a
            temporary file (:mod:`analysis.disk_basis`; in ``TMPDIR``), streamed through 64 MiB
            of buffers, so memory no longer grows with ``max_basis``; the eigenvectors are
            returned on the operator's device.
        basis_dtype: the dtype the basis rows are stored in (default ``None``: the working dtype,
            the operator's, float32 for half precision); ``torch.bfloat16`` / ``torch.float16``
            (or ``torch.float32`` under float64) halve it or better, at an accuracy floor of
            about ``eps_b / sqrt(n)`` (``4 eps_b^2`` after a thick restart) relative; see the
            module docstring.
        pin_memory: pin the host basis (default: when the basis is on the CPU and the operator
            on CUDA).
        reorth: ``"partial"`` (default): reorthogonalize against the basis only when the
            estimated loss of orthogonality exceeds ``sqrt(eps)`` (Simon 1984, see the module
            docstring); ``"full"``: one Gram-Schmidt pass over the basis at every step.
        look_ahead: products taken after the stopping rule first holds, during which it must
            keep holding with the wanted Ritz values unchanged within their bounds (default 3;
            ``0`` stops at once). They guard against an eigenvalue that the Krylov space has not
            seen yet (see "Missed eigenvalues" in the module docstring).
        data_stderr, min_units: the data-sampling standard errors (default on: ``k`` more products,
            counted in ``num_matvecs``; 16 units), :func:`analysis.uncertainty.with_eigen_stderr`.

    Precision: runs outside ``torch.autocast`` (:mod:`analysis.precision`); a bfloat16 / float16
    operator warns and stops at its precision floor.

    Memory: peak extra ``<= (max_basis + 3) * n * itemsize`` (narrow basis: ``max_basis * n *
    basis_itemsize + max(3, k) * n * itemsize``; on disk ``max(4, k) * n * itemsize + 64 MiB``)
    plus one product's working memory; reported in
    :attr:`EigenResult.basis_bytes` and :attr:`EigenResult.memory_bound_bytes`.

    Returns:
        :class:`EigenResult` with eigenvalues in descending order.

    Raises:
        ValueError: for ``k`` outside ``[1, n]``, an unknown ``which``, a bad ``tol``, a
            ``max_basis`` too small for ``k``, or a ``basis_dtype`` wider than the working dtype.
        TypeError: for a ``basis_dtype`` that is not a ``torch.dtype``.
    """
    seed = check_seed(seed, "top_eigenpairs()")
    op = as_linear_operator(model_or_op, loss_fn, data, **operator_kwargs)
    n, max_basis, max_iter = check_arguments(op, k, which, tol, max_iter, max_basis,
                                             look_ahead)
    if reorth not in ("partial", "full"):
        raise ValueError(f"reorth must be 'partial' or 'full', got {reorth!r}")
    check_stderr_args(data_stderr, min_units)
    warn_half_precision(op.dtype, float(tol), "top_eigenpairs", stacklevel=4)
    run = _Lanczos(op, k, which, tol, max_basis, max_iter, seed, basis_device, pin_memory,
                   reorth, basis_dtype, look_ahead)
    try:
        run.start(start_vector(op, v0, which, run))
        bar = progress_bar(range(max_iter), enabled=progress, desc="lanczos", unit="matvec")
        for _ in bar:
            if run.step():
                break
        if hasattr(bar, "close"):
            bar.close()
        result = run.result()
    finally:  # a basis on disk frees its file now, also on an error (not when GC'd)
        if run.disk:  # (result() drops run.basis; the reorthogonalizer holds it to the end)
            run.reorth.basis.close()
    return with_eigen_stderr(result, op, data_stderr, min_units)


class _Lanczos:
    """The state of one thick-restart Lanczos run of :func:`top_eigenpairs`.

    Rows ``0..j`` of :attr:`basis` are the Krylov basis, :attr:`T` its projected matrix
    ``Q^T H Q`` (float64, CPU); :meth:`step` takes one product and updates the Ritz pairs
    (``theta`` ascending, eigenvectors ``S`` of ``T``, residuals, error bounds of the wanted
    ones ``idx``).
    """

    def __init__(self, op: Any, k: int, which: str, tol: float, max_basis: int, max_iter: int,
                 seed: int, basis_device: Any, pin_memory: bool | None,
                 reorth: str = "partial", basis_dtype: torch.dtype | None = None,
                 look_ahead: int = 0):
        self.look = LookAhead(look_ahead)
        self.op, self.k, self.which, self.tol, self.max_basis = op, k, which, tol, max_basis
        self.max_iter, self.cur, self.prev = max_iter, None, None
        self.n = n = int(op.shape[0])
        # sharded vectors (analysis.shards): this rank's rows, reductions summed over ranks
        self.shards = getattr(op, "shards", None)
        self.reduce = None if self.shards is None else self.shards.sum
        self.local_n = n if self.shards is None else self.shards.local_numel
        self.device, self.op_dtype = op.device, op.dtype
        # working vectors float32 for half-precision operators (bfloat16 ones lose orthogonality
        # at 1e-2); a narrow basis_dtype keeps cur and prev (q_j, q_{j-1}) in the working dtype
        dtype, self.basis_dtype = basis_dtypes(op.dtype, basis_dtype)
        # (a basis on disk hands out no rows: cur and prev are kept as for a narrow one)
        self.dtype, self.itemsize = dtype, dtype.itemsize
        self.disk = check_basis_device(basis_device)
        self.narrow = self.basis_dtype != dtype or self.disk
        self.prev_on_disk = self.disk and self.basis_dtype == dtype  # rows stored exactly
        self.bdev = torch.device(self.device if basis_device is None or self.disk
                                 else basis_device)
        pin = self.bdev.type == "cpu" and torch.device(self.device).type == "cuda" \
            if pin_memory is None else pin_memory
        pin = bool(pin) and self.bdev.type == "cpu" and torch.cuda.is_available()
        self.same = self.bdev == torch.device(self.device) and dtype == op.dtype
        self.eps = torch.finfo(dtype).eps  # the working precision: scale tests
        self.break_eps = breakdown_eps(dtype, self.basis_dtype, n)
        self.op_eps = torch.finfo(op.dtype).eps  # the products' precision
        # partial reorthogonalization models rounding at the basis precision: products rounded
        # coarser than that (bfloat16, float16) get full passes, which also measure their noise
        self.partial = reorth == "partial" and self.op_eps <= self.eps
        self.gen = torch.Generator().manual_seed(seed)
        self.basis = DiskBasis(self.local_n, max_basis, self.basis_dtype, self.bdev,
                               work_dtype=dtype) if self.disk else \
            KrylovBasis(self.local_n, max_basis, self.basis_dtype, self.bdev, first=k, pin=pin,
                        work_dtype=dtype)  # rows 0..max_basis-1
        self.basis.reduce = self.reduce
        self.reorth = Reorthogonalizer(self.basis, self.eps, size=max_basis + 1)
        self.T = torch.zeros(max_basis + 1, max_basis + 1, dtype=torch.float64)
        self.j = 0  # index of the column being computed; basis rows 0..j are the basis
        self.band = 2  # off-band entries h[:j-1] are zero in exact arithmetic once j >= band
        self.noise = 0.0  # largest off-band |q_i^T H q_j|: the rounding level of the products
        self.tnorm = 0.0  # running max of |alpha_j| + |beta_{j-1}| (~ ||T||, for the estimates)
        self.restarts = self.steps = 0
        self.theta = self.S = self.res = self.errs = self.idx = None
        self.watch = FloorWatch(op.dtype, basis_dtype=self.basis_dtype, n=n)  # (below 4 eps: wide)
        self.converged, self.stop_reason = False, "max_iter"
        self.start_matvecs = op.num_matvecs

    def random_vector(self) -> torch.Tensor:
        v = torch.randn(self.n, generator=self.gen, dtype=torch.float64) if self.shards is None \
            else self.shards.randn(self.gen)  # the same vector, this rank's slice
        return v.to(device=self.bdev, dtype=self.dtype)

    def start(self, q: torch.Tensor) -> None:
        nrm = norm64(q, self.reduce)
        if not nrm > 0 or not math.isfinite(nrm):
            raise ValueError("the start vector v0 is zero or not finite")
        self.basis.set_row(0, q.div_(nrm))
        self.cur = q if self.narrow else None

    def bounds(self, theta: torch.Tensor, res: torch.Tensor, idx: torch.Tensor,
               m: int) -> torch.Tensor:
        """The error estimates, floored by the rounding level of the products."""
        tnorm = float(theta.abs().max()) if theta.numel() else 0.0
        self.floor = floor = self.watch.level(m, self.noise, tnorm, self.restarts > 0)
        self.raw = ritz_error_bounds(theta, res, idx, self.which)
        return torch.clamp(self.raw, min=floor)

    def at_floor(self, scale: torch.Tensor) -> str | None:
        """The precision-floor stop (:class:`~analysis.precision.FloorWatch`); unless the guard
        holds at the floor's tolerance, the bounds are the residuals (no gap trusted), floored."""
        r, tol_floor = self.res[self.idx], min(float((self.floor / scale).max()), 0.5)
        reason = self.watch.update(self.floor, self.raw, r, scale, self.tol)
        if reason and not guard_ok(self.theta, self.res, self.k, self.which, tol_floor, self.eps):
            self.errs = torch.maximum(self.errs, torch.clamp(r, min=self.floor))
        return reason

    def _expand(self, j: int) -> tuple[torch.Tensor, float, torch.Tensor]:
        """``w = H q_j`` orthogonalized against rows ``0..j``: ``(w, ||w||, column j of T)``.

        The three-term recurrence ``w -= alpha q_j + beta q_{j-1}`` comes first (float64
        coefficients), then (``reorth="full"``, or the first step after a thick restart, whose
        column is the arrowhead) one classical Gram-Schmidt pass over the whole basis, whose
        projections add up to the column ``Q^T H q_j``; with ``"partial"`` the pass is made only
        when the estimated loss of orthogonality asks for it (and at the next step), and the
        column keeps the tridiagonal entries (Simon 1984: the reorthogonalization coefficients
        are rounding errors, not part of ``T``).
        """
        basis = self.basis
        qj = self.cur if self.narrow else basis.row(j)
        w = self.op.matvec(qj if self.same else
                           qj.to(device=self.device, dtype=self.op_dtype, non_blocking=True))
        self.steps += 1
        if w.device != self.bdev or w.dtype != self.dtype:
            w = w.to(device=self.bdev, dtype=self.dtype)
        m = j + 1
        alpha = dot64(qj, w, self.reduce)
        # (a narrow basis after a thick restart: the coupling is the full pass's projection)
        c = float(self.T[j - 1, j]) if j >= 1 and (self.prev is not None or not self.narrow) \
            else 0.0
        w.add_(qj, alpha=-alpha)
        if c != 0.0:
            if self.prev is ON_DISK:  # q_{j-1} streamed from its row: bitwise the same update
                basis.add_row(w, j - 1, -c)
            else:
                w.add_(self.prev if self.narrow else basis.row(j - 1), alpha=-c)
        if self.partial and not (self.restarts and j == self.band - 1):
            self.tnorm = max(self.tnorm, abs(alpha) + abs(c))
            return self.reorth.partial(w, self.T, j, alpha, c, self.tnorm)
        w1 = float(torch.linalg.vector_norm(w)) if self.reduce is None else norm64(
            w, self.reduce)  # only for the DGKS test: working precision (global if sharded)
        h, wn = self.reorth.full(w, m, w1)
        if j >= self.band and j > 1:
            self.noise = max(self.noise, float(h[: j - 1].abs().max()))
        h[j] += alpha
        if j >= 1:
            h[j - 1] += c
        if self.partial:  # the arrowhead step: q_{j+1} orthogonal to working precision
            self.reorth.reset(j + 1)
        return w, wn, h

    def _ritz(self, m: int, coupling: torch.Tensor) -> None:
        """Ritz pairs of ``T[:m, :m]`` with residuals ``|S^T coupling|`` (last row(s))."""
        self.theta, self.S = torch.linalg.eigh(self.T[:m, :m])
        self.res = (self.S.T @ coupling).abs() if coupling.dim() else \
            (coupling * self.S[-1, :]).abs()
        self.idx = wanted_indices(self.theta, self.k, self.which)
        self.errs = self.bounds(self.theta, self.res, self.idx, m)

    def step(self) -> bool:
        """One Lanczos step (one product); True when the iteration stops."""
        j, m, n = self.j, self.j + 1, self.n
        w, beta, h = self._expand(j)
        self.T[:m, j] = h
        self.T[j, :m] = h
        self._ritz(m, torch.tensor(beta, dtype=torch.float64))
        theta, idx = self.theta, self.idx
        tnorm = float(theta.abs().max())
        scale = torch.clamp(theta[idx].abs(), min=math.sqrt(self.eps) * tnorm)
        ok = bool((self.errs <= self.tol * scale).all())
        breakdown = beta <= max(tnorm, 1e-300) * self.break_eps * 10 or m == n
        # the guard protects the gap estimates; residuals that meet tol alone need no gap
        if idx.numel() >= self.k and ok and (
                bool((self.res[idx] <= self.tol * scale).all())
                or guard_ok(theta, self.res, self.k, self.which, self.tol, self.eps)):
            if self.look.confirmed(self.steps, theta[idx], self.errs, self.max_iter):
                self.converged = True
                return True
        else:
            self.look.reset()
        if breakdown and m >= n:
            self.converged = ok if idx.numel() >= self.k else False
            self.stop_reason = "exhausted"  # "converged" if it converged (see result())
            return True
        if idx.numel() >= self.k and not ok and (reason := self.at_floor(scale)) is not None:
            self.stop_reason = reason
            return True
        if breakdown:
            w, beta = self._fresh_vector(m), 0.0
            if self.partial:
                self.reorth.reset(m)
        else:
            w.div_(beta)
        self.T[m, j] = self.T[j, m] = beta
        if m < self.max_basis:
            self.basis.set_row(m, w)
            if self.narrow:
                # on disk in the working dtype, q_{j-1} is read back from its row when needed
                self.prev, self.cur = ON_DISK if self.prev_on_disk else self.cur, w
            self.j = m
            return False
        self._restart(w, beta, m)
        return False

    def _fresh_vector(self, m: int) -> torch.Tensor:
        """After a lucky breakdown: a random unit vector orthogonal to the ``m`` rows."""
        beta_new, basis = 0.0, self.basis
        for _try in range(3):
            w = self.random_vector()
            basis.subtract(w, basis.project(w, m), m)
            basis.subtract(w, basis.project(w, m), m)
            beta_new = norm64(w, self.reduce)
            if beta_new > self.eps * 100:
                break
        return w.div_(beta_new)

    def _restart(self, w: torch.Tensor, beta: float, m: int) -> None:
        """Thick restart: keep the wanted Ritz vectors (and a few more), then the residual."""
        k, which, theta, S = self.k, self.which, self.theta, self.S
        keep = min(max(k + (self.max_basis - k) // 2, k), self.max_basis - 1)
        order = wanted_indices(theta, keep, which) if which != "LM" else torch.argsort(
            theta.abs(), descending=True)[:keep]
        coupling = beta * S[-1, order]
        self.cur = self.prev = None  # (narrow basis) the coupling comes from the next full pass
        self.basis.rotate(S[:, order], m)  # rows 0..keep-1 <- the Ritz vectors, in place
        if self.partial:  # w was only semi-orthogonal: to working precision, estimates reset
            w.div_(self.reorth.restart(w, keep))
        self.basis.set_row(keep, w)
        self.cur = w if self.narrow else None
        T = self.T
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[order])
        T[:keep, keep] = coupling
        T[keep, :keep] = coupling
        self.j = keep
        self.band = keep + 1
        self.restarts += 1
        # the Ritz pairs of the kept block (in case the iteration budget ends here)
        self._ritz(keep, coupling)

    def result(self) -> EigenResult:
        """The wanted Ritz pairs, descending; the eigenvectors rotated in place into the basis."""
        theta, S, res, idx, errs = self.theta, self.S, self.res, self.idx, self.errs
        assert theta is not None and S is not None and res is not None and idx is not None
        k, m = self.k, S.shape[0]
        if idx.numel() < k:  # cannot happen for k <= n unless max_iter < k
            raise ValueError(f"max_iter={self.max_iter} is too small to find k={k} eigenpairs")
        order = torch.argsort(theta[idx], descending=True)
        idx, errs = idx[order], errs[order]
        basis, self.cur, self.prev = self.basis, None, None
        # Ritz vectors in place in the first k rows (narrow basis: into the working dtype)
        out = torch.empty(k, self.local_n, dtype=self.dtype, device=self.bdev) if self.narrow \
            else None
        basis.rotate(S[:, idx], m, out=out)
        basis.truncate(k)  # the rest freed
        vecs = basis.chunks[0][:k] if out is None else out
        peak_bytes = basis.peak_rows * self.local_n * self.basis_dtype.itemsize
        del basis  # (a basis on disk: top_eigenpairs closes its file)
        self.basis = None
        for i in range(k):
            # unit norm (float64 accumulation) and a fixed sign: the entry of largest
            # magnitude positive (scikit-learn's svd_flip), so runs that differ by rounding
            # (one process or sharded, another product method) give the same vectors
            scale = norm64(vecs[i], self.reduce)
            if (vecs[i][int(vecs[i].abs().argmax())] < 0 if self.shards is None
                    else self.shards.largest_entry_sign(vecs[i]) < 0):
                scale = -scale
            vecs[i].div_(scale)
        if self.op_dtype != self.dtype:
            vecs = vecs.to(self.op_dtype)
        return EigenResult(
            eigenvalues=theta[idx].to(device=self.device, dtype=self.op_dtype), eigenvectors=vecs,
            residuals=res[idx].to(device=self.device, dtype=self.op_dtype),
            error_bounds=errs.to(device=self.device, dtype=torch.float64),
            converged=self.converged, num_matvecs=self.op.num_matvecs - self.start_matvecs,
            num_iter=self.steps, num_restarts=self.restarts, which=self.which,
            tol=float(self.tol), basis_bytes=int(peak_bytes),
            memory_bound_bytes=disk_memory_bound_bytes(self.local_n, self.itemsize, k)
            if self.disk else memory_bound_bytes(self.local_n, self.max_basis, self.itemsize,
                                                 self.basis_dtype.itemsize, k),
            stop_reason="converged" if self.converged else self.stop_reason)
