"""MSAM mechanism probes: training-time measurements behind the Momentum-SAM paper's claims.

Becker et al. (2024), "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead", explain MSAM by measurements no optimizer library offers. :class:`MechanismProbe`
attaches to an existing training loop and takes them on the batch you hand it, at the current
UNPERTURBED weights ``w`` (for an MSAM optimizer that lives at ``w~ = w - rho v / ||v||``, the
probe moves to ``w`` with ``optimizer.unperturbed()`` and back):

* ``"cosine"`` (Fig. 2C): ``cos(v_{t-1}, g_t)``, the momentum before the step against the new
  batch's gradient. Mostly negative: the last step overshot along ``-v``, so ``-v`` points uphill.
* ``"msam_loss"`` (App. A.10): ``L_B(w)`` and ``L_B(w - rho v / ||v||)`` on the same batch.
* ``"angles"`` (Fig. 3): ``g_SGD = grad L_B(w)``, ``g_SAM = grad L_B(w + rho_SAM g / ||g||)`` and
  ``g_MSAM(rho) = grad L_B(w - rho v / ||v||)``; ``g_MSAM`` projected into the plane of
  ``{g_SAM, g_SGD}`` and its signed angle to ``g_SAM`` (positive on the side of ``g_SGD``),
  over a sweep of ``rho``; ``rho_zero`` is where the angle crosses zero (bisection, then linear
  interpolation).
* ``"curvature"`` (App. A.4): ``d^T H_B d / ||d||^2`` along the momentum, the gradient and a
  random filter-normalized direction.
* ``"profiles"`` (Fig. 4 / A.3): ``L_B(w + r d / ||d||) - L_B(w)`` along the momentum (negative
  ``r`` is ``-v``, the MSAM direction), the gradient and a random filter-normalized direction.
* ``"feature_rank"`` (App. A.6): the number of principal components of a layer's activations
  that explain 99% of their variance (:func:`feature_rank` for a whole data set).

Guarantees: a probe call leaves the training run bit-for-bit unchanged. Parameters (exact
values, also for a perturbed MSAM), buffers (BatchNorm running statistics), ``.grad``,
``requires_grad``, train/eval flags and the CPU and CUDA random number generator states are
restored; the optimizer state is only read (``unperturbed()`` re-applies the stored
coefficients). Gradients are taken with ``torch.autograd.grad``. Nothing is registered on the
model, so a probe that is not called costs nothing. Call it before the forward pass of a step or
after ``optimizer.step()`` (it writes the parameters in place, which would invalidate a pending
autograd graph).

Example:
    >>> probe = MechanismProbe(model, "cross_entropy", optimizer)       # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                          # doctest: +SKIP
    ...     if step % 10 == 0:
    ...         probe.log(step, (x, y), probes=("cosine", "msam_loss"))
    ...     optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    >>> probe.to_csv("probes.csv")                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import Data, as_data, batch_size_of, to_device
from .directions import project_out
from .evaluation import forward, model_device_dtype, model_mode, resolve_loss
from .losses import LossSpec
from .params import ParameterSpace
from .results import Result, to_jsonable
from .sharpness import preserved_state
from .sharpness.directional import loss_along_line

__all__ = ["PROBES", "rank_for_variance"]


#: Probe names accepted by :meth:`MechanismProbe.log`.
PROBES = ("cosine", "msam_loss", "angles", "curvature", "profiles", "feature_rank")

_DIRECTIONS = ("momentum", "gradient", "random")


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Save and restore the global CPU RNG and, when CUDA is initialized, every CUDA RNG."""
    cpu = torch.get_rng_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def rank_for_variance(features: torch.Tensor, threshold: float = 0.99) -> int:
    """Smallest number of principal components explaining ``threshold`` of the variance.

    ``features`` is ``(N, D)``; it is centered, its singular values ``s`` taken in float64, and
    the rank is the smallest ``k`` with ``sum_{i<=k} s_i^2 >= threshold * sum_i s_i^2``
    (Andriushchenko et al. 2023, "SAM leads to low-rank features"; MSAM paper App. A.6).
    Returns 0 for constant features.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a tensor, got {type(features).__name__}")
    if features.dim() < 2 or features.shape[0] < 1:
        raise ValueError(f"features must be (N, D) with N >= 1, got shape {tuple(features.shape)}")
    f = features.detach().reshape(features.shape[0], -1).double()
    f = f - f.mean(dim=0, keepdim=True)
    s2 = torch.linalg.svdvals(f) ** 2
    total = float(s2.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(cum, torch.tensor([threshold], dtype=cum.dtype) - 1e-12).item()) + 1


def _find_module(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    if isinstance(layer, nn.Module):
        for m in model.modules():
            if m is layer:
                return m
        raise ValueError("layer is a module that is not part of the model")
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"unknown layer {layer!r}; the model has {[n for n in modules if n]}")
    return modules[layer]


@contextlib.contextmanager
def _capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    out: list[torch.Tensor] = []

    def hook(_m, _inp, output):
        t = output[0] if isinstance(output, (tuple, list)) else output
        out.append(t.detach())

    handle = module.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


@dataclass(frozen=True, repr=False)
class FeatureRankResult(Result):
    """Feature rank of a layer (MSAM paper App. A.6).

    Attributes:
        rank: principal components needed to explain ``threshold`` of the variance.
        threshold: 0.99 by default.
        layer: the layer name.
        num_samples, num_features: shape of the feature matrix (the rank is at most their min).
    """

    rank: int
    threshold: float
    layer: str
    num_samples: int
    num_features: int


def feature_rank(
    model: nn.Module,
    data: Data,
    layer: str | nn.Module,
    *,
    threshold: float = 0.99,
    mode: str | None = "eval",
    max_samples: int | None = None,
    batch_size: int | None = None,
) -> FeatureRankResult:
    """Feature rank of ``layer``'s outputs over ``data`` (MSAM paper App. A.6).

    The layer outputs of every sample are flattened to ``(N, D)`` and passed to
    :func:`rank_for_variance`. The paper reports it for the last block (SGD 5019, SAM 4775, MSAM
    3791 on WRN); it is at most ``min(N - 1, D)``, so use ``N`` well above ``D``.

    Args:
        model: the network (restored exactly afterwards).
        data: inputs and targets (targets unused), see :mod:`analysis.data`.
        layer: a module name from ``model.named_modules()`` or the module itself.
        threshold: fraction of the variance (default 0.99).
        mode: ``"eval"`` (default), ``"train"`` or ``None``.
        max_samples: use at most this many samples.
        batch_size: batch size to split an ``(X, y)`` pair.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    module = _find_module(model, layer)
    name = layer if isinstance(layer, str) else next(n for n, m in model.named_modules() if m is module)
    source = as_data(data, batch_size=batch_size, max_samples=max_samples)
    device, dtype = model_device_dtype(model)
    feats = []
    with preserved_state(model), model_mode(model, mode), torch.no_grad(), _capture(module) as out:
        for batch in source:
            forward(model, to_device(batch.inputs, device, dtype))
            feats.append(out.pop().reshape(batch.size, -1))
            out.clear()
    f = torch.cat(feats)
    return FeatureRankResult(
        rank=rank_for_variance(f, threshold), threshold=float(threshold), layer=str(name),
        num_samples=int(f.shape[0]), num_features=int(f.shape[1]),
    )


class MechanismProbe:
    """The MSAM mechanism probes for a training loop (see the module docstring).

    Each probe method takes one batch ``(inputs, targets)`` (or a batch dict such as
    ``{"input_ids", "attention_mask", "labels"}``, its own target, see :mod:`analysis.data`) and
    returns a dict of plain Python values; :meth:`log` runs a chosen set, adds ``step`` and
    appends the row to :attr:`history`. Losses are the batch means ``loss_fn`` returns, over the
    batch's loss terms (its counted tokens for a language-model loss), so a probe's ``"loss"``
    is ``evaluate(model, loss_fn, [batch]).loss`` at the unperturbed weights.

    Args:
        model: the network being trained.
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable returning the batch mean.
        optimizer: where the momentum is read: torch SGD (``momentum_buffer``), Adam/AdamW
            (``exp_avg``), :class:`msam.MSAM`, :class:`msam.AdamWMSAM` or the base optimizer
            of :class:`msam.SAM`.
        rho: the MSAM radius for ``"msam_loss"`` (default: the optimizer's ``rho`` when it is a
            normalized, not lr-scaled MSAM; else 3.0, the paper's README value. For NAG and the
            other ladder rungs ``rho`` is a coefficient of ``v``, not a radius).
        rho_sam: the SAM radius of ``g_SAM`` for ``"angles"`` (default: a SAM optimizer's
            ``rho``, else 0.2, the paper's README value).
        mode: module mode of the probe passes: ``None`` (default: as the loop left the modules,
            usually train mode, so BatchNorm uses batch statistics as in the step; running
            statistics are restored afterwards), ``"train"`` or ``"eval"``.
        params: restrict the parameter space (see :class:`ParameterSpace`).
        seed: seed of the random directions (a private generator; the k-th random direction
            uses ``seed + k``).
        layer: default layer for ``"feature_rank"``.

    Attributes:
        history: the logged rows (list of dicts).
        counts: forward, backward and Hessian-vector passes used so far.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossSpec,
        optimizer: torch.optim.Optimizer,
        *,
        rho: float | None = None,
        rho_sam: float | None = None,
        mode: str | None = None,
        params: Sequence[str | nn.Parameter] | None = None,
        seed: int = 0,
        layer: str | nn.Module | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
            raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        if mode not in (None, "eval", "train"):
            raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
        self.model = model
        self.loss_fn = resolve_loss(loss_fn)
        self.optimizer = optimizer
        self.space = ParameterSpace(model, params)
        self._params = params
        is_sam = hasattr(optimizer, "base_optimizer")
        group = optimizer.param_groups[0] if optimizer.param_groups else {}
        group_rho = group.get("rho")
        # the optimizer's rho is a radius only for a normalized, not lr-scaled MSAM (for NAG and
        # the other ladder rungs it is a coefficient of v, not the length of the step)
        is_radius = bool(group.get("normalize", True)) and not bool(group.get("scale_by_lr", False))
        if rho is None:
            rho = float(group_rho) if (group_rho is not None and not is_sam and is_radius) else 3.0
        if rho_sam is None:
            rho_sam = float(group_rho) if (group_rho is not None and is_sam) else 0.2
        for name, value in (("rho", rho), ("rho_sam", rho_sam)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
        if layer is not None:
            if not isinstance(layer, (str, nn.Module)):
                raise TypeError(f"layer must be a module name or a module, got {type(layer).__name__}")
            _find_module(model, layer)  # unknown layers fail now, listing the model's layers
        self.rho = float(rho)
        self.rho_sam = float(rho_sam)
        self.mode = mode
        self.seed = int(seed)
        self.layer = layer
        self.history: list[dict[str, Any]] = []
        self.counts = {"forward": 0, "backward": 0, "hvp": 0}
        self._random_calls = 0

    def __repr__(self) -> str:
        return (f"MechanismProbe(optimizer={type(self.optimizer).__name__}, rho={self.rho}, "
                f"rho_sam={self.rho_sam}, rows={len(self.history)})")

    # -- the guarded evaluation context ----------------------------------------------------
    @contextlib.contextmanager
    def _at_w(self) -> Iterator[torch.Tensor]:
        """Everything restored on exit; inside, the parameters are at the unperturbed ``w``
        (yielded as a flat vector)."""
        opt = self.optimizer
        perturbed = bool(getattr(opt, "is_perturbed", False))
        if perturbed and not hasattr(opt, "unperturbed"):
            raise RuntimeError(
                f"{type(opt).__name__} is at its perturbed point (between first_step and "
                "second_step); call the probe before first_step() or after second_step()"
            )
        with rng_preserved(self.space.device), preserved_state(self.model), \
                model_mode(self.model, self.mode):
            if perturbed:
                with opt.unperturbed():
                    yield self.space.vector()
            else:
                yield self.space.vector()

    def _batch(self, batch: Any) -> tuple[Any, Any, int]:
        if isinstance(batch, Mapping):  # a batch dict is its own target, as in analysis.data
            x = to_device(dict(batch), self.space.device, self.space.dtype)
            return x, x, batch_size_of(x)
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError(
                f"batch must be an (inputs, targets) pair or a batch dict, got {type(batch).__name__}"
            )
        x = to_device(batch[0], self.space.device, self.space.dtype)
        y = to_device(batch[1], self.space.device, self.space.dtype)
        return x, y, batch_size_of(y)

    def _loss(self, x: Any, y: Any, w: torch.Tensor, delta: torch.Tensor | None, where: str) -> float:
        self.space.copy_(w if delta is None else w + delta)
        with torch.no_grad():
            loss = self.loss_fn(forward(self.model, x), y)
        self.counts["forward"] += 1
        return self._finite(loss, where)

    def _grad(self, x: Any, y: Any, w: torch.Tensor, delta: torch.Tensor | None,
              where: str) -> tuple[float, torch.Tensor]:
        self.space.copy_(w if delta is None else w + delta)
        with torch.enable_grad():
            loss = self.loss_fn(forward(self.model, x), y)
            value = self._finite(loss, where)
            grads = torch.autograd.grad(loss, self.space.params, allow_unused=True)
        self.counts["forward"] += 1
        self.counts["backward"] += 1
        return value, self.space.flatten(list(grads))

    @staticmethod
    def _finite(loss: Any, where: str) -> float:
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor (the batch mean)")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} {where}")
        return value

    def _momentum(self) -> torch.Tensor:
        from .directions import momentum_direction

        v = momentum_direction(self.optimizer, self.model, params=self._params)
        if not bool(torch.linalg.vector_norm(v) > 0):
            raise ValueError("the optimizer's momentum is zero (no step taken yet?)")
        return v

    def _random(self) -> torch.Tensor:
        from .directions import random_direction

        d = random_direction(self.model, seed=self.seed + self._random_calls, params=self._params)
        self._random_calls += 1
        return d

    def _direction(self, name: str, x: Any, y: Any, w: torch.Tensor) -> torch.Tensor:
        if name == "momentum":
            return self._momentum()
        if name == "gradient":
            return self._grad(x, y, w, None, "at w")[1]
        if name == "random":
            return self._random()
        raise ValueError(f"unknown direction {name!r}; choose from {list(_DIRECTIONS)}")

    # -- the probes ------------------------------------------------------------------------
    def cosine(self, batch: Any) -> dict[str, float]:
        """``cos(v_{t-1}, g_t)`` (Fig. 2C): the current momentum buffer against the gradient of
        ``batch`` at the unperturbed weights. Call before the step that uses ``batch``.

        Returns ``{"cos_v_g", "momentum_norm", "grad_norm", "loss"}``. Cost: 1 forward + 1
        backward.
        """
        x, y, _ = self._batch(batch)
        with self._at_w() as w:
            v = self._momentum()
            loss, g = self._grad(x, y, w, None, "at w")
        vn, gn = float(v.norm()), float(g.norm())
        cos = float(v @ g) / (vn * gn) if vn > 0 and gn > 0 else float("nan")
        return {"cos_v_g": cos, "momentum_norm": vn, "grad_norm": gn, "loss": loss}

    def msam_loss(self, batch: Any, rho: float | None = None) -> dict[str, float]:
        """``L_B(w)`` and ``L_B(w - rho v / ||v||)`` on the same batch (App. A.10).

        Returns ``{"loss", "loss_msam", "loss_msam_diff"}``. Cost: 2 forward passes.
        """
        rho = self.rho if rho is None else float(rho)
        x, y, _ = self._batch(batch)
        with self._at_w() as w:
            v = self._momentum()
            l0 = self._loss(x, y, w, None, "at w")
            l1 = self._loss(x, y, w, (-rho / float(v.norm())) * v, f"at w - {rho} v/||v||")
        return {"loss": l0, "loss_msam": l1, "loss_msam_diff": l1 - l0}

    def angles(self, batch: Any, rhos: Sequence[float] = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0),
               *, rho_sam: float | None = None, refine: int = 6) -> dict[str, Any]:
        """The g_MSAM vs g_SAM angle in the plane of ``{g_SAM, g_SGD}`` (Fig. 3).

        With ``e1 = g_SAM / ||g_SAM||`` and ``e2`` the unit component of ``g_SGD`` orthogonal to
        ``e1``, the angle of ``g_MSAM(rho)`` is ``atan2(g_MSAM . e2, g_MSAM . e1)`` in degrees
        (positive towards ``g_SGD``; at ``rho = 0`` it is the angle between ``g_SGD`` and
        ``g_SAM``). ``rho_zero`` is the first ``rho`` of the sweep where the angle changes
        sign from positive to non-positive, refined by ``refine`` bisection steps and a final
        linear interpolation (``None`` if the sweep has no crossing).

        Returns ``{"rhos", "angles_deg", "in_plane", "angle_sgd_sam_deg", "rho_zero"}``
        (``in_plane``: ``||projection|| / ||g_MSAM||``). Cost: ``len(rhos) + 2 + refine``
        forward+backward passes.
        """
        rho_sam = self.rho_sam if rho_sam is None else float(rho_sam)
        rr = sorted(float(r) for r in rhos)
        if not rr or any(not math.isfinite(r) or r < 0 for r in rr):
            raise ValueError(f"rhos must be non-negative finite numbers, got {rhos!r}")
        x, y, _ = self._batch(batch)
        with self._at_w() as w:
            v = self._momentum()
            unit_v = v / v.norm()
            _, g_sgd = self._grad(x, y, w, None, "at w")
            gn = g_sgd.norm()
            if not bool(gn > 0):
                raise ValueError("the batch gradient is zero; the angles are undefined")
            _, g_sam = self._grad(x, y, w, (rho_sam / gn) * g_sgd, "at the SAM point")
            e1 = g_sam / g_sam.norm()
            e2 = project_out(g_sgd, [e1])
            e2n = e2.norm()
            if not bool(e2n > 0):
                raise ValueError("g_SGD and g_SAM are parallel; the plane is undefined")
            e2 = e2 / e2n

            def angle(r: float) -> tuple[float, float]:
                _, gm = self._grad(x, y, w, -r * unit_v, f"at w - {r} v/||v||")
                a, b = float(gm @ e1), float(gm @ e2)
                return math.degrees(math.atan2(b, a)), math.hypot(a, b) / max(float(gm.norm()), 1e-300)

            results = [angle(r) for r in rr]
            angles = [a for a, _ in results]
            rho_zero = None
            for i in range(len(rr) - 1):
                if angles[i] > 0 >= angles[i + 1]:
                    lo, hi, a_lo, a_hi = rr[i], rr[i + 1], angles[i], angles[i + 1]
                    for _ in range(int(refine)):
                        mid = 0.5 * (lo + hi)
                        a_mid = angle(mid)[0]
                        if a_mid > 0:
                            lo, a_lo = mid, a_mid
                        else:
                            hi, a_hi = mid, a_mid
                    rho_zero = lo + (hi - lo) * a_lo / (a_lo - a_hi) if a_lo != a_hi else lo
                    break
        cos0 = float(g_sgd @ g_sam) / float(gn * g_sam.norm())
        return {
            "rhos": rr,
            "angles_deg": angles,
            "in_plane": [p for _, p in results],
            "angle_sgd_sam_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos0)))),
            "rho_zero": rho_zero,
        }

    def curvature(self, batch: Any, directions: Sequence[str] = _DIRECTIONS) -> dict[str, float]:
        """Directional curvature ``d^T H_B d / ||d||^2`` (App. A.4) along the momentum, the
        batch gradient and a random filter-normalized direction.

        Uses :class:`analysis.HessianOperator` on the batch (one Hessian-vector product
        per direction, about 2-3 gradients each). Returns ``{"curv_<direction>"}``.
        """
        from .operators.curvature import directional_curvature
        from .operators.hessian import HessianOperator

        x, y, _ = self._batch(batch)
        out = {}
        with self._at_w() as w:
            dirs = {name: self._direction(name, x, y, w) for name in directions}
            self.space.copy_(w)
            op = HessianOperator(self.model, self.loss_fn, [(x, y)], params=self._params,
                                 mode=None, check_deterministic=False)
            for name, d in dirs.items():
                out[f"curv_{name}"] = directional_curvature(op, d)
            self.counts["hvp"] += len(dirs)
        return out

    def profiles(self, batch: Any, radii: Sequence[float] = tuple(np.linspace(-1.0, 1.0, 11).tolist()),
                 directions: Sequence[str] = _DIRECTIONS) -> dict[str, Any]:
        """Loss profiles ``L_B(w + r d / ||d||) - L_B(w)`` (Fig. 4; App. A.3 for the momentum).

        Negative ``r`` along the momentum is the MSAM direction ``-v``. Returns
        ``{"radii", "profile_<direction>": [...]}``. Cost: ``1 + len(directions) * len(radii)``
        forward passes (+1 forward/backward for the gradient direction).
        """
        r = [float(v) for v in radii]
        if not r or not all(math.isfinite(v) for v in r):
            raise ValueError(f"radii must be finite numbers, got {radii!r}")
        x, y, _ = self._batch(batch)
        out: dict[str, Any] = {"radii": r}
        with self._at_w() as w:
            def loss_at(delta: torch.Tensor | None, where: str) -> float:
                return self._loss(x, y, w, delta, where)

            l0 = loss_at(None, "at w")
            for name in directions:
                d = self._direction(name, x, y, w)
                _, losses, _ = loss_along_line(loss_at, d, r, origin=l0, what=f"{name} direction")
                out[f"profile_{name}"] = [li - l0 for li in losses]
        return out

    def feature_rank(self, batch: Any, layer: str | nn.Module | None = None,
                     threshold: float = 0.99) -> dict[str, int]:
        """Feature rank of ``layer`` on this batch (App. A.6; at most the batch size - 1).

        Returns ``{"feature_rank"}``. Cost: 1 forward pass. For a data set use
        :func:`feature_rank`.
        """
        layer = self.layer if layer is None else layer
        if layer is None:
            raise ValueError("no layer given (pass layer= here or to MechanismProbe)")
        module = _find_module(self.model, layer)
        x, _, n = self._batch(batch)
        with self._at_w() as w, torch.no_grad(), _capture(module) as out:
            self.space.copy_(w)
            forward(self.model, x)
            self.counts["forward"] += 1
            feats = out[-1].reshape(n, -1)
        return {"feature_rank": rank_for_variance(feats, threshold)}

    # -- logging ---------------------------------------------------------------------------
    def log(self, step: int, batch: Any, probes: Sequence[str] = ("cosine", "msam_loss"),
            **options: Any) -> dict[str, Any]:
        """Run ``probes`` (names from :data:`PROBES`) on ``batch`` and append one row.

        ``options`` are passed on by probe name, e.g. ``angles={"rhos": [0, 1, 3]}``,
        ``profiles={"radii": [-1, 0, 1]}``. Returns the row (``{"step": step, ...}``).
        """
        if isinstance(probes, str):
            probes = (probes,)
        unknown = [p for p in probes if p not in PROBES]
        if unknown:
            raise ValueError(f"unknown probe(s) {unknown}; choose from {list(PROBES)}")
        bad = [k for k in options if k not in probes]
        if bad:
            raise ValueError(f"options for probes that are not run: {bad}")
        row: dict[str, Any] = {"step": int(step)}
        for name in probes:
            row.update(getattr(self, name)(batch, **dict(options.get(name, {}))))
        self.history.append(row)
        return row

    def to_json(self, path: str | os.PathLike) -> None:
        """Write :attr:`history` as a JSON list of rows (non-finite numbers become null)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(to_jsonable(self.history), fh, indent=1)

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write :attr:`history` as CSV: one row per log call, the union of the keys as
        columns (first-seen order); list values (profiles, sweeps) as JSON strings."""
        cols: list[str] = []
        for row in self.history:
            cols += [k for k in row if k not in cols]
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: (json.dumps(to_jsonable(v)) if isinstance(v, (list, tuple))
                                     else to_jsonable(v)) for k, v in row.items()})

    def clear(self) -> None:
        """Empty :attr:`history`."""
        self.history.clear()
