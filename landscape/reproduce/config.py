"""Every knob of the reproduction: :class:`ReproConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ReproConfig:
    """Every knob of the reproduction (training recipe, radii, probe sizes, seeds).

    Defaults are the full small-scale setting (:meth:`full`); :meth:`quick` is a seconds-long
    smoke version for tests. Radii were fixed from a pilot on seeds 100 and 101 (never the
    reported seeds 0..n-1): SAM ``rho=0.05`` (0.2 diverged), MSAM ``rho=1.0``.

    Attributes:
        epochs, batch_size, lr, momentum, weight_decay: SGD recipe (cosine lr per step from
            ``lr`` to 0, no warm-up).
        label_noise, train_size, test_fraction, width: the digits problem (:func:`digits_problem`).
        seeds: number of seeds (0..seeds-1) of the table, directions and eigenvalues.
        sweep_seeds: seeds of the rho sweep (the first ``sweep_seeds`` of them).
        rho_sam, rho_msam: radii of SAM and MSAM.
        rho_unnormalized: ladder step 1, ``eps = rho * v``; 0.5 makes ``rho * ||v||`` equal
            to ``rho_msam`` at the median ``||v|| ~ 2`` of an SGD run of this setting.
        rho_lr_scaled: ladder step 2, ``eps = rho * lr * v``; 5.0 equals step 1 at the peak
            lr 0.1 and shrinks with the lr (``rho = momentum`` would be NAG).
        rho_grid: the signed radii of the sweep (0 is taken from the SGD runs: MSAM with
            ``rho = 0`` is SGD).
        angle_rhos: the radii at which ``g_MSAM`` is evaluated in the angle experiment.
        angle_batches: consecutive steps from mid-training probed in the angle experiment.
        curvature_every: steps between curvature probes.
        probe_samples: training samples used for Hessians, curvature and 2-D surfaces.
        slice_radius: ``r`` range ``[-R, R]`` of the unit-direction slices (gradient, momentum).
        slice_points, surface_points: grid sizes of the 1-D slices and the 2-D surfaces.
        top_k: eigenvalues per model.
        device, dtype: where and in which precision to train (``"cpu"``, ``"cuda"``...).
        smoke: marks a :meth:`quick` run (recorded in the JSON).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_noise: float = 0.2
    train_size: int | None = None
    test_fraction: float = 0.3
    width: int = 16
    seeds: int = 5
    sweep_seeds: int = 3
    rho_sam: float = 0.05
    rho_msam: float = 1.0
    rho_unnormalized: float = 0.5
    rho_lr_scaled: float = 5.0
    rho_grid: tuple[float, ...] = (-2.0, -1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0, 2.0, 4.0)
    angle_rhos: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    angle_batches: int = 8
    curvature_every: int = 50
    probe_samples: int = 512
    slice_radius: float = 2.0
    slice_points: int = 21
    surface_points: int = 15
    top_k: int = 5
    device: str = "cpu"
    dtype: str = "float32"
    smoke: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "seeds", "sweep_seeds", "angle_batches",
                     "curvature_every", "probe_samples", "slice_points", "surface_points", "top_k",
                     "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ReproConfig.{name} must be a positive integer, got {v!r}")
        for name in ("lr", "slice_radius"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"ReproConfig.{name} must be a positive number, got {v!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"ReproConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"ReproConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.sweep_seeds > self.seeds:
            object.__setattr__(self, "sweep_seeds", self.seeds)
        if len(self.angle_rhos) < 2 or self.angle_rhos[0] != 0.0:
            raise ValueError(f"ReproConfig.angle_rhos must start at 0.0, got {self.angle_rhos!r}")

    @classmethod
    def full(cls, **overrides: Any) -> ReproConfig:
        """The full small-scale setting (the defaults), with ``overrides``."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> ReproConfig:
        """A seconds-long smoke setting: 2 epochs, 1 seed, a width-4 CNN on 192 images."""
        base = dict(
            epochs=2, batch_size=32, width=4, train_size=192, seeds=1, sweep_seeds=1,
            rho_grid=(-1.0, 0.0, 1.0), angle_rhos=(0.0, 1.0, 4.0), angle_batches=2,
            curvature_every=3, probe_samples=64, slice_points=5, surface_points=4, top_k=3,
            smoke=True,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def seed_list(self) -> list[int]:
        return list(range(self.seeds))
