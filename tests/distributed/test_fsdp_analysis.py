"""Analysis of an FSDP2-sharded model on 2 gloo ranks equals one process (issue 24 item 2).

The model (``fsdp_workers.make_model``: 73 float64 parameters, every tensor split unevenly,
44 entries on rank 0 and 29 on rank 1) is sharded with ``fully_shard``; ``HessianOperator``
then builds the finite-difference operator on this rank's shards. References: the dense float64
Hessian (products, top-k, the exact trace, the density's moments) and the same code on one
process with ``method="finite-difference"`` (the same random probes, so the stochastic
estimates agree to the products' rounding).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.reference import dense_hessian
from tests.distributed import shard_workers as sw
from tests.distributed.fsdp_workers import make_model
from tests.distributed.launcher import check_values, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RTOL = 1e-8  # finite differences in float64: ~5e-11 relative observed on this model


@pytest.fixture(scope="module")
def ranks():
    out = run_ranks(sw.analysis_checks, 2, (), deadline=360, collective_timeout=120)
    return [o.value for o in out]


@pytest.fixture(scope="module")
def reference():
    return sw.analysis_checks(0, 1)


@pytest.fixture(scope="module")
def hessian():
    return dense_hessian(make_model(), "cross_entropy", sw.data())


def _ok(reference, name):
    status, value = reference[name]
    assert status == "ok", f"one process, check {name}:\n{value}"
    return value


def _local_sizes(world: int) -> list[int]:
    """Entries per rank under torch.chunk of dim 0 (FSDP2's Shard(0)), from the shapes."""
    sizes = [0] * world
    for p in make_model().parameters():
        rows, per = p.shape[0], -(-p.shape[0] // world)
        for r in range(world):
            sizes[r] += max(0, min(per, rows - r * per)) * (p.numel() // rows)
    return sizes


def test_layout(ranks, reference):
    layouts = check_values(ranks, "layout")
    n = _ok(reference, "layout")["n"]
    assert [lay["n"] for lay in layouts] == [n, n] == [73, 73]
    assert [lay["type"] for lay in layouts] == ["ShardedHessianOperator"] * 2
    assert [lay["local"] for lay in layouts] == _local_sizes(2) == [44, 29]


@pytest.mark.parametrize("name", ["matvec", "matvec_sharded_data", "matvec_microbatches"])
def test_product_is_the_dense_hessian_times_v(ranks, reference, hessian, name):
    """Every rank's shards of ``H v`` (gathered) against the dense float64 Hessian; with
    ``shard=True`` rank 0 takes 2 batches and rank 1 one (and a zero-weight pass); in slices of
    at most 5 samples, rank 0 makes 6 passes and rank 1 four (and two zero-weight ones)."""
    want = hessian @ sw.probe(hessian.shape[0])
    for got in [*check_values(ranks, name), _ok(reference, name)]:
        torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


def test_top_eigenpairs(ranks, reference, hessian):
    evals, evecs = torch.linalg.eigh(hessian)
    want = evals.flip(0)[:sw.K]
    one = _ok(reference, "topk")
    per_rank = check_values(ranks, "topk")
    for got in per_rank:
        assert got["converged"]
        torch.testing.assert_close(got["eigenvalues"], want, rtol=RTOL, atol=0)
        torch.testing.assert_close(got["eigenvalues"], one["eigenvalues"], rtol=RTOL, atol=0)
        for i in range(sw.K):  # the same eigenvector, with the same sign convention
            dense = evecs[:, -1 - i]
            dense = dense * torch.sign(dense[dense.abs().argmax()])
            torch.testing.assert_close(got["vectors"][i], dense, rtol=0, atol=1e-6)
    assert torch.equal(per_rank[0]["vectors"], per_rank[1]["vectors"])


def test_top_eigenpairs_with_the_defaults_start_as_one_process(ranks, reference):
    """``v0="auto"``: the gradient start (gradient shards + the random slice) is one process's
    start vector, so Lanczos takes the same steps; no data-sampling standard error yet."""
    one = _ok(reference, "topk_defaults")
    for got in check_values(ranks, "topk_defaults"):
        assert got["num_iter"] == one["num_iter"]
        torch.testing.assert_close(got["eigenvalues"], one["eigenvalues"], rtol=1e-6, atol=0)
        assert torch.isnan(got["stderr"]).all()


def test_basis_memory_is_split_over_ranks(ranks, reference):
    """Each rank's Krylov basis holds the same rows of its own shards: 44/73 and 29/73 of the
    one-process basis (at most 0.61 of it), and the two add up to it."""
    one = _ok(reference, "topk")
    per_rank = check_values(ranks, "topk")
    locals_ = _local_sizes(2)
    for got, local in zip(per_rank, locals_):
        assert got["basis_bytes"] * 73 == one["basis_bytes"] * local
        assert got["memory_bound_bytes"] * 73 == one["memory_bound_bytes"] * local
        assert got["basis_bytes"] <= 0.61 * one["basis_bytes"]
    assert sum(g["basis_bytes"] for g in per_rank) == one["basis_bytes"]


@pytest.mark.parametrize("name", ["hutchinson", "hutchpp"])
def test_trace_equals_one_process(ranks, reference, name):
    """The same probes on both sides (drawn in chunks on each rank): equal estimates."""
    one = _ok(reference, name)
    for got in check_values(ranks, name):
        assert got["estimate"] == pytest.approx(one["estimate"], rel=RTOL)
        np.testing.assert_allclose(got["samples"], one["samples"], rtol=RTOL, atol=1e-12)
        assert got["low"] == pytest.approx(one["low"], rel=RTOL, abs=1e-12)


def test_hutchpp_over_the_whole_space_is_the_dense_trace(ranks, hessian):
    """A budget of ``3 n``: the sketch (orthonormalized by TSQR over the ranks) spans the whole
    space, so the estimate is ``tr(H)`` up to the products' rounding."""
    for got in check_values(ranks, "hutchpp_exact"):
        assert got["estimate"] == pytest.approx(float(hessian.trace()), rel=RTOL)


def test_density_equals_one_process_and_its_moments(ranks, reference, hessian):
    """Nodes and weights equal one process's; per run, the quadrature's first two moments are
    ``q^T H q`` and ``||H q||^2`` of its Rademacher start ``q = z / sqrt(n)`` (Gauss quadrature
    is exact for them), drawn here as one process draws them."""
    one = _ok(reference, "density")
    n = hessian.shape[0]
    gen = torch.Generator().manual_seed(5)
    starts = [(torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1) / math.sqrt(n)
              for _ in range(one["nodes"].shape[0])]
    for got in check_values(ranks, "density"):
        np.testing.assert_allclose(got["nodes"], one["nodes"], rtol=RTOL, atol=1e-10)
        np.testing.assert_allclose(got["weights"], one["weights"], rtol=RTOL, atol=1e-10)
        for r, q in enumerate(starts):
            m1 = float((got["weights"][r] * got["nodes"][r]).sum())
            m2 = float((got["weights"][r] * got["nodes"][r] ** 2).sum())
            assert m1 == pytest.approx(float(q @ hessian @ q), rel=RTOL)
            assert m2 == pytest.approx(float((hessian @ q).norm() ** 2), rel=RTOL)


def test_double_backward_is_refused(ranks):
    for msg in check_values(ranks, "bad_method"):
        assert msg is not None and "method='double-backward'" in msg
        assert "DTensor" in msg and "finite-difference" in msg


def test_data_that_cannot_run_on_every_rank_is_refused(ranks, reference):
    """Every forward of an FSDP2 model is a collective: a rank without a batch, or ranks whose
    (unsharded) data differ, are refused on every rank, naming the rank."""
    assert _ok(reference, "refused_data") == [None, None]  # one process: nothing to refuse
    for no_batch, differ in check_values(ranks, "refused_data"):
        assert no_batch is not None and "rank 1 got no batch" in no_batch
        assert differ is not None and "differs across ranks: rank 1" in differ


def test_directional_curvature_sums_over_the_ranks(ranks, reference, hessian):
    """The Rayleigh quotient of a sharded direction: both inner products over all ranks (a
    local dot product gave each rank the quotient of its own shard)."""
    d = sw.probe(hessian.shape[0])
    want = float(d @ hessian @ d / (d @ d))
    for got in [*check_values(ranks, "directional"), _ok(reference, "directional")]:
        assert got == pytest.approx(want, rel=RTOL)
