"""Issue 26 item 8: complex parameters are supported (as torch.optim.SGD and AdamW support them).

A complex tensor is treated as the pair of its real and imaginary parts: ``||v||`` is
``sqrt(sum |v_i|^2)``, so every optimizer on a complex parameter equals the same optimizer on
``torch.view_as_real`` of it (the invariance checked here), and MSAM's first steps follow the
hand-written formula; the saved-state move-back works for complex weights too."""

from __future__ import annotations

import pytest
import torch

from msam import MSAM, SAM, AdamWMSAM, unperturbed_parameters


def _grads(steps, shape=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.complex128) for _ in range(steps)]


def _run(make, p, grads, sam):
    opt = make([p])
    for g in grads:
        p.grad = g.clone()
        if sam:
            opt.first_step()
            p.grad = (2 * g).clone()  # "the gradient at the ascent point"
            opt.second_step()
        else:
            opt.step()
    return opt


CASES = {
    "MSAM": (lambda ps: MSAM(ps, lr=0.1, momentum=0.9, rho=0.7, weight_decay=0.01), False),
    "MSAM-foreach": (lambda ps: MSAM(ps, lr=0.1, momentum=0.9, rho=0.7, foreach=True), False),
    "AdamWMSAM": (lambda ps: AdamWMSAM(ps, lr=0.01, rho=0.5, weight_decay=0.1), False),
    "SAM-SGD": (lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_complex_parameter_equals_its_real_view(name):
    make, sam = CASES[name]
    w0 = torch.randn(3, 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    grads = _grads(4)
    pc = torch.nn.Parameter(w0.clone())
    pr = torch.nn.Parameter(torch.view_as_real(w0).clone())
    oc = _run(make, pc, grads, sam)
    orr = _run(make, pr, [torch.view_as_real(g) for g in grads], sam)
    torch.testing.assert_close(torch.view_as_real(pc.detach()), pr.detach(), rtol=1e-12, atol=1e-12)
    if not sam:
        assert oc.is_perturbed
        oc.eval()
        orr.eval()
        torch.testing.assert_close(torch.view_as_real(pc.detach()), pr.detach(), rtol=1e-12, atol=1e-12)


def test_msam_complex_first_steps_follow_the_formula():
    """w~ = w - rho v/||v||, ||v|| = sqrt(sum |v_i|^2), v = mu v + g, w = w - lr v."""
    lr, mu, rho = 0.1, 0.9, 0.7
    w = torch.randn(4, dtype=torch.complex128, generator=torch.Generator().manual_seed(2))
    g1, g2 = _grads(2, shape=(4,), seed=3)
    p = torch.nn.Parameter(w.clone())
    opt = MSAM([p], lr=lr, momentum=mu, rho=rho)
    p.grad = g1.clone()
    opt.step()
    v1 = g1
    w1 = w - lr * v1
    norm1 = torch.sqrt((v1.real ** 2 + v1.imag ** 2).sum())
    torch.testing.assert_close(p.detach(), w1 - rho * v1 / norm1, rtol=1e-13, atol=1e-13)
    p.grad = g2.clone()
    opt.step()
    v2 = mu * v1 + g2
    w2 = w1 - lr * v2
    norm2 = torch.sqrt((v2.abs() ** 2).sum())
    torch.testing.assert_close(p.detach(), w2 - rho * v2 / norm2, rtol=1e-13, atol=1e-13)
    # the saved-state move-back (checkpoint loading) gives w for complex weights too
    back = unperturbed_parameters(opt.state_dict(), [p.detach().clone()])
    torch.testing.assert_close(back[0], w2, rtol=1e-13, atol=1e-13)
    opt.eval()
    torch.testing.assert_close(p.detach(), w2, rtol=1e-13, atol=1e-13)


def test_adaptive_sam_complex_ascent_uses_the_modulus():
    """ASAM: e = rho T^2 g / ||T g||, T = |w| + eta (the modulus of each complex weight)."""
    rho, eta = 0.05, 0.01
    w = torch.randn(5, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    (g,) = _grads(1, shape=(5,), seed=5)
    p = torch.nn.Parameter(w.clone())
    opt = SAM([p], torch.optim.SGD, rho=rho, adaptive=True, eta=eta, lr=0.1)
    p.grad = g.clone()
    opt.first_step()
    t = w.abs() + eta
    e = rho * t ** 2 * g / torch.sqrt(((t * g).abs() ** 2).sum())
    torch.testing.assert_close(p.detach(), w + e, rtol=1e-13, atol=1e-13)
    opt.unperturb()
    assert torch.equal(p.detach(), w)
