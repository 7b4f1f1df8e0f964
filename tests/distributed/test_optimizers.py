"""MSAM, AdamW-MSAM and SAM under DistributedDataParallel (2 gloo ranks, float64).

* DDP with 2 ranks x batch b equals one process with batch 2b after 5 steps;
* one all-reduce per step (DDP's gradient bucket) as plain SGD, and none inside ``step()``:
  the momentum is identical on every rank, so the global norm ||v|| needs no communication;
* ``eval()``/``train()`` work on every rank, and a checkpoint saved by the last rank resumes
  exactly on one process;
* SAM: the ascent inside ``no_sync`` (per-rank m-sharpness) equals a hand-written per-rank
  SAM; with ``all_reduce_gradients`` before ``first_step`` it equals global-batch SAM.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import workers
from tests.distributed.launcher import run_ranks
from tests.models import mlp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MSAM_FAMILY = ["sgd", "msam", "adamw_msam"]
RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    out = run_ranks(workers.optimizer_checks, 2, (str(ckpt),), deadline=170)
    return [o.value for o in out], ckpt


def _get(ranks, name):
    values, _ = ranks
    per_rank = []
    for r, checks in enumerate(values):
        status, value = checks[name]
        if status == "missing":
            pytest.skip(f"{name}: not available ({value})")
        assert status == "ok", f"rank {r}, check {name}:\n{value}"
        per_rank.append(value)
    return per_rank


def _close(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("name", MSAM_FAMILY)
def test_two_ranks_equal_one_process_with_the_double_batch(ranks, name):
    per_rank = _get(ranks, name)
    ref = workers.train_run(name)  # one process, global batch, no DDP
    for r, got in enumerate(per_rank):
        _close(got["live"], ref["live"], f"rank {r} live parameters")
        if "eval" in ref:
            _close(got["eval"], ref["eval"], f"rank {r} eval() parameters")
            _close(got["train_again"], got["live"], f"rank {r} train() after eval()")
    # the perturbed point differs from w: the comparison above is not vacuous
    if name != "sgd":
        assert not torch.allclose(ref["live"][0], ref["eval"][0])


@pytest.mark.parametrize("name", MSAM_FAMILY)
def test_one_all_reduce_per_step_and_none_inside_step(ranks, name):
    per_rank = _get(ranks, name)
    sgd = _get(ranks, "sgd")
    for r, got in enumerate(per_rank):
        # DDP's gradient all-reduce: one bucket per backward for this model, as for SGD
        assert got["hook_calls"] == workers.STEPS == sgd[r]["hook_calls"]
        # the global norm ||v|| is computed from replicated state: no collective in step()
        assert got["step_collectives"] == 0


@pytest.mark.parametrize("name", MSAM_FAMILY)
def test_optimizer_state_is_identical_on_every_rank(ranks, name):
    a, b = _get(ranks, name)
    assert torch.equal(a["buffer"], b["buffer"])  # bit for bit, so ||v|| is too
    assert a["buffer"].abs().sum() > 0


@pytest.mark.parametrize("name", ["msam", "adamw_msam"])
def test_checkpoint_from_the_last_rank_resumes_on_one_process(ranks, name):
    _get(ranks, name)
    _, ckpt = ranks
    resumed = workers.continue_from_checkpoint(name, str(ckpt / f"{name}.pt"))
    _close(resumed, workers.continue_in_place(name), "resumed eval() parameters")


def test_sam_per_rank_ascent_inside_no_sync(ranks):
    per_rank = _get(ranks, "sam")
    ref = workers.sam_reference(sync=False)
    for r, got in enumerate(per_rank):
        _close(got["live"], ref, f"rank {r} parameters")
        assert got["hook_calls"] == workers.STEPS  # only the descent pass is all-reduced


def test_sam_synchronized_ascent(ranks):
    per_rank = _get(ranks, "sam_sync")
    ref = workers.sam_reference(sync=True)
    for r, got in enumerate(per_rank):
        _close(got["live"], ref, f"rank {r} parameters")
    # per-rank and synchronized ascents really differ on this problem
    assert not torch.allclose(ref[0], workers.sam_reference(sync=False)[0], rtol=1e-6)
    # and the synchronized one is SAM on the global batch (one process, batch 2b)
    _close(workers.sam_reference(sync=True, world=1), ref, "global-batch SAM")


def test_sam_under_ddp_equals_the_single_process_sam(ranks):
    """First pass inside ``no_sync`` (DDP does not all-reduce it), ``all_reduce_gradients``
    before ``first_step``: SAM on 2 ranks is ``msam.sam.SAM`` itself on one process with the
    global batch, not only the hand-written reference above."""
    per_rank = _get(ranks, "sam_sync")
    one = workers.train_run("sam_sync")  # world 1: no DDP, all_reduce_gradients a no-op
    for r, got in enumerate(per_rank):
        diff = max(float((a - b).abs().max()) for a, b in zip(got["live"], one["live"]))
        assert diff <= 1e-12, f"rank {r}: {diff}"
        assert got["hook_calls"] == workers.STEPS  # DDP reduced the second pass only
    start = [p.detach() for p in mlp(seed=2).parameters()]  # train_run's initial weights
    assert max(float((a - b).abs().max()) for a, b in zip(one["live"], start)) > 1e-2
