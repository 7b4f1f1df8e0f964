"""landscape.train_step against hand-written steps (the loops it replaced)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import train_step
from msam import MSAM, NAG, SAM, frozen_batchnorm_stats


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _hand_sam(model, opt, x, y):
    """The two SAM passes as the demo and the reproduction wrote them before train_step."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    with frozen_batchnorm_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss


def _hand_plain(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
FACTORIES = {
    "sgd": (lambda p: torch.optim.SGD(p, **KW), _hand_plain),
    "nag": (lambda p: NAG(p, **KW), _hand_plain),
    "msam": (lambda p: MSAM(p, rho=0.7, **KW), _hand_plain),
    "sam": (lambda p: SAM(p, torch.optim.SGD, rho=0.05, **KW), _hand_sam),
    "asam": (lambda p: SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, **KW), _hand_sam),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_train_step_is_the_hand_written_step(name):
    """Bit-identical weights, BatchNorm statistics, optimizer state and losses over 4 steps."""
    make, hand = FACTORIES[name]
    a, b = _model(), _model()
    opt_a, opt_b = make(a.parameters()), make(b.parameters())
    for x, y in _batches():
        la = train_step(a, opt_a, F.cross_entropy, x, y)
        lb = hand(b, opt_b, x, y)
        assert torch.equal(la.detach(), lb.detach())
        for p, q in zip(_state(a), _state(b)):
            assert torch.equal(p, q)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        for key, v in sa[k].items():
            if torch.is_tensor(v):
                assert torch.equal(v, sb[k][key]), (k, key)


def test_sam_second_pass_does_not_move_batchnorm_statistics():
    """Only the first pass (at w) updates the running statistics: one BN update per step."""
    model = _model()
    opt = FACTORIES["sam"][0](model.parameters())
    ref = copy.deepcopy(model)
    x, y = _batches(1)[0]
    train_step(model, opt, F.cross_entropy, x, y)
    ref.train()
    ref(x)  # one forward at the same w: the statistics a single update gives
    bn, bn_ref = model[1], ref[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sam", "sgd", "msam"])
def test_on_gradient_sees_the_first_gradient_once(name):
    """on_gradient runs once per step, after the first backward, before any weight moves:
    ``.grad`` is then the batch gradient at the weights the step started from."""
    make, _ = FACTORIES[name]
    model = _model()
    opt = make(model.parameters())
    batches = _batches(3)
    for x, y in batches[:2]:
        train_step(model, opt, F.cross_entropy, x, y)
    x, y = batches[2]
    before = [p.detach().clone() for p in model.parameters()]
    ref = copy.deepcopy(model)
    expected = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    seen = []

    def probe():
        seen.append(([p.detach().clone() for p in model.parameters()],
                     [p.grad.clone() for p in model.parameters()]))

    train_step(model, opt, F.cross_entropy, x, y, on_gradient=probe)
    assert len(seen) == 1
    weights, grads = seen[0]
    for w, w0 in zip(weights, before):
        assert torch.equal(w, w0)  # nothing moved yet
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    assert any(not torch.equal(p, w0) for p, w0 in zip(model.parameters(), before))


def test_train_step_zeroes_stale_gradients():
    """A gradient left over from outside the loop is not accumulated into the step."""
    a, b = _model(), _model()
    opt_a, opt_b = FACTORIES["sam"][0](a.parameters()), FACTORIES["sam"][0](b.parameters())
    for p in a.parameters():
        p.grad = torch.full_like(p, 123.0)
    x, y = _batches(1)[0]
    train_step(a, opt_a, F.cross_entropy, x, y)
    train_step(b, opt_b, F.cross_entropy, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
