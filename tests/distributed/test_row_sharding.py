"""``slice_2d(..., shard_rows=True)``: grid rows split across 2 gloo ranks (float64, CPU).

Every rank holds the full data; the row-sharded grid must equal the one-process grid, rank 0
alone writes the store, a run resumed from a store holding only the first rows (as after an
interruption) equals the uninterrupted grid, and sharded data is refused with a clear error.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from analysis.data import as_data
from landscape import slice_2d
from tests.distributed import row_workers as W
from tests.distributed.launcher import check_values, run_ranks

RTOL = 1e-12
DONE_ROWS = 2  # rows the "interrupted" store holds


def _interrupt(full: str, partial: str, rows_done: int) -> None:
    """Copy the finished store ``full`` to ``partial`` keeping only its first ``rows_done`` rows
    (the later rows NaN and not done), as an interrupted run leaves it."""
    with np.load(full, allow_pickle=False) as z:
        arrays = {k: np.array(z[k]) for k in z.files}
    arrays["done"][rows_done:] = False
    for m in ("loss", "accuracy"):
        arrays[m][rows_done:] = np.nan
    np.savez(partial, **arrays)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: the grid, and the store of an interrupted run in ``store_dir``."""
    model, x, y, d1, d2 = W.problem()
    ref = W.grid(model, x, y, d1, d2)
    store_dir = tmp_path_factory.mktemp("rows")
    full = str(tmp_path_factory.mktemp("full") / "full.npz")
    W.grid(model, x, y, d1, d2, store=full)
    _interrupt(full, os.path.join(store_dir, "partial.npz"), DONE_ROWS)
    return ref, str(store_dir)


@pytest.fixture(scope="module")
def ranks(reference):
    _, store_dir = reference
    out = run_ranks(W.row_sharded_values, 2, (store_dir,), deadline=120)
    return [o.value for o in out]


def _get(ranks, name):
    return check_values(ranks, name)


def _same(ref, got):
    np.testing.assert_allclose(got["loss"], ref.loss, rtol=RTOL, atol=0)
    np.testing.assert_allclose(got["accuracy"], ref.accuracy, rtol=RTOL, atol=0)
    assert got["loss_at_origin"] == pytest.approx(ref.loss_at_origin, rel=RTOL)
    assert got["num_samples"] == ref.num_samples == 50


# ------------------------------------------------------------------------- one process
def test_one_process_shard_rows_is_a_no_op():
    model, x, y, d1, d2 = W.problem()
    a = W.grid(model, x, y, d1, d2)
    b = W.grid(model, x, y, d1, d2, shard_rows=True)
    np.testing.assert_array_equal(b.loss, a.loss)
    np.testing.assert_array_equal(b.accuracy, a.accuracy)
    assert np.all(np.isfinite(a.loss)) and a.loss.shape == (len(W.XS), len(W.YS))


def test_sharded_data_with_shard_rows_raises():
    model, x, y, d1, d2 = W.problem()
    with pytest.raises(ValueError, match="shard_rows=True .* data source is sharded"):
        slice_2d(model, "cross_entropy", as_data((x, y), shard=True), d1, d2, W.XS, W.YS,
                 progress=False, shard_rows=True)


# ------------------------------------------------------------------------- 2 ranks
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_row_sharded_grid_equals_one_process(ranks, reference):
    ref, _ = reference
    got = _get(ranks, "plain")
    for g in got:
        _same(ref, g)
        assert g["resumed_rows"] == 0
    # the rows were split: rank 0 computed rows 0, 2, 4 and rank 1 rows 1, 3 (3 points each,
    # one forward per point on one full batch), plus the origin and the two forwards of the
    # first-batch check (analysis.checks) on each rank
    assert [g["forwards"] for g in got] == [3 + 3 * len(W.YS), 3 + 2 * len(W.YS)]
    assert all(ok for ok in _get(ranks, "restored"))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rank0_writes_the_store(ranks, reference):
    ref, store_dir = reference
    got = _get(ranks, "fresh_store")
    for g in got:
        _same(ref, g)
        assert g["store"] == os.path.join(store_dir, "fresh.npz")
    # one file, no temporary leftovers, holding every row of the one-process grid
    assert "fresh.npz" in got[0]["files"]
    assert not [f for f in got[0]["files"] if f.endswith(".tmp")]
    with np.load(os.path.join(store_dir, "fresh.npz")) as z:
        assert z["done"].all()
        np.testing.assert_allclose(z["loss"], ref.loss, rtol=RTOL, atol=0)
        np.testing.assert_allclose(z["accuracy"], ref.accuracy, rtol=RTOL, atol=0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_resume_after_interruption_equals_uninterrupted(ranks, reference):
    ref, store_dir = reference
    got = _get(ranks, "resumed")
    pending = len(W.XS) - DONE_ROWS  # rows 2, 3, 4: pending[0], [2] on rank 0, [1] on rank 1
    for g in got:
        _same(ref, g)  # the NaN rows of the interrupted store were recomputed
        assert g["resumed_rows"] == DONE_ROWS
    assert [g["forwards"] for g in got] == [3 + 2 * len(W.YS), 3 + (pending - 2) * len(W.YS)]
    with np.load(os.path.join(store_dir, "partial.npz")) as z:
        assert z["done"].all()
        np.testing.assert_allclose(z["loss"], ref.loss, rtol=RTOL, atol=0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sharded_data_raises_on_every_rank(ranks):
    for msg in _get(ranks, "sharded_data"):
        assert msg is not None, "shard_rows=True with sharded data did not raise"
        assert "data source is sharded" in msg


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_different_inputs_across_ranks_raise_on_every_rank(ranks, reference):
    _, store_dir = reference
    for msg in _get(ranks, "differing_ranks"):
        assert msg is not None, "different d2 on the ranks was not detected"
        assert "differ across ranks" in msg
    assert not os.path.exists(os.path.join(store_dir, "differ.npz"))  # nothing written
