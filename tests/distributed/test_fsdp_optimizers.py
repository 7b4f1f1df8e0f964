"""MSAM, AdamW-MSAM, SAM and ASAM on an FSDP2-sharded model (2 gloo ranks, float64).

* 20 steps on 2 ranks (each its half of every global batch of 8) equal one process without
  sharding on the global batches: max abs difference <= 1e-12 (observed ~3e-16);
* ``eval()`` gives the same w as one process, ``train()`` the same w~ again;
* a sharded checkpoint (``model.state_dict()`` / ``optimizer.state_dict()`` of DTensors, one
  file per rank) and a full one (torch.distributed.checkpoint's ``get_state_dict`` with
  ``full_state_dict=True``, taken at the perturbed point) resume exactly;
* the global norm counts every sharded tensor as its full tensor, replicated and plain tensors
  once, with one all-reduce per step; SAM's first pass with gradient sync disabled is refused (the sharded parameters have no
  gradient) instead of silently ascending by zero.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import fsdp_workers as W
from tests.distributed.launcher import check_values, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ATOL = 1e-12  # the bound on the max abs difference after 20 steps


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("fsdp_ckpt")
    out = run_ranks(W.optimizer_checks, 2, (str(ckpt),), deadline=170)
    return [o.value for o in out], ckpt


@pytest.fixture(scope="module")
def references():
    return {name: W.reference(name) for name in W.OPTIMIZERS + W.FOREACH}


def _get(ranks, name):
    return check_values(ranks[0] if isinstance(ranks, tuple) else ranks, name)


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("name", W.OPTIMIZERS + W.FOREACH)
def test_two_sharded_ranks_equal_one_process(ranks, references, name):
    ref = references[name]
    for r, got in enumerate(_get(ranks, name)):
        assert _max_diff(got["live"], ref["live"]) <= ATOL, f"rank {r}"
        last = got.get("train_again", got["live"])
        if "after_save" in got:
            assert _max_diff(got["after_save"], last) == 0.0  # saving moves nothing
        if "eval" in ref:  # the MSAM family: w, then w~ again
            assert _max_diff(got["eval"], ref["eval"]) <= ATOL, f"rank {r} eval()"
            assert _max_diff(got["train_again"], ref["live"]) <= ATOL, f"rank {r} train()"
    # the runs moved the weights, and the perturbed point is not w: nothing compared is trivial
    start = W.full(W.make_model())
    assert _max_diff(ref["live"], start) > 1e-2
    if "eval" in ref:
        assert _max_diff(ref["live"], ref["eval"]) > 1e-3


@pytest.mark.parametrize("kind", ["sharded", "full"])
@pytest.mark.parametrize("name", W.OPTIMIZERS)
def test_checkpoint_resumes_exactly(ranks, references, name, kind):
    ref = references[name]["resumed"]
    for r, got in enumerate(_get(ranks, f"{name}-resume-{kind}")):
        assert _max_diff(got, ref) <= ATOL, f"rank {r}"
    # the resumed model started from other weights: the checkpoint carried everything
    assert _max_diff(W.full(W.make_model(seed=9)), ref) > 1e-2


@pytest.mark.parametrize("name", W.OPTIMIZERS)
def test_full_checkpoint_resumes_on_one_process(ranks, references, name):
    """The full checkpoint written by the 2-rank run, loaded without any process group."""
    _get(ranks, f"{name}-resume-full")
    got = W.resume_full(name, 0, 1, str(ranks[1]))
    assert _max_diff(got, references[name]["resumed"]) <= ATOL


@pytest.fixture(scope="module")
def norm_ranks():
    return [o.value for o in run_ranks(W.norm_and_sync_checks, 2, deadline=120)]


def test_global_norm_counts_each_shard_once(norm_ranks):
    for r, got in enumerate(_get(norm_ranks, "mixed_norm")):
        assert got["types"] == ["Tensor"]  # a plain tensor, not a DTensor
        for foreach in (False, True):
            for key, expected in got["expected"].items():
                torch.testing.assert_close(got[foreach][key], expected, rtol=1e-15, atol=0,
                                           msg=f"rank {r}, {key}, foreach={foreach}")


def test_sam_first_pass_without_gradient_sync_is_refused(norm_ranks):
    for r, got in enumerate(_get(norm_ranks, "sam_without_sync")):
        assert got["error"] is not None, f"rank {r}: first_step() accepted no gradients"
        assert "set_requires_gradient_sync(False)" in got["error"]
        assert not got["moved"]


def test_a_non_finite_shard_on_one_rank_is_refused_by_every_rank(norm_ranks):
    for r, got in enumerate(_get(norm_ranks, "nan_in_one_shard")):
        assert got["error"] is not None and "inf or NaN" in got["error"], f"rank {r}: {got}"
        assert not got["loaded"]  # nothing was loaded, on any rank


def test_the_fingerprint_of_a_sharded_model_is_that_of_its_full_weights(norm_ranks):
    from analysis.distributed import weights_fingerprint

    expected = weights_fingerprint(W.make_model())
    for r, got in enumerate(_get(norm_ranks, "fingerprint")):
        assert torch.equal(got, expected), f"rank {r}"


def test_one_all_reduce_per_step_and_none_to_move_back(norm_ranks):
    """The global norm is the only communication of the optimizers: one all-reduce per step
    (SAM: per first_step) and per train(); eval() moves the local shards only."""
    for r, got in enumerate(_get(norm_ranks, "collectives")):
        assert got["msam"] == got["adamw_msam"] == {"step": 1, "eval": 0, "train": 1}, r
        assert got["sam"] == {"step": 1}, r
