"""MSAM: Momentum-SAM for SGD with momentum, and the ablation ladder down to Nesterov momentum.

Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead", arXiv:2401.12033 (2024), Algorithm 1 and appendix A.2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from msam._checks import check_bool, check_foreach, check_real
from msam._perturbation import GroupStep, PerturbedOptimizer, Scale, group_by_device_dtype, shift_


class MSAM(PerturbedOptimizer):
    r"""Momentum-SAM on top of SGD with (heavy-ball) momentum, paper Algorithm 1.

    The parameters live at the perturbed point ``w~ = w - eps`` between steps, with::

        eps = rho * v / ||v||          (normalize=True,  scale_by_lr=False; the default MSAM)
        eps = rho * v                  (normalize=False, scale_by_lr=False)
        eps = rho * lr * v / ||v||     (normalize=True,  scale_by_lr=True)
        eps = rho * lr * v             (normalize=False, scale_by_lr=True)

    ``||v||`` is the global L2 norm over every parameter of every group; ``v = 0`` (the start)
    gives ``eps = 0``. The gradient ``g`` of the user's forward/backward is taken at ``w~``, then
    ``step()`` does::

        w     = w~ + eps_old                    # with the STORED eps coefficient
        v     = momentum * v + g + weight_decay * w
        w     = w - lr * v
        w~    = w - eps_new

    ``v`` is ``state[p]["momentum_buffer"]`` with exactly torch.optim.SGD's meaning (no
    dampening), so ``rho=0`` reproduces ``torch.optim.SGD(lr, momentum, weight_decay=wd)``
    bit for bit, and ``normalize=False, scale_by_lr=True, rho=momentum`` is Nesterov momentum in
    Sutskever's form (gradient at ``w - lr * momentum * v``), see :class:`NAG`.

    Differences from the authors' code: weight decay is an L2 term on the UNPERTURBED weights
    ``w`` (theirs adds it at ``w~``); the applied coefficient is stored in
    ``group["perturbation_scale"]``, so changing ``rho`` or ``lr`` between steps never leaves a
    residual (theirs moves back with the current ``rho``); several parameter groups are allowed.
    ``rho`` may differ per group (the norm stays global) and may be negative (the paper's
    signed-rho sweep; negative ``rho`` moves along ``+v``).

    Evaluate and save inference weights at ``w``: call ``optimizer.eval()`` (or use
    ``with optimizer.unperturbed():``) and ``optimizer.train()`` before training again.
    ``step()`` after ``eval()`` works, on purpose without a warning (evaluating and then
    training on is a normal workflow): the gradient of a forward/backward at ``w`` is taken as
    the gradient at ``w``, so that one step is a plain SGD-momentum update from ``w`` (no SAM
    effect for that batch), and the parameters end at the new ``w~`` (``is_perturbed`` is True
    again): training silently continues as MSAM. Call ``optimizer.train()`` before the next
    forward/backward to get MSAM's gradient at ``w~`` for that batch too.
    BatchNorm running statistics collected during training are taken at ``w~``; recompute them
    at ``w`` with :func:`msam.recalibrate_batchnorm` at the end of training.

    FSDP2 (``fully_shard``) and DDP models work unchanged: under FSDP2 ``||v||`` is the norm of
    the full tensors (the shards' norms all-reduced once per step), the moves to ``w`` and back
    are local to each rank's shards, and 2 ranks equal one process to rounding; checkpoints,
    also through torch.distributed.checkpoint, resume exactly (docs/guides/distributed.md,
    "MSAM, AdamW-MSAM and SAM on FSDP2").
    Complex parameters are supported as torch.optim supports them: a complex tensor counts as
    the pair of its real and imaginary parts (``||v||^2 = sum |v_i|^2``; the update equals the
    same optimizer on ``torch.view_as_real`` of it).

    Args:
        params: iterable of parameters or of parameter-group dicts.
        lr: learning rate (default 0.1).
        momentum: heavy-ball momentum ``mu`` in ``[0, 1)`` (default 0.9).
        rho: perturbation radius (default 3.0, about 10x SAM's; any finite value).
        weight_decay: L2 coefficient on the unperturbed weights (default 0).
        normalize: divide by the global ``||v||`` (default True).
        scale_by_lr: multiply the perturbation by ``lr`` (default False).
        foreach: use the torch._foreach multi-tensor path; None picks it on accelerators.

    Raises:
        ValueError: lr < 0, momentum outside [0, 1), non-finite rho, weight_decay < 0; also from
            ``step()``/``train()`` when a group's hyperparameters were set so afterwards
            (checked before the weights move).
        TypeError: a flag (normalize, scale_by_lr, foreach) that is not a bool (``'no'`` would
            be truthy), a hyperparameter that is not a real number.
        RuntimeError: from ``step()`` when a gradient is sparse.
    """

    _direction_key = "momentum_buffer"
    _state_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, rho: float = 3.0,
                 weight_decay: float = 0.0, *, normalize: bool = True, scale_by_lr: bool = False,
                 foreach: bool | None = None):
        defaults = dict(lr=lr, momentum=momentum, rho=rho, weight_decay=weight_decay,
                        normalize=normalize, scale_by_lr=scale_by_lr, foreach=foreach)
        self._validate_group(defaults)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_real("learning rate", group["lr"], low=0.0)
        check_real("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_real("rho", group["rho"])
        check_real("weight_decay", group["weight_decay"], low=0.0)
        check_bool("normalize", group["normalize"])
        check_bool("scale_by_lr", group["scale_by_lr"])
        check_foreach(group.get("foreach"))

    def _rho(self, group: dict[str, Any]) -> float:
        return float(group["rho"])

    def _needs_norm(self, group: dict[str, Any]) -> bool:
        return bool(group["normalize"]) and self._rho(group) != 0.0

    def _group_scale(self, group: dict[str, Any], norm: Tensor | None) -> Scale:
        coef = self._rho(group)
        if group["scale_by_lr"]:
            coef *= float(group["lr"])
        if coef == 0.0:
            return 0.0
        if not group["normalize"]:
            return coef
        if norm is None:
            return 0.0
        # rho / ||v|| without a host sync; ||v|| = 0 gives no perturbation
        return torch.where(norm > 0, coef / norm, torch.zeros_like(norm))

    def _update(self, group: dict[str, Any], step: GroupStep) -> None:
        """torch.optim.SGD's momentum update of the buffers (the weights move in ``_shift``)."""
        bufs = step.state["momentum_buffer"]
        kernel = _momentum_update_foreach if step.foreach else _momentum_update_single
        kernel(step.params, step.grads, bufs, momentum=float(group["momentum"]),
               weight_decay=float(group["weight_decay"]))
        for p, b in zip(step.params, bufs):
            self.state[p]["momentum_buffer"] = b

    def _directions(self, group: dict[str, Any], step: GroupStep,
                    ) -> tuple[list[Tensor], list[Tensor]]:
        return step.params + step.idle, step.state["momentum_buffer"] + step.idle_dirs

    def _shift(self, group: dict[str, Any], step: GroupStep, params: list[Tensor],
               dirs: list[Tensor], scale: Scale) -> None:
        # stepped parameters: w~ = w - (lr + c) v in one pass; idle ones only re-perturb
        shift_(step.params, step.state["momentum_buffer"], _neg_add(scale, float(group["lr"])),
               foreach=step.foreach)
        shift_(step.idle, step.idle_dirs, _neg_add(scale, 0.0), foreach=step.foreach)


def _neg_add(scale: Scale, lr: float) -> Scale:
    """-(lr + scale), exactly -lr when scale is the float 0."""
    if isinstance(scale, Tensor):
        return -(scale + lr)
    return -(lr + float(scale))


def _momentum_update_single(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None],
                            *, momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD's momentum update, one tensor at a time (bufs updated in place)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if bufs[i] is None:
            bufs[i] = g.detach().clone()
        else:
            bufs[i].mul_(momentum).add_(g)


def _momentum_update_foreach(params: list[Tensor], grads: list[Tensor],
                             bufs: list[Tensor | None], *, momentum: float,
                             weight_decay: float) -> None:
    """The same update with torch._foreach kernels grouped by device and dtype."""
    if not params:
        return
    index = list(range(len(params)))
    for ps, gs, idx in group_by_device_dtype(params, grads, index).values():
        if weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=weight_decay)
        old = [bufs[i] for i in idx]
        if all(b is not None for b in old):
            torch._foreach_mul_(old, momentum)
            torch._foreach_add_(old, gs)
        else:
            for i, g in zip(idx, gs):
                if bufs[i] is None:
                    bufs[i] = g.detach().clone()
                else:
                    bufs[i].mul_(momentum).add_(g)


class NAG(MSAM):
    r"""Nesterov momentum in Sutskever's form, as the last rung of the MSAM ablation ladder.

    ``NAG(params, lr, momentum, weight_decay)`` is ``MSAM(normalize=False, scale_by_lr=True,
    rho=momentum)`` with ``rho`` tied to the group's current ``momentum``: the parameters live
    at ``w~ = w - lr * momentum * v`` and::

        v = momentum * v + grad L(w - lr * momentum * v) + weight_decay * w
        w = w - lr * v

    (Sutskever et al. 2013). The live parameters are the look-ahead point; ``eval()`` gives ``w``.

    Args:
        params: iterable of parameters or of parameter-group dicts.
        lr: learning rate (default 0.1).
        momentum: momentum in [0, 1) (default 0.9).
        weight_decay: L2 coefficient on ``w`` (default 0).
        foreach: use the torch._foreach path; None picks it on accelerators.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, foreach: bool | None = None):
        super().__init__(params, lr=lr, momentum=momentum, rho=momentum,
                         weight_decay=weight_decay, normalize=False, scale_by_lr=True,
                         foreach=foreach)

    def _rho(self, group: dict[str, Any]) -> float:
        return float(group["momentum"])
