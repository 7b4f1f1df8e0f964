"""AdamW-MSAM: Momentum-SAM on top of AdamW (Becker et al. 2024, arXiv:2401.12033)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from msam._checks import ArgumentTypeError, check_foreach, check_real
from msam._perturbation import GroupStep, PerturbedOptimizer, Scale, group_by_device_dtype


def _scalar_dtype() -> torch.dtype:
    # torch.optim's choice for the "step" counter
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class AdamWMSAM(PerturbedOptimizer):
    r"""AdamW with the Momentum-SAM perturbation along the raw first moment.

    The parameters live at ``w~ = w - rho * m / ||m||`` between steps, ``m`` the raw (not
    bias-corrected) first moment ``state[p]["exp_avg"]`` and ``||m||`` its global L2 norm over
    every parameter of every group (``m = 0`` gives no perturbation). With the gradient ``g``
    taken at ``w~``, ``step()`` does::

        w   = w~ + rho_old * m_old / ||m_old||      (stored coefficient)
        t   = t + 1
        w   = w * (1 - lr * weight_decay)           (decoupled decay on the UNPERTURBED w)
        m   = beta1 * m + (1 - beta1) * g
        s   = beta2 * s + (1 - beta2) * g * g
        w   = w - lr / (1 - beta1^t) * m / (sqrt(s) / sqrt(1 - beta2^t) + eps)
        w~  = w - rho * m / ||m||

    The state keys (``step``, ``exp_avg``, ``exp_avg_sq``) and the arithmetic are
    torch.optim.AdamW's, so ``rho=0`` reproduces ``torch.optim.AdamW`` (amsgrad=False) bit for
    bit. ``eval()``/``train()``/``unperturbed()``/``is_perturbed`` and the state dict's
    ``"perturbed"`` flag work as for :class:`msam.MSAM`; ``rho`` may differ per group.
    ``step()`` after ``eval()`` (no warning) takes the gradient as taken at ``w``: one plain
    AdamW step from ``w``, ending at the new ``w~`` (perturbed again); call
    ``optimizer.train()`` before the forward/backward to take it at ``w~``. FSDP2-sharded
    models work unchanged (``||m||`` over the full tensors; docs/guides/distributed.md,
    "MSAM, AdamW-MSAM and SAM on FSDP2").

    Complex parameters are supported as torch.optim supports them: a complex tensor counts as
    the pair of its real and imaginary parts (``||v||^2 = sum |v_i|^2``; the update equals the
    same optimizer on ``torch.view_as_real`` of it).

    Args:
        params: iterable of parameters or of parameter-group dicts.
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2)``, each in [0, 1) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2).
        rho: perturbation radius (default 1.0, the authors' default; any finite value).
        foreach: use the torch._foreach path; None picks it on accelerators.

    Raises:
        ValueError: lr < 0, betas outside [0, 1), eps < 0, weight_decay < 0, non-finite rho;
            also from ``step()``/``train()`` when a group's hyperparameters were set so
            afterwards (checked before the weights move).
        TypeError: betas not a pair, foreach not None/True/False, a hyperparameter that is
            not a real number.
        RuntimeError: from ``step()`` when a gradient is sparse.
    """

    _direction_key = "exp_avg"
    _state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, rho: float = 1.0, *,
                 foreach: bool | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho,
                        foreach=foreach)
        self._validate_group(defaults)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_real("learning rate", group["lr"], low=0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ArgumentTypeError(f"Invalid betas: {betas!r} (expected a pair)")
        check_real("beta parameter at index 0", betas[0], low=0.0, high=1.0, high_open=True)
        check_real("beta parameter at index 1", betas[1], low=0.0, high=1.0, high_open=True)
        check_real("epsilon value", group["eps"], low=0.0)
        check_real("weight_decay value", group["weight_decay"], low=0.0)
        check_real("rho", group["rho"])
        check_foreach(group.get("foreach"))

    def _needs_norm(self, group: dict[str, Any]) -> bool:
        return float(group["rho"]) != 0.0

    def _group_scale(self, group: dict[str, Any], norm: Tensor | None) -> Scale:
        rho = float(group["rho"])
        if rho == 0.0 or norm is None:
            return 0.0
        return torch.where(norm > 0, rho / norm, torch.zeros_like(norm))

    def _init_state(self, step: GroupStep) -> None:
        """torch.optim.AdamW's lazy state: step 0 and zero moments."""
        for i, p in enumerate(step.params):
            if step.state["exp_avg"][i] is None:
                state = self.state[p]
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for key in self._state_keys:
                    step.state[key][i] = state[key]

    def _update(self, group: dict[str, Any], step: GroupStep) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        kernel = _adamw_foreach if step.foreach else _adamw_single
        # complex tensors as (real, imaginary) pairs, as torch.optim.AdamW does (in-place views)
        kernel(_real(step.params), _real(step.grads), _real(step.state["exp_avg"]),
               _real(step.state["exp_avg_sq"]),
               step.state["step"], beta1=beta1, beta2=beta2, lr=float(group["lr"]),
               weight_decay=float(group["weight_decay"]), eps=float(group["eps"]))


def _real(tensors):
    """``torch.view_as_real`` of the complex tensors (views: updating them updates the originals)."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _adamw_single(params, grads, exp_avgs, exp_avg_sqs, steps, *, beta1, beta2, lr,
                  weight_decay, eps) -> None:
    """torch.optim.AdamW's single-tensor update (amsgrad=False, capturable=False)."""
    for p, g, m, s, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t += 1
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        s.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (s.sqrt() / bias_correction2**0.5).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, beta1, beta2, lr,
                   weight_decay, eps) -> None:
    """torch.optim.AdamW's multi-tensor update (amsgrad=False, capturable=False)."""
    if not params:
        return
    for ps, gs, ms, ss, ts in group_by_device_dtype(params, grads, exp_avgs, exp_avg_sqs,
                                                    steps).values():
        if ts[0].is_cpu:
            torch._foreach_add_(ts, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(ts, 1)
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(ss, beta2)
        torch._foreach_addcmul_(ss, gs, gs, 1 - beta2)
        bias_correction1 = [1 - beta1 ** t.item() for t in ts]
        bias_correction2 = [1 - beta2 ** t.item() for t in ts]
        step_size = [(lr / bc) * -1 for bc in bias_correction1]
        bias_correction2_sqrt = [bc**0.5 for bc in bias_correction2]
        denom = torch._foreach_sqrt(ss)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, step_size)
