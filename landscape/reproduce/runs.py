"""Training runs: :func:`train_run` and the :class:`RunCache` shared between experiments."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.data import to_device
from analysis.directions import momentum_direction
from analysis.evaluation import evaluate, progress_bar
from analysis.params import ParameterSpace
from analysis.probes import MechanismProbe
from msam.batchnorm import recalibrate_batchnorm

from ..training import train_step
from .config import ReproConfig
from .optimizers import OptimizerSpec, build_optimizer
from .problems import Problem, epoch_batches, is_pair, steps_per_epoch


@dataclass
class TrainedRun:
    """A finished training run: the model at its UNPERTURBED weights and the logs.

    Attributes:
        spec, seed: what was trained.
        model: the final model (BatchNorm statistics recomputed at ``w``), eval mode.
        optimizer: the optimizer, switched to the unperturbed point (``optimizer.eval()``).
        history: per epoch ``train_loss`` (running mean over the epoch's batches),
            ``test_acc``, ``epoch_seconds`` (forward/backward/step only, probes excluded) and
            ``lr``; per step ``cos`` = cos(v_{t-1}, g_t) with ``g_t`` the gradient the optimizer
            receives (at ``w`` for SGD and SAM, at the perturbed point for NAG and MSAM) and
            ``v_norm``; ``curvature`` rows ``(step, momentum, gradient, random)`` and ``angles``
            (the :meth:`analysis.MechanismProbe.angles` dicts) if requested.
        final: ``train_loss``, ``train_acc`` (on the noisy training labels), ``test_loss``,
            ``test_acc``, ``seconds_per_epoch`` (mean).
    """

    spec: OptimizerSpec
    seed: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: dict[str, list]
    final: dict[str, float]


def _cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _momentum_or_none(opt: torch.optim.Optimizer, model: nn.Module) -> torch.Tensor | None:
    try:
        return momentum_direction(opt, model)
    except ValueError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RunProbes:
    """The mechanism probes of one run and the seconds they take (excluded from the timing).

    ``cos(v_{t-1}, g_t)`` at every step (free: the gradient is already there); the angles of
    ``g_MSAM`` to ``g_SAM`` on ``config.angle_batches`` steps from mid-training and the
    directional curvature every ``config.curvature_every`` steps when asked, through
    :class:`analysis.MechanismProbe` (which leaves the run bit-for-bit unchanged).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, problem: Problem,
                 config: ReproConfig, seed: int, total: int, *, curvature: bool, angles: bool):
        self.model, self.opt, self.config = model, opt, config
        self.device = torch.device(config.device)
        self.space = ParameterSpace(model)
        self.mech = None
        if curvature or angles:
            self.mech = MechanismProbe(model, problem.loss, opt, rho_sam=config.rho_sam, seed=seed)
        self.probe_batch = problem.probe_data(config) if curvature else None
        self.curvature_on = curvature
        self.angle_steps = (set(range(total // 2, total // 2 + config.angle_batches))
                            if angles else set())
        self.hist: dict[str, list] = {"train_loss": [], "test_acc": [], "epoch_seconds": [],
                                      "lr": [], "cos": [], "v_norm": [], "curvature": [],
                                      "angles": []}
        self.start_epoch()

    def start_epoch(self) -> None:
        self.seconds = 0.0
        self._cos: list[torch.Tensor] = []
        self._vn: list[torch.Tensor] = []

    def angles(self, step: int, x: Any, y: Any) -> None:
        """Before the step: the angle probe on the step's batch, if ``step`` is probed."""
        if step not in self.angle_steps or self.mech is None:
            return
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            self.hist["angles"].append(self.mech.angles((x, y), self.config.angle_rhos))
        except ValueError:  # no momentum yet (a run shorter than two steps)
            pass
        self.seconds += time.perf_counter() - t0

    def cosine(self) -> None:
        """After the step's first backward: ``cos(v_{t-1}, g_t)`` and ``||v||``."""
        t0 = time.perf_counter()
        v = _momentum_or_none(self.opt, self.model)
        if v is not None:
            g = self.space.grad_vector()
            vn = torch.linalg.vector_norm(v)
            self._cos.append(torch.dot(v, g) / (vn * torch.linalg.vector_norm(g)).clamp_min(1e-30))
            self._vn.append(vn)
        self.seconds += time.perf_counter() - t0

    def curvature(self, step: int) -> None:
        """After step ``step`` (1-based): the curvature probe at step 1 and every ``every``."""
        if not (self.curvature_on and self.mech is not None
                and (step % self.config.curvature_every == 0 or step == 1)):
            return
        _sync(self.device)
        t0 = time.perf_counter()
        c = self.mech.curvature(self.probe_batch)
        self.hist["curvature"].append([step, c["curv_momentum"], c["curv_gradient"],
                                       c["curv_random"]])
        self.seconds += time.perf_counter() - t0

    def end_epoch(self) -> None:
        if self._cos:
            self.hist["cos"].extend(torch.stack(self._cos).tolist())
            self.hist["v_norm"].extend(torch.stack(self._vn).tolist())


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, spec: OptimizerSpec,
                 problem: Problem, config: ReproConfig, gen: torch.Generator,
                 probes: _RunProbes, step: int, total: int) -> int:
    """One epoch of :func:`train_run` (cosine lr per step); returns the step counter."""
    device, dtype = torch.device(config.device), config.torch_dtype
    model.train()
    if spec.perturbs:
        opt.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    n_seen = 0
    probes.start_epoch()
    _sync(device)
    t_epoch = time.perf_counter()
    for x, y in epoch_batches(problem.train, config.batch_size, gen):
        lr_t = _cosine_lr(config.lr, step, total)
        for group in opt.param_groups:
            group["lr"] = lr_t
        x = to_device(x, device, dtype)
        y = to_device(y, device, dtype)
        probes.angles(step, x, y)
        loss = train_step(model, opt, problem.loss, x, y, on_gradient=probes.cosine)
        loss_sum += loss.detach().to(torch.float64) * len(y)
        n_seen += len(y)
        step += 1
        probes.curvature(step)
    _sync(device)
    hist = probes.hist
    hist["epoch_seconds"].append(time.perf_counter() - t_epoch - probes.seconds)
    hist["lr"].append(lr_t)
    hist["train_loss"].append(float(loss_sum) / max(n_seen, 1))
    probes.end_epoch()
    return step


def train_run(problem: Problem, spec: OptimizerSpec, seed: int, config: ReproConfig, *,
              curvature: bool = False, angles: bool = False,
              progress: bool = False) -> TrainedRun:
    """Train one model with one optimizer and seed; log the MSAM mechanism probes.

    The loop: cosine lr per step ``lr_t = lr/2 (1 + cos(pi t / T))``; one
    :func:`landscape.train_step` per batch (one forward/backward for SGD, NAG and MSAM;
    ``SAM.step(closure, model=model)`` for SAM: a second pass at the ascent point with BatchNorm
    statistics frozen); the test accuracy is evaluated at the unperturbed weights after every
    epoch (``optimizer.eval()`` / ``optimizer.train()`` around it); at the end BatchNorm
    statistics are recomputed at ``w``. Probes go through :class:`analysis.MechanismProbe`
    (which leaves the run bit-for-bit unchanged) and are excluded from the timing.

    Args:
        problem: model factory and data.
        spec: the optimizer recipe.
        seed: seeds the initialization and the batch order.
        config: the training recipe.
        curvature: at step 1 and every ``config.curvature_every`` steps, log
            ``d^T H d / ||d||^2`` (Hessian of the probe set as one batch, training-mode
            BatchNorm, unperturbed weights) along the momentum, the probe-set gradient and a
            random filter-normalized direction (App. A.4).
        angles: on ``config.angle_batches`` consecutive steps from mid-training, the angle of
            ``g_MSAM(rho)`` to ``g_SAM`` (``rho`` over ``config.angle_rhos``, ``rho_SAM =
            config.rho_sam``) on the step's batch (Fig. 3).
        progress: a tqdm bar over the epochs.

    Returns:
        :class:`TrainedRun`.
    """
    device, dtype = torch.device(config.device), config.torch_dtype
    torch.manual_seed(seed)
    model = problem.model_fn(seed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"Problem.model_fn returned a {type(model).__name__}, not an nn.Module")
    model = model.to(device=device, dtype=dtype)
    opt = build_optimizer(spec, model.parameters(), config)
    gen = torch.Generator().manual_seed(10_000 + seed)
    total = steps_per_epoch(problem.train, config.batch_size) * config.epochs
    probes = _RunProbes(model, opt, problem, config, seed, total, curvature=curvature,
                        angles=angles)
    hist = probes.hist
    step = 0
    for _epoch in progress_bar(range(config.epochs), enabled=progress, total=config.epochs,
                               desc=f"{spec.name} seed {seed}"):
        step = _train_epoch(model, opt, spec, problem, config, gen, probes, step, total)
        if spec.perturbs:
            opt.eval()
        hist["test_acc"].append(evaluate(model, problem.loss, problem.test, batch_size=512).accuracy)
    if spec.perturbs:
        opt.eval()
    _recalibrate(model, problem, config)
    model.eval()
    tr = evaluate(model, problem.loss, problem.full_train(), batch_size=512)
    te = evaluate(model, problem.loss, problem.test, batch_size=512)
    final = {"train_loss": tr.loss, "train_acc": tr.accuracy, "test_loss": te.loss,
             "test_acc": te.accuracy,
             "seconds_per_epoch": float(np.mean(hist["epoch_seconds"]))}
    return TrainedRun(spec, seed, model, opt, hist, final)


def _recalibrate(model: nn.Module, problem: Problem, config: ReproConfig) -> None:
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    if is_pair(problem.train):
        recalibrate_batchnorm(model, problem.train, batch_size=config.batch_size)
    else:
        recalibrate_batchnorm(model, problem.train)


class RunCache:
    """Trained runs shared between experiments of one :func:`run_all` (keyed by recipe, seed).

    A run trained with curvature or angle probes also serves requests without them.
    """

    def __init__(self, problem: Problem, config: ReproConfig, *, progress: bool = False,
                 eager_probes: bool = False):
        self.problem, self.config, self.progress = problem, config, progress
        self.eager_probes = eager_probes
        self._runs: dict[tuple, TrainedRun] = {}
        self._probed: dict[tuple, tuple[bool, bool]] = {}

    def get(self, spec: OptimizerSpec, seed: int, *, curvature: bool = False,
            angles: bool = False) -> TrainedRun:
        if self.eager_probes:  # run_all: take every probe an experiment will ask for, once
            first = seed == self.config.seed_list()[0]
            curvature = curvature or (first and spec.name in ("SGD", "SAM", "MSAM"))
            angles = angles or spec.kind == "sgd"
        key = (spec.key, seed)
        run = self._runs.get(key)
        had = self._probed.get(key, (False, False))
        if run is not None and (had[0] or not curvature) and (had[1] or not angles):
            return run
        curvature, angles = curvature or had[0], angles or had[1]
        run = train_run(self.problem, spec, seed, self.config, curvature=curvature,
                        angles=angles, progress=self.progress)
        self._runs[key] = run
        self._probed[key] = (curvature, angles)
        return run

    def __len__(self) -> int:
        return len(self._runs)
