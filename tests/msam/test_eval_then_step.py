"""step() after eval(): the documented behaviour (no warning, no error).

``eval()`` puts the parameters at ``w``; a forward/backward there gives the gradient at ``w``,
and ``step()`` takes it as such: one update of the base optimizer from ``w`` with that gradient,
then the parameters are perturbed again (``is_perturbed`` True, at the new ``w~``), so training
simply continues. The references are the update written out by hand (MSAM) and
``torch.optim.AdamW`` loaded with the same state (AdamW-MSAM).
"""

import copy

import torch
import torch.nn.functional as F

from msam import MSAM, AdamWMSAM
from tests.models import classification_data, mlp


def _trained(opt_cls, **kw):
    model = mlp()
    opt = opt_cls(model.parameters(), **kw)
    x, y = classification_data()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


def test_msam_step_after_eval_is_one_update_from_w_with_the_gradient_at_w():
    lr, mu, rho, wd = 0.1, 0.9, 0.5, 1e-3
    model, opt, x, y = _trained(MSAM, lr=lr, momentum=mu, rho=rho, weight_decay=wd)
    opt.eval()
    w = [p.detach().clone() for p in model.parameters()]
    v = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # at w
    g = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert opt.is_perturbed  # back to perturbed training, as documented
    v_new = [mu * vi + gi + wd * wi for vi, gi, wi in zip(v, g, w)]
    w_new = [wi - lr * vi for wi, vi in zip(w, v_new)]
    norm = torch.sqrt(sum(vi.pow(2).sum() for vi in v_new))
    for p, wi, vi in zip(model.parameters(), w_new, v_new):
        torch.testing.assert_close(p.detach(), wi - rho * vi / norm, rtol=1e-12, atol=1e-12)
    with opt.unperturbed():
        for p, wi in zip(model.parameters(), w_new):
            torch.testing.assert_close(p.detach(), wi, rtol=1e-12, atol=1e-12)


def test_adamw_msam_step_after_eval_is_an_adamw_step_from_w():
    model, opt, x, y = _trained(AdamWMSAM, lr=1e-2, rho=0.3, weight_decay=1e-2)
    opt.eval()
    twin = copy.deepcopy(model)  # at w
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False)
    sd = copy.deepcopy(opt.state_dict())  # loading would share the moment tensors
    sd.pop("perturbed")
    ref.load_state_dict(sd)
    for m, o in ((model, opt), (twin, ref)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    assert opt.is_perturbed
    with opt.unperturbed():
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
