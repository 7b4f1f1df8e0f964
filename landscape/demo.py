"""The bundled demo: SGD, NAG, SAM and MSAM on the 8x8 digits, measured and reported.

What :func:`run_demo` does (``landscape demo --out DIR`` / ``make demo``):

1. loads the bundled digits (1,797 images, 70/30 train/test split, seed 0; no download);
2. trains the same small CNN (:func:`landscape.models.digits_cnn`, width 16, BatchNorm) from the
   same initialization with each optimizer, cosine learning-rate decay, batch 64:

   * SGD with momentum 0.9 (``torch.optim.SGD``),
   * NAG, Nesterov momentum (:class:`msam.msam.NAG`),
   * SAM around SGD with momentum, ``rho = 0.1`` (:class:`msam.sam.SAM`, Foret et al. 2021; two
     forward/backward passes per step, BatchNorm statistics frozen on the second pass),
   * MSAM, ``rho = 1.0`` (:class:`msam.msam.MSAM`, Becker et al. 2024; one pass per step; the
     weights are moved to the unperturbed point and the BatchNorm statistics recomputed there
     at the end, as the authors do);

3. measures each trained model: test accuracy, wall time per training epoch, ``lambda_max`` of
   the training-loss Hessian (Lanczos), worst-case adaptive m-sharpness (``rho = 0.1``,
   Andriushchenko et al. 2023), 1-D slices along a filter-normalized random direction and the
   gradient, a 2-D slice and the Hessian spectral density, all on 256 training images;
4. writes ``DIR/report.html`` (self-contained), ``DIR/summary.json`` and the checkpoints
   ``DIR/checkpoints/<optimizer>.pt``, and returns a :class:`DemoResult` whose ``table()`` is the
   summary printed by the command.

The numbers are whatever this run produces on this machine; wall times include the CPU's other
load. ``quick=True`` shrinks everything (narrow model, 1 epoch, small grids) for smoke tests.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from analysis.evaluation import evaluate, progress_bar
from analysis.results import Result, to_jsonable
from msam.batchnorm import frozen_batchnorm_stats, recalibrate_batchnorm
from msam.msam import MSAM, NAG
from msam.sam import SAM

from .datasets import load_digits
from .models import digits_cnn
from .report import ReportEntry, analyze_checkpoint, write_report

__all__ = ["DemoConfig", "DemoRun", "DemoResult", "run_demo", "demo_model", "demo_data",
           "OPTIMIZERS", "make_optimizer"]

#: The optimizers compared, in table order.
OPTIMIZERS = ("sgd", "nag", "sam", "msam")
_LABELS = {"sgd": "SGD", "nag": "NAG", "sam": "SAM", "msam": "MSAM"}


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (the defaults are the full ``make demo`` run)."""

    width: int = 16
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sam_rho: float = 0.1
    msam_rho: float = 1.0
    train_size: int | None = None
    analysis_samples: int = 256
    sharpness_rho: float = 0.1
    sharpness_steps: int = 10
    sharpness_samples: int = 256
    steps_1d: int = 21
    steps_2d: int = 11
    radius: float = 1.0
    density: bool = True
    density_iter: int = 25
    density_runs: int = 1
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A seconds-long configuration for smoke tests."""
        return cls(width=4, epochs=1, train_size=256, analysis_samples=128, sharpness_steps=2,
                   sharpness_samples=128, steps_1d=5, steps_2d=4, density=True, density_iter=8,
                   density_runs=1)


def demo_model(width: int = 16) -> nn.Module:
    """The demo's network (``digits_cnn(width)``), e.g. ``--model landscape.demo:demo_model``."""
    return digits_cnn(width)


def demo_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's analysis data: the first 256 training digits (``--data landscape.demo:demo_data``)."""
    d = load_digits(seed=0)
    return d.x_train[:256], d.y_train[:256]


def make_optimizer(name: str, params: Any, cfg: DemoConfig) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``sgd``, ``nag``, ``sam``, ``msam``) with the demo's settings."""
    kw = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    if name == "sgd":
        return torch.optim.SGD(params, **kw)
    if name == "nag":
        return NAG(params, **kw)
    if name == "sam":
        return SAM(params, torch.optim.SGD, rho=cfg.sam_rho, **kw)
    if name == "msam":
        return MSAM(params, rho=cfg.msam_rho, **kw)
    raise ValueError(f"unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}")


@dataclass(frozen=True, repr=False)
class DemoRun(Result):
    """One optimizer's training run and measurements."""

    optimizer: str
    test_accuracy: float
    test_loss: float
    train_loss: float
    seconds_per_epoch: float
    epochs: int
    lambda_max: float
    sharpness: float
    test_accuracy_history: tuple[float, ...] = ()
    checkpoint: str = ""


@dataclass(frozen=True, repr=False)
class DemoResult(Result):
    """All runs, the report's path and the settings."""

    runs: tuple[DemoRun, ...]
    report: str
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        """The summary table printed by ``landscape demo``."""
        from .cli import format_table

        rows = [[_LABELS.get(r.optimizer, r.optimizer), 100.0 * r.test_accuracy, r.test_loss,
                 r.seconds_per_epoch, r.lambda_max, r.sharpness] for r in self.runs]
        header = ["optimizer", "test acc %", "test loss", "s/epoch", "lambda_max", "sharpness"]
        return format_table(header, rows)


def _epoch(model, opt, name, x, y, bs, gen) -> float:
    """One training epoch; returns the sample-weighted mean training loss (at the live weights)."""
    model.train()
    perm = torch.randperm(len(y), generator=gen)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(y), bs):
        idx = perm[start:start + bs]
        xb, yb = x[idx], y[idx]
        if name == "sam":
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.first_step(zero_grad=True)
            with frozen_batchnorm_stats(model):
                F.cross_entropy(model(xb), yb).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
        total += loss.detach().double() * len(idx)
    return float(total) / len(y)


def _test_accuracy(model, opt, test) -> float:
    if hasattr(opt, "unperturbed"):
        with opt.unperturbed():
            return float(evaluate(model, "cross_entropy", test, batch_size=512).accuracy)
    return float(evaluate(model, "cross_entropy", test, batch_size=512).accuracy)


def _curves_figure(histories: dict[str, Sequence[float]]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, h in histories.items():
        fig.add_trace(go.Scatter(x=list(range(1, len(h) + 1)), y=[100 * a for a in h],
                                 mode="lines+markers", name=name))
    fig.update_layout(title="Test accuracy during training", xaxis_title="epoch",
                      yaxis_title="test accuracy (%)", template="plotly_white")
    return fig


def run_demo(
    out_dir: str | pathlib.Path,
    *,
    quick: bool = False,
    epochs: int | None = None,
    seed: int = 0,
    optimizers: Sequence[str] | None = None,
    config: DemoConfig | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    threads: int | None = 1,
) -> DemoResult:
    """Train, measure and report SGD, NAG, SAM and MSAM on the digits (see the module docstring).

    Args:
        out_dir: output directory (created).
        quick: use :meth:`DemoConfig.quick` (seconds) instead of the full run (about a minute or
            two on 2 CPU cores).
        epochs: override the number of epochs.
        seed: seed of the initialization, the batch order and the directions.
        optimizers: a subset of :data:`OPTIMIZERS` (default all four).
        config: explicit settings (overrides ``quick``).
        progress: progress bars on stderr.
        log: called with one-line status messages (the CLI prints them on stderr).
        threads: torch intra-op threads during the run (default 1: the demo's models are so
            small that more threads mostly add synchronization, and on a shared machine they
            oversubscribe the cores, which made a run 7x slower in our measurements); ``None``
            keeps torch's setting. The previous setting is restored afterwards.

    Returns:
        :class:`DemoResult`.
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, quick=quick, epochs=epochs, seed=seed, optimizers=optimizers,
                         config=config, progress=progress, log=log)
    finally:
        torch.set_num_threads(saved_threads)


def _run_demo(out_dir, *, quick, epochs, seed, optimizers, config, progress, log) -> DemoResult:
    say = log or (lambda _msg: None)
    cfg = config or (DemoConfig.quick() if quick else DemoConfig())
    overrides: dict[str, Any] = {"seed": seed}
    if epochs is not None:
        overrides["epochs"] = int(epochs)
    cfg = DemoConfig(**{**cfg.__dict__, **overrides})
    names = list(optimizers or OPTIMIZERS)
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad:
        raise ValueError(f"unknown optimizer(s) {bad}; choose from {list(OPTIMIZERS)}")
    out = pathlib.Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    digits = load_digits(seed=0, train_size=cfg.train_size)
    x, y = digits.train
    test = digits.test
    n_an = min(cfg.analysis_samples, len(y))
    analysis_data = (x[:n_an], y[:n_an])
    torch.manual_seed(cfg.seed)
    init = digits_cnn(cfg.width).state_dict()

    runs: list[DemoRun] = []
    entries: list[ReportEntry] = []
    histories: dict[str, list[float]] = {}
    for name in names:
        label = _LABELS[name]
        model = digits_cnn(cfg.width)
        model.load_state_dict(init)
        opt = make_optimizer(name, model.parameters(), cfg)
        base = opt.base_optimizer if isinstance(opt, SAM) else opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=cfg.epochs)
        gen = torch.Generator().manual_seed(cfg.seed)
        train_seconds = 0.0
        hist: list[float] = []
        train_loss = math.nan
        for _ in progress_bar(range(cfg.epochs), enabled=progress, desc=f"train {label}", unit="epoch"):
            t0 = time.perf_counter()
            train_loss = _epoch(model, opt, name, x, y, cfg.batch_size, gen)
            sched.step()
            train_seconds += time.perf_counter() - t0
            hist.append(_test_accuracy(model, opt, test))
        if hasattr(opt, "eval") and hasattr(opt, "is_perturbed"):
            opt.eval()  # evaluate and save the unperturbed weights w = w~ + rho v/||v||
            recalibrate_batchnorm(model, (x, y), batch_size=cfg.batch_size)
        model.eval()
        ck_path = out / "checkpoints" / f"{name}.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "epochs": cfg.epochs, "width": cfg.width}, ck_path)
        te = evaluate(model, "cross_entropy", test, batch_size=512)
        say(f"{label}: trained {cfg.epochs} epochs in {train_seconds:.1f} s, test accuracy "
            f"{100 * te.accuracy:.2f}%; measuring")
        entry = analyze_checkpoint(
            model, "cross_entropy", analysis_data, name=label, steps_1d=cfg.steps_1d,
            steps_2d=cfg.steps_2d, radius=cfg.radius, seed=cfg.seed,
            sharpness_rho=cfg.sharpness_rho,
            sharpness_options={"steps": cfg.sharpness_steps, "n_eval": cfg.sharpness_samples,
                               "m": min(128, n_an)},
            density=cfg.density, progress=progress,
            density_options={"num_iter": cfg.density_iter, "num_runs": cfg.density_runs},
            info={"test_accuracy": te.accuracy, "seconds_per_epoch": train_seconds / cfg.epochs},
        )
        entries.append(entry)
        histories[label] = hist
        runs.append(DemoRun(
            optimizer=name, test_accuracy=float(te.accuracy), test_loss=float(te.loss),
            train_loss=float(train_loss), seconds_per_epoch=train_seconds / cfg.epochs,
            epochs=cfg.epochs, lambda_max=float(entry.metrics["lambda_max"]),
            sharpness=float(entry.metrics["sharpness"]), test_accuracy_history=tuple(hist),
            checkpoint=str(ck_path),
        ))

    report = write_report(
        entries,
        out / "report.html",
        title="MSAM demo: SGD, NAG, SAM and MSAM on the bundled digits",
        intro=(f"digits_cnn(width={cfg.width}) trained for {cfg.epochs} epochs (batch "
               f"{cfg.batch_size}, lr {cfg.lr} with cosine decay, momentum {cfg.momentum}, weight "
               f"decay {cfg.weight_decay}; SAM rho={cfg.sam_rho}, MSAM rho={cfg.msam_rho}) on "
               f"{len(y)} training images; test accuracy on {len(test[1])} held-out images. "
               f"Curvature, sharpness and slices on {n_an} training images."),
        columns=["test_accuracy", "seconds_per_epoch", "loss", "accuracy", "lambda_max", "sharpness"],
        extra_figures=[("test accuracy per epoch", _curves_figure(histories))],
        notes=["loss / accuracy: on the analysis images (training data). sharpness: worst-case "
               f"adaptive m-sharpness, rho={cfg.sharpness_rho} (Andriushchenko et al. 2023). "
               "lambda_max: top eigenvalue of the training-loss Hessian (Lanczos). Wall times are "
               "measured on this machine, including whatever else it was running."],
    )
    result = DemoResult(runs=tuple(runs), report=str(report), config=dict(cfg.__dict__),
                        seconds=time.perf_counter() - t_start)
    (out / "summary.json").write_text(json.dumps(to_jsonable(result.to_dict()), indent=2) + "\n")
    return result
