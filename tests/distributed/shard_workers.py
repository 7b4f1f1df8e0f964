"""Analysis of an FSDP2-sharded model (issue 24 item 2): functions run on every rank.

The same function runs on one process without a process group (``world == 1``: the model is
not sharded and ``HessianOperator`` is the plain one with ``method="finite-difference"``), so
the two runs share every line but the sharding. Sharded vectors come back as full vectors
(``shards.full``) so that the test compares them with one process's.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.distributed.fsdp_workers import make_model, shard
from tests.distributed.workers import _run_checks

N_SAMPLES, BATCH = 40, 16  # 3 batches (16, 16, 8): 2 on rank 0 and 1 on rank 1 with shard=True
K, TOL = 3, 1e-10
HUTCHINSON, HUTCHPP, EXACT = 24, 30, 219  # EXACT = 3 n: Hutch++'s sketch spans the space


def data(sharded: bool = False):
    from analysis.data import as_data
    from tests.models import classification_data

    x, y = classification_data(n=N_SAMPLES, d=6, classes=3, seed=1)
    return as_data((x, y), batch_size=BATCH, shard=sharded)


def probe(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def local_slice(op, v: torch.Tensor) -> torch.Tensor:
    """This rank's shards of the full vector ``v`` (``v`` itself on one process)."""
    shards = getattr(op, "shards", None)
    if shards is None:
        return v
    return torch.cat([v[off:off + length] for off, length in shards.segments])


def full(op, v: torch.Tensor) -> torch.Tensor:
    shards = getattr(op, "shards", None)
    return v if shards is None else shards.full(v)


def analysis_checks(rank: int, world: int) -> dict[str, tuple[str, Any]]:
    """Products, top-k, traces and the density on the sharded model (``world`` ranks) or the
    plain one (one process)."""
    from analysis import HessianOperator, hessian_trace, spectral_density, top_eigenpairs

    model = make_model()
    if world > 1:
        shard(model)

    def operator(sharded_data: bool = False, **kwargs):
        return HessianOperator(model, "cross_entropy", data(sharded_data),
                               method="finite-difference", **kwargs)

    def layout():
        op = operator()
        shards = getattr(op, "shards", None)
        return {"n": op.shape[0], "type": type(op).__name__,
                "local": op.shape[0] if shards is None else shards.local_numel}

    def matvec(sharded_data: bool = False, **kwargs):
        op = operator(sharded_data, **kwargs)
        return full(op, op @ local_slice(op, probe(op.shape[0])))

    def topk():
        op = operator()
        res = top_eigenpairs(op, k=K, tol=TOL, v0="random", data_stderr=False)
        return {"eigenvalues": res.eigenvalues, "converged": res.converged,
                "vectors": torch.stack([full(op, v) for v in res.eigenvectors]),
                "basis_bytes": res.basis_bytes, "memory_bound_bytes": res.memory_bound_bytes}

    def topk_defaults():  # v0="auto" (the gradient start), data_stderr on
        res = top_eigenpairs(operator(), k=K, tol=1e-6)
        return {"eigenvalues": res.eigenvalues, "num_iter": res.num_iter,
                "stderr": res.data_stderr}

    def trace(method: str, num_matvecs: int):
        res = hessian_trace(operator(), num_matvecs=num_matvecs, method=method, seed=3)
        return {"estimate": res.estimate, "samples": res.samples, "low": res.low_rank_part}

    def density():
        res = spectral_density(operator(), num_iter=12, num_runs=3, seed=5)
        return {"nodes": res.nodes, "weights": res.weights}

    def directional():  # d^T H d / ||d||^2 with d this rank's shards of one vector
        from analysis import directional_curvature

        op = operator()
        return directional_curvature(op, local_slice(op, probe(op.shape[0])))

    def bad_method():
        try:
            HessianOperator(model, "cross_entropy", data(), method="double-backward")
        except ValueError as e:
            return str(e)
        return None

    def refused_data():
        """One batch for 2 ranks (rank 1 would have none), and per-rank data of other sizes
        given as the same (unsharded) data: ValueError on every rank."""
        from analysis.data import as_data
        from tests.models import classification_data

        x, y = classification_data(n=N_SAMPLES, d=6, classes=3, seed=1)
        errors = []
        for d in (as_data((x[:8], y[:8]), shard=True), (x[:8 + 4 * rank], y[:8 + 4 * rank])):
            try:
                HessianOperator(model, "cross_entropy", d)
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        return errors

    return _run_checks({
        "layout": layout, "matvec": matvec, "matvec_sharded_data": lambda: matvec(True),
        "matvec_microbatches": lambda: matvec(True, microbatch_size=5),
        "topk": topk, "topk_defaults": topk_defaults, "hutchinson": lambda: trace("hutchinson", HUTCHINSON),
        "hutchpp": lambda: trace("hutch++", HUTCHPP), "hutchpp_exact": lambda: trace(
            "hutch++", EXACT), "density": density, "bad_method": bad_method,
        "refused_data": refused_data, "directional": directional,
    })
