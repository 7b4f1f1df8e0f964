"""PerturbedOptimizer's template step: a subclass fills in only the kernel (and the scale)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam import MSAM, AdamWMSAM, PerturbedOptimizer
from tests.models import classification_data, mlp
from tests.msam.reference import model_grad_fn, msam_reference
from tests.msam.test_msam import assert_history, batches_for, hyper_const, run


class PlainMomentumSAM(PerturbedOptimizer):
    """w~ = w - rho * v with heavy-ball v; only the hooks, the base class's step and shifts."""

    _direction_key = "momentum_buffer"
    _state_keys = ("momentum_buffer",)

    def __init__(self, params, lr, momentum, rho):
        super().__init__(params, dict(lr=lr, momentum=momentum, rho=rho))

    def _needs_norm(self, group):
        return False

    def _group_scale(self, group, norm):
        return float(group["rho"])

    def _update(self, group, step):
        for p, g, v in zip(step.params, step.grads, step.state["momentum_buffer"]):
            if v is None:
                self.state[p]["momentum_buffer"] = v = g.clone()
            else:
                v.mul_(group["momentum"]).add_(g)
            p.add_(v, alpha=-group["lr"])


def test_subclass_with_only_a_kernel_matches_the_reference():
    """The default _directions/_shift (group order, w -> w - c d after the update) and the
    undo with the stored coefficient, against Algorithm 1 written out (normalize=False)."""
    model = mlp()
    batches = batches_for()
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    ref = msam_reference(w0, model_grad_fn(model, batches, F.cross_entropy, params), 12,
                         hyper_const(len(params), rho=0.3, normalize=False))
    opt = PlainMomentumSAM(params, lr=0.1, momentum=0.9, rho=0.3)
    assert_history(run(model, opt, batches), ref)


@pytest.mark.parametrize("make", [
    lambda ps: MSAM(ps, rho=0.5),
    lambda ps: AdamWMSAM(ps, rho=0.5),
], ids=["msam", "adamw-msam"])
def test_sparse_gradient_in_a_later_group_changes_nothing(make):
    """The whole step is collected before anything moves: no state is created for the first
    group's parameters and no weight moves when the second group's gradient is sparse."""
    dense = nn.Linear(3, 2).double()
    emb = nn.Embedding(10, 3, sparse=True).double()
    opt = make([{"params": list(dense.parameters())}, {"params": list(emb.parameters())}])
    x, _ = classification_data(4, 3)
    dense(emb(torch.tensor([1, 2])) + x[:2]).sum().backward()
    before = [p.detach().clone() for p in (*dense.parameters(), *emb.parameters())]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(len(opt.state[p]) == 0 for p in dense.parameters())
    for p, b in zip((*dense.parameters(), *emb.parameters()), before):
        assert torch.equal(p, b)
