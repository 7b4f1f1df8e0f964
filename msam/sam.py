"""SAM and ASAM wrapping any torch optimizer (Foret et al. 2021; Kwon et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from msam._checks import (
    ArgumentTypeError,
    check_bool,
    check_finite_buffer,
    check_loaded_state,
    check_real,
    saved_flag,
)
from msam._perturbation import global_norm
from msam.batchnorm import frozen_batchnorm_stats

_BASE_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


# the base optimizer's usual non-negative hyperparameters: (key, name in messages)
_BASE_NUMBERS = (("lr", "learning rate"), ("weight_decay", "weight_decay"),
                 ("momentum", "momentum"))


def _resolve_base(base_optimizer: Any) -> type[Optimizer]:
    if isinstance(base_optimizer, str):
        try:
            return _BASE_OPTIMIZERS[base_optimizer.lower()]
        except KeyError:
            raise ValueError(f"Unknown base optimizer: {base_optimizer!r} (known names: "
                             f"{sorted(_BASE_OPTIMIZERS)}, or pass a torch.optim.Optimizer "
                             "subclass)") from None
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
        if issubclass(base_optimizer, SAM):
            raise ValueError(f"Unknown base optimizer: {base_optimizer!r} (SAM cannot wrap SAM)")
        return base_optimizer
    error = ValueError if isinstance(base_optimizer, type) else ArgumentTypeError
    raise error(f"Unknown base optimizer: {base_optimizer!r} (expected a "
                     "torch.optim.Optimizer subclass or one of "
                     f"{sorted(_BASE_OPTIMIZERS)})")


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around any torch optimizer; ``adaptive=True`` gives ASAM.

    One SAM step uses two forward/backward passes::

        g   = grad L_B(w)                              (first pass, by the caller)
        e   = rho * T^2 g / ||T g||                    (first_step: w <- w + e)
        g_e = grad L_B(w + e)                          (second pass, by the caller)
        w   = base_optimizer.step(w, g_e)              (second_step: back to w, then step)

    with ``T = 1`` (SAM, Foret et al. 2021) or ``T = |w| + eta`` elementwise (ASAM, Kwon et al.
    2021), the norm global over all groups and ``e = 0`` when the gradient is zero. The
    parameters before the ascent are kept (``state[p]["old_p"]``) and copied back exactly, for
    exactly the parameters that ``first_step`` moved (those with a gradient).

    Compared with the popular port: ``state_dict()`` holds the base optimizer's state (resume
    without spikes), ``param_groups`` is shared with ``base_optimizer`` (lr schedulers on the
    SAM object work), :func:`msam.frozen_batchnorm_stats` keeps BatchNorm statistics out of the
    second pass, and there are recipes for GradScaler and gradient accumulation.

    Usage::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_batchnorm_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    GradScaler: the ascent direction is invariant to the gradient scale, so no unscaling is
    needed before ``first_step``; restore, then let the scaler step the base optimizer (it
    unscales and skips the step on inf/NaN gradients, the parameters stay exactly at ``w``)::

        scaler.scale(loss_fn(model(x), y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(loss_fn(model(x), y)).backward()
        opt.unperturb()
        scaler.step(opt.base_optimizer)
        scaler.update()
        opt.zero_grad()

    Gradient accumulation: accumulate micro-batch gradients (loss / k) for the first pass,
    ``first_step(zero_grad=True)``, accumulate again at ``w + e``, ``second_step()``.

    Data parallel (docs/guides/distributed.md): under DDP the first pass need not be all-reduced; run
    it inside ``model.no_sync()`` for a per-rank ascent (m-sharpness with m the per-rank
    batch), and call ``analysis.distributed.all_reduce_gradients(model)`` before
    ``first_step`` for SAM on the global batch. Under FSDP2 (``fully_shard``) keep gradient
    sync on for both passes (each rank holds its shard of the global-batch gradient; ``||T g||``
    is the norm of the full tensors): with ``set_requires_gradient_sync(False)`` the sharded
    parameters get no gradient and ``first_step`` raises. For torch.distributed.checkpoint's
    ``get_state_dict``/``set_state_dict`` pass ``base_optimizer``.
    Complex parameters are supported as torch.optim supports them: a complex tensor counts as
    the pair of its real and imaginary parts (``||v||^2 = sum |v_i|^2``; the update equals the
    same optimizer on ``torch.view_as_real`` of it); ASAM's scale ``|w|`` is the modulus of each
    complex weight.

    Args:
        params: iterable of parameters or of parameter-group dicts.
        base_optimizer: a torch.optim.Optimizer subclass (default torch.optim.SGD) or one of the
            names "sgd", "adam", "adamw", "rmsprop", "adagrad".
        rho: neighbourhood radius (default 0.05; any finite value, may differ per group).
        adaptive: ASAM's scale-invariant ascent (default False).
        eta: ASAM's offset in ``T = |w| + eta`` (default 0.01).
        **base_kwargs: passed to the base optimizer (lr, momentum, weight_decay, ...).

    Raises:
        ValueError: unknown base optimizer, non-finite rho, eta < 0, a non-finite or negative
            lr/weight_decay/momentum (all checked again at each ``first_step``, before the
            weights move).
        TypeError: ``adaptive`` not a bool, ``base_optimizer`` neither a name nor a class,
            rho/eta not real numbers, lr/weight_decay/momentum given as a string, None or
            bool.
    """

    def __init__(self, params, base_optimizer: Any = torch.optim.SGD, rho: float = 0.05,
                 adaptive: bool = False, *, eta: float = 0.01, **base_kwargs: Any):
        base_cls = _resolve_base(base_optimizer)
        check_real("rho", rho)
        check_real("eta", eta, low=0.0)
        check_bool("adaptive", adaptive)
        for key, name in _BASE_NUMBERS:  # torch.optim compares them with 0 (a raw TypeError)
            value = base_kwargs.get(key, 0.0)
            if value is None or isinstance(value, (str, bytes, bool)):
                raise ArgumentTypeError(f"Invalid {name}: {value!r} (expected a real number)")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            self._validate_group(group)
        self.defaults.update(self.base_optimizer.defaults)
        self._perturbed = False
        self._saved: list[tuple[Tensor, Tensor]] | None = None

    @property
    def is_perturbed(self) -> bool:
        """True between first_step() and second_step()/unperturb()."""
        return self._perturbed

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        check_real("rho", group["rho"])
        check_real("eta", group["eta"], low=0.0)
        check_bool("adaptive", group["adaptive"])
        # the base optimizer's usual hyperparameters, when they are plain numbers (torch.optim
        # accepts lr=nan, and nothing re-checks a value edited after construction)
        for key, name in _BASE_NUMBERS:
            value = group.get(key)
            if (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
                    isinstance(value, Tensor) and value.numel() == 1):
                check_real(name, value, low=0.0)

    def _ascent_scale(self, group: dict[str, Any], p: Tensor) -> Tensor | None:
        if group["adaptive"]:
            return p.abs().add_(float(group["eta"]))
        return None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the ascent point ``w + e``, ``e = rho * T^2 g / ||T g||`` (keeps ``w``).

        Raises:
            RuntimeError: called twice without ``second_step()``, a sparse gradient, or no
                parameter has a gradient (checked before anything moves).
        """
        if self._perturbed:
            raise RuntimeError("SAM.first_step() called twice without second_step()/unperturb()")
        scaled: list[Tensor] = []
        items: list[tuple[dict[str, Any], Tensor, Tensor | None]] = []
        for group in self.param_groups:
            self._validate_group(group)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients (parameter of "
                                       f"shape {tuple(p.shape)})")
                t = self._ascent_scale(group, p)
                scaled.append(p.grad if t is None else p.grad * t)
                items.append((group, p, t))
        if not items:
            raise RuntimeError(
                "SAM.first_step(): no parameter has a gradient; run the first forward/backward "
                "pass before first_step(). Under FSDP2 (fully_shard) the first pass must not run "
                "with model.set_requires_gradient_sync(False): the sharded parameters then get "
                "no gradient (it stays in the unsharded, unreduced buffers)")
        norm = global_norm(scaled, foreach=False)
        saved: list[tuple[Tensor, Tensor]] = []
        for group, p, t in items:
            coef = torch.where(norm > 0, float(group["rho"]) / norm, torch.zeros_like(norm))
            state = self.state[p]
            old = state.get("old_p")
            if old is None or old.shape != p.shape or old.dtype != p.dtype:
                state["old_p"] = p.detach().clone()
            else:
                old.copy_(p)
            saved.append((p, state["old_p"]))
            e = p.grad if t is None else p.grad * t * t
            p.addcmul_(e, coef.to(p.device, p.dtype))
        # exactly the parameters moved now, with their saved weights (kept apart from
        # self.state, so clearing it cannot strand the ascent in the weights)
        self._saved = saved
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unperturb(self) -> None:
        """Copy the weights from before ``first_step`` back (exact); keeps the gradients."""
        if not self._perturbed:
            return
        for p, old in self._saved_weights():
            p.copy_(old)
        self._saved = None
        self._perturbed = False

    def _saved_weights(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, weights before first_step) for the parameters first_step moved."""
        saved = getattr(self, "_saved", None)
        if saved is not None:
            return saved
        return [(p, self.state[p]["old_p"]) for g in self.param_groups for p in g["params"]
                if p in self.state and self.state[p].get("old_p") is not None]

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to ``w`` and one base-optimizer step with the gradient taken at ``w + e``."""
        if not self._perturbed:
            raise RuntimeError("SAM.second_step() called without first_step()")
        # through step() so that lr schedulers and step hooks registered on SAM see it
        self.step()
        if zero_grad:
            self.zero_grad()

    def _second_step(self) -> None:
        if not self._perturbed:
            raise RuntimeError("SAM.second_step() called without first_step()")
        self.unperturb()
        self.base_optimizer.step()

    @torch.no_grad()
    def step(self, closure=None, *, model: torch.nn.Module | None = None):
        """A full SAM step, or the second half of one.

        With ``closure`` (forward + backward, returns the loss): gradients are zeroed, the
        closure runs at ``w``, ``first_step``, the closure runs again at ``w + e`` (inside
        :func:`msam.frozen_batchnorm_stats(model) <msam.frozen_batchnorm_stats>` when ``model``
        is given, so BatchNorm running statistics are only updated by the first pass), then
        ``second_step``; returns the loss at ``w``. Without a closure, only after
        ``first_step()`` (it is then ``second_step()``); otherwise a RuntimeError shows the
        call form ``opt.step(closure)``.
        If the second closure raises, the weights are restored to ``w`` before the exception
        propagates (the base optimizer does not step).

        Args:
            closure: callable doing forward and backward and returning the loss.
            model: the network whose BatchNorm statistics the second pass must not move.
        """
        if closure is None:
            if not self._perturbed:  # second_step() comes through here after first_step()
                raise RuntimeError(
                    "SAM.step() needs a closure that runs forward and backward and returns the "
                    "loss: 'def closure(): loss = loss_fn(model(x), y); loss.backward(); return "
                    "loss' then opt.step(closure); or call opt.first_step() after the first "
                    "backward pass and opt.second_step() after the second")
            self._second_step()
            return None
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        try:
            if model is None:
                closure()
            else:
                with frozen_batchnorm_stats(model):
                    closure()
        except BaseException:
            self.unperturb()  # back to w: never leave the weights at the ascent point
            raise
        self._second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its state and the shared param groups, which carry
        rho/adaptive/eta) plus ``"sam"``: ``{"perturbed": bool, "old_p": {index: tensor}}``
        (``old_p`` only when saved between first_step and second_step)."""
        sd = self.base_optimizer.state_dict()
        old: dict[int, Tensor] = {}
        if self._perturbed:
            index = {id(p): i for i, p in enumerate(
                p for g in self.param_groups for p in g["params"])}
            for p, t in self._saved_weights():
                if id(p) in index:
                    old[index[id(p)]] = t
        sd["sam"] = {"perturbed": bool(self._perturbed), "old_p": old}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (or a plain base-optimizer state dict).

        Everything is checked before anything is loaded: the base optimizer's buffers and the
        saved ``old_p`` against the parameters' shapes, the groups' rho/eta/adaptive, and
        (for a state saved between the two passes) that ``old_p``, which is copied into the
        weights by ``unperturb()``, is finite. Dtypes and devices are cast as torch.optim does.

        Raises:
            ValueError: naming the group, parameter, entry and both shapes (or the bad value).
            TypeError: ``state_dict`` is not a mapping.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"SAM.load_state_dict: expected a state dict (a mapping), got "
                            f"{type(state_dict).__name__}")
        sd = dict(state_dict)
        sam = sd.pop("sam", {"perturbed": False, "old_p": {}})
        check_loaded_state(self.base_optimizer, sd, "SAM")
        for gi, saved in enumerate(sd["param_groups"]):
            try:
                self._validate_group({**self.defaults, **saved})
            except ValueError as exc:
                raise type(exc)(f"SAM.load_state_dict: parameter group {gi}: {exc}") from None
        if not isinstance(sam, Mapping):
            raise ValueError(f"SAM.load_state_dict: 'sam' must be a dict, got "
                             f"{type(sam).__name__}")
        perturbed = saved_flag(sam.get("perturbed", False),
                               "SAM.load_state_dict: 'sam'['perturbed']")
        old_p = sam.get("old_p", {}) or {}
        if not isinstance(old_p, Mapping):
            raise ValueError(f"SAM.load_state_dict: 'sam'['old_p'] must be a dict, got "
                             f"{type(old_p).__name__}")
        where = [(gi, pi, p) for gi, g in enumerate(self.param_groups)
                 for pi, p in enumerate(g["params"])]
        loaded: list[tuple[Tensor, Tensor]] = []
        for index, t in old_p.items():
            try:
                gi, pi, p = where[int(index)]
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"SAM.load_state_dict: 'old_p' index {index!r} is not one of "
                                 f"the optimizer's {len(where)} parameters") from None
            if not isinstance(t, Tensor):
                raise ValueError(f"SAM.load_state_dict: 'old_p' of parameter {pi} of group "
                                 f"{gi} is a {type(t).__name__}, expected a tensor")
            if t.shape != p.shape:
                raise ValueError(f"SAM.load_state_dict: 'old_p' of parameter {pi} of group {gi} "
                                 f"has shape {tuple(t.shape)} but the parameter has shape "
                                 f"{tuple(p.shape)} (a state dict of another model?); nothing "
                                 "was loaded")
            if perturbed:
                check_finite_buffer("SAM", "old_p", gi, pi, t)
            loaded.append((p, t))
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        saved = []
        for p, t in loaded:
            self.state[p]["old_p"] = t.to(device=p.device, dtype=p.dtype)
            saved.append((p, self.state[p]["old_p"]))
        self._saved = saved if perturbed else None
        self._perturbed = perturbed

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["base_optimizer"] = self.base_optimizer
        state["_perturbed"] = self._perturbed
        state["_saved"] = getattr(self, "_saved", None)
        return state
