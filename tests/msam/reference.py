"""Hand-written float64 references for the msam optimizers (independent of msam's code)."""

from __future__ import annotations

import math

import torch


def _norm(vs):
    return math.sqrt(sum(float((v * v).sum()) for v in vs if v is not None))


def msam_reference(w0, grad_fn, steps, hyper):
    """Algorithm 1 written literally on lists of tensors.

    grad_fn(t, live) -> list of gradients (None = no gradient this step) at the live point.
    hyper(t) -> list (one per parameter) of dicts with lr, momentum, rho, weight_decay,
    normalize, scale_by_lr. Returns [(live_t, w_t)] after each step.
    """
    w = [x.clone() for x in w0]
    v = [None] * len(w)

    def perturbation(t):
        n = _norm(v)
        out = []
        for i, vi in enumerate(v):
            h = hyper(t)[i]
            if vi is None:
                out.append(torch.zeros_like(w[i]))
                continue
            c = h["rho"] * (h["lr"] if h["scale_by_lr"] else 1.0)
            if h["normalize"]:
                c = c / n if n > 0 else 0.0
            out.append(c * vi)
        return out

    eps = perturbation(0)
    history = []
    for t in range(steps):
        live = [wi - ei for wi, ei in zip(w, eps)]
        grads = grad_fn(t, live)
        for i, g in enumerate(grads):
            if g is None:
                continue
            h = hyper(t)[i]
            d = g + h["weight_decay"] * w[i]
            v[i] = d.clone() if v[i] is None else h["momentum"] * v[i] + d
            w[i] = w[i] - h["lr"] * v[i]
        # the next perturbation uses the hyperparameters of the next step
        eps = perturbation(t + 1)
        history.append(([wi - ei for wi, ei in zip(w, eps)], [wi.clone() for wi in w]))
    return history


def nesterov_sutskever(w0, grad_fn, steps, lr, momentum):
    """v = mu v + grad(w - lr mu v); w = w - lr v. Returns [(lookahead_t, w_t)]."""
    w = [x.clone() for x in w0]
    v = [torch.zeros_like(x) for x in w]
    history = []
    for t in range(steps):
        look = [wi - lr * momentum * vi for wi, vi in zip(w, v)]
        grads = grad_fn(t, look)
        v = [momentum * vi + g for vi, g in zip(v, grads)]
        w = [wi - lr * vi for wi, vi in zip(w, v)]
        history.append(([wi - lr * momentum * vi for wi, vi in zip(w, v)], w))
    return history


def adamw_msam_reference(w0, grad_fn, steps, *, lr, betas, eps, weight_decay, rho):
    w = [x.clone() for x in w0]
    m = [None] * len(w)
    s = [None] * len(w)
    k = [0] * len(w)
    b1, b2 = betas
    history = []

    def pert():
        n = _norm(m)
        return [torch.zeros_like(wi) if mi is None or n == 0 else rho * mi / n
                for wi, mi in zip(w, m)]

    e = pert()
    for t in range(steps):
        live = [wi - ei for wi, ei in zip(w, e)]
        grads = grad_fn(t, live)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if m[i] is None:
                m[i], s[i] = torch.zeros_like(g), torch.zeros_like(g)
            k[i] += 1
            w[i] = w[i] * (1 - lr * weight_decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            s[i] = b2 * s[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1 ** k[i])
            shat = s[i] / (1 - b2 ** k[i])
            w[i] = w[i] - lr * mhat / (shat.sqrt() + eps)
        e = pert()
        history.append(([wi - ei for wi, ei in zip(w, e)], [wi.clone() for wi in w]))
    return history


def model_grad_fn(model, batches, loss_fn, params):
    """grad_fn for the references: gradient of loss_fn(model(x_t), y_t) at given values of
    ``params`` (a list of model parameters), via torch.func.functional_call."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]

    def grad_fn(t, values):
        x, y = batches[t % len(batches)]
        vals = [v.detach().requires_grad_(p.requires_grad) for v, p in zip(values, params)]
        out = torch.func.functional_call(model, dict(zip(keys, vals)), (x,))
        loss = loss_fn(out, y)
        wanted = [v for v in vals if v.requires_grad]
        gs = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
        return [next(gs) if v.requires_grad else None for v in vals]

    return grad_fn
