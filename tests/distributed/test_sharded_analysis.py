"""Sharded analysis on 2 gloo ranks equals one process on the same full dataset (float64).

The data (50 samples in 7 batches of 8, the last of 2) are split by ``as_data(..., shard=True)``:
batch ``i`` goes to rank ``i % 2`` (26 and 24 samples). Every consumer all-reduces its weighted
sums and the sample count; the reference is the same code on one process without a process group.
Curvature: one all-reduce per matvec, and the Lanczos basis stays replicated bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tests.distributed import workers
from tests.distributed.launcher import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RTOL = 1e-8  # the tolerance; observed differences are ~1e-15 (summation order)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    out = run_ranks(workers.analysis_values, 2, (str(store),), deadline=220)
    return [o.value for o in out]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return workers.analysis_values(0, 1, str(tmp_path_factory.mktemp("store1")))


def _get(ranks, reference, name):
    status, ref = reference[name]
    if status == "missing":
        pytest.skip(f"{name}: not available ({ref})")
    assert status == "ok", f"one process, check {name}:\n{ref}"
    per_rank = []
    for r, checks in enumerate(ranks):
        status, value = checks[name]
        assert status == "ok", f"rank {r}, check {name}:\n{value}"
        per_rank.append(value)
    return ref, per_rank


def _close(a, b, what, rtol=RTOL):
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        da, db = dataclasses.asdict(a), dataclasses.asdict(b)
        if "unit_terms" in da:  # per-unit rows come gathered rank by rank: the same set of units
            for d in (da, db):
                d["units_sorted"] = sorted(zip(d.pop("unit_terms"), d.pop("unit_values")))
        _close(da, db, what, rtol)
    elif isinstance(a, dict):
        for k in a:
            _close(a[k], b[k], f"{what}.{k}", rtol)
    elif isinstance(a, torch.Tensor) and a.is_floating_point():
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-12, msg=lambda m: f"{what}: {m}")
    elif isinstance(a, np.ndarray):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-12, err_msg=what)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{what}: {b!r} is not nan"
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=rtol, abs=1e-12), what
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{what}[{i}]", rtol)
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def test_evaluate(ranks, reference):
    ref, per_rank = _get(ranks, reference, "evaluate")
    assert ref["num_samples"] == workers.N_SAMPLES
    for got in per_rank:
        _close(ref, got, "evaluate")


def test_hvp_one_all_reduce_per_matvec(ranks, reference):
    ref, per_rank = _get(ranks, reference, "hvp")
    for got in per_rank:
        _close(ref["hv"], got["hv"], "H v")
        assert got["num_samples"] == workers.N_SAMPLES
        assert got["collectives"] == 3  # three matvecs, one all-reduce each
        assert got["repeat"]
    assert ref["collectives"] == 0


def test_hvp_with_a_distributed_sampler_loader(ranks, reference):
    ref, per_rank = _get(ranks, reference, "hvp_loader")
    hvp, _ = _get(ranks, reference, "hvp")
    _close(hvp["hv"], ref["hv"], "loader vs tensor pair")  # the loader path itself is right
    for got in per_rank:
        _close(ref["hv"], got["hv"], "H v (DistributedSampler)")
        assert got["collectives"] == 1  # after the first pass has counted N


def test_top5_eigenvalues(ranks, reference):
    from analysis.reference import dense_hessian

    ref, per_rank = _get(ranks, reference, "eig")
    model, x, y = workers.classification_problem()
    exact = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", (x, y))).flip(0)[:5]
    torch.testing.assert_close(ref["eigenvalues"], exact, rtol=1e-8, atol=1e-12)
    for got in per_rank:
        assert got["converged"]
        _close(ref["eigenvalues"], got["eigenvalues"], "eigenvalues")
        # same seed, same start vector: the Ritz vectors agree with one process up to rounding
        _close(ref["eigenvectors"], got["eigenvectors"], "eigenvectors", rtol=1e-6)
        # the data-sampling SEs (k products in one pass, gathered per unit) equal one process's
        _close(ref["data_stderr"], got["data_stderr"], "eigenvalue data SEs")
        # Lanczos: one all-reduce per matvec, plus at most one for the gradient of the v0="auto"
        # start, and one for the SE's k products (one pass, one gather of the units' forms)
        lanczos = got["num_matvecs"] - got["stderr_matvecs"]
        assert got["stderr_matvecs"] == 5
        assert lanczos <= got["collectives"] <= lanczos + 2, got
    # the Lanczos basis is replicated: both ranks hold the same vectors bit for bit
    assert torch.equal(per_rank[0]["eigenvectors"], per_rank[1]["eigenvectors"])


def test_trace_with_the_same_probes(ranks, reference):
    ref, per_rank = _get(ranks, reference, "trace")
    for got in per_rank:
        for method in ref:
            _close(ref[method]["result"], got[method]["result"], f"trace {method}")
            # the probes are replicated (same seed): one all-reduce per pass over the data (a
            # block of probes is one pass), nothing else
            assert 0 < got[method]["collectives"] <= got[method]["matvecs"], (method, got[method])


def test_cached_graph_block_is_one_all_reduce(ranks, reference):
    """``op @ V`` through the cached graph loops the columns inside each batch: one pass over
    the data and one all-reduce for the block of 4 (it was one per column)."""
    ref, per_rank = _get(ranks, reference, "cached_block")
    assert ref["collectives"] == 0
    for got in per_rank:
        _close(ref["hv"], got["hv"], "H V (cached graph)")
        assert got["matvecs"] == 4 and got["collectives"] == 1, got


def test_spectral_density(ranks, reference):
    ref, per_rank = _get(ranks, reference, "density")
    for got in per_rank:
        _close(ref, got, "density")


def test_worst_case_sharpness(ranks, reference):
    ref, per_rank = _get(ranks, reference, "sharpness_worst")
    assert ref["num_batches"] == 6 and ref["value"] > 0
    for got in per_rank:
        _close(ref, got, "worst-case sharpness")


@pytest.mark.parametrize("name", ["sharpness_average", "sharpness_worst_random"])
def test_random_sharpness(ranks, reference, name):
    ref, per_rank = _get(ranks, reference, name)
    for got in per_rank:
        _close(ref, got, name)


def test_fewer_batches_than_ranks():
    out = run_ranks(workers.one_batch_values, 2, collective_timeout=20, deadline=90, check=False)
    errors = [f"rank {o.rank}:\n{o.error}" for o in out if o.error]
    assert not errors, "\n".join(errors)
    ref = workers.one_batch_values(0, 1)
    for o in out:
        _close(ref, o.value, f"rank {o.rank}, one batch on two ranks")


@pytest.mark.parametrize("name", ["directional", "epsilon"])
def test_full_data_sharpness(ranks, reference, name):
    ref, per_rank = _get(ranks, reference, name)
    skip = {"num_samples", "forward_passes", "backward_passes", "forward_samples",
            "backward_samples"}  # per-rank counts (see test_sharded_sample_counts)
    for got in per_rank:
        _close({k: v for k, v in ref.items() if k not in skip},
               {k: v for k, v in got.items() if k not in skip}, name)


@pytest.mark.parametrize("name", ["directional", "epsilon"])
def test_sharded_sample_counts(ranks, reference, name):
    _, per_rank = _get(ranks, reference, name)
    for got in per_rank:
        assert got["num_samples"] == workers.N_SAMPLES


@pytest.mark.parametrize("name", ["slice_1d", "slice_2d"])
def test_slices(ranks, reference, name):
    ref, per_rank = _get(ranks, reference, name)
    for got in per_rank:
        _close({k: v for k, v in ref.items() if k != "collectives"},
               {k: v for k, v in got.items() if k != "collectives"}, name)
    if name == "slice_2d":
        # origin + 4 rows (one all-reduce per row, not per point) + the sample count
        assert per_rank[0]["collectives"] == 6


def test_slice_2d_store_written_by_rank_zero(ranks, reference):
    ref, per_rank = _get(ranks, reference, "slice_2d_store")
    for got in per_rank:
        _close(ref["loss"], got["loss"], "stored grid")
        _close(ref["loss"], got["again"], "resumed grid")
        assert got["resumed_rows"] == 2
