"""The "perturbed" flag survives state-dict converters that keep only "state" and
"param_groups" (torch.distributed.checkpoint's get_state_dict, for FSDP2 models): each saved
group carries it. Without it such a checkpoint taken at w~ was resumed as if at w, and train()
perturbed the saved w~ once more (off by 0.14 after 20 FSDP2 steps,
tests/distributed/test_fsdp_optimizers.py)."""

from __future__ import annotations

import pytest
import torch

from tests.models import mlp
from tests.msam.test_saved_state import MAKERS
from tests.msam.test_saved_state import trained as _trained

KINDS = ["MSAM", "AdamWMSAM"]


def _converted(sd):
    """What a converter keeps: the state and the groups, nothing else."""
    return {"state": sd["state"], "param_groups": sd["param_groups"]}


@pytest.mark.parametrize("at_w", [False, True], ids=["saved-at-w~", "saved-at-w"])
@pytest.mark.parametrize("kind", KINDS)
def test_flag_kept_in_groups_and_resume_gives_the_same_w(kind, at_w):
    model, opt = _trained(kind)
    if at_w:
        opt.eval()
    sd = opt.state_dict()
    assert [g["perturbed"] for g in sd["param_groups"]] == [not at_w] * len(sd["param_groups"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    expected_w = [p.detach().clone() for p in model.parameters()]

    fresh = mlp(seed=5)
    fresh.load_state_dict(weights)
    fresh_opt = MAKERS[kind](fresh)
    fresh_opt.load_state_dict(_converted(sd))
    assert fresh_opt.is_perturbed is (not at_w)
    assert "perturbed" not in fresh_opt.param_groups[0]  # the flag is not a hyperparameter
    fresh_opt.eval()
    for a, b in zip(fresh.parameters(), expected_w):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-15)


def test_top_level_flag_wins_and_groups_that_disagree_are_refused():
    model, opt = _trained("MSAM")
    sd = opt.state_dict()  # two groups
    assert sd["perturbed"] is True
    bad = _converted(sd)
    bad["param_groups"] = [dict(g) for g in sd["param_groups"]]
    bad["param_groups"][1]["perturbed"] = False
    fresh = MAKERS["MSAM"](mlp())
    with pytest.raises(ValueError, match="disagree on 'perturbed'"):
        fresh.load_state_dict(bad)
    bad["param_groups"][1]["perturbed"] = "yes"
    with pytest.raises(ValueError, match="group 1: 'perturbed'"):
        fresh.load_state_dict(bad)
    bad["param_groups"][1]["perturbed"] = False
    fresh.load_state_dict({**bad, "perturbed": True})  # the top-level flag wins
    assert fresh.is_perturbed
