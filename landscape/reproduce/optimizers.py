"""The reproduction's optimizers: :class:`OptimizerSpec` and the one factory :func:`build_optimizer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from msam.msam import MSAM, NAG
from msam.sam import SAM

from .config import ReproConfig

OPTIMIZERS = ("SGD", "NAG", "SAM", "MSAM", "MSAM-unnormalized", "MSAM-lr-scaled")
"""Optimizer names of the table, the last three the ablation ladder MSAM -> ... -> NAG."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One training recipe: ``kind`` in {"sgd", "nag", "sam", "msam"} and its options."""

    name: str
    kind: str
    rho: float = 0.0
    normalize: bool = True
    scale_by_lr: bool = False

    @property
    def key(self) -> tuple:
        return (self.kind, float(self.rho), self.normalize, self.scale_by_lr)

    @property
    def perturbs(self) -> bool:
        """Whether the optimizer keeps the parameters at a perturbed point between steps."""
        return self.kind in ("nag", "msam")


def optimizer_specs(config: ReproConfig) -> dict[str, OptimizerSpec]:
    """The table's optimizers (:data:`OPTIMIZERS`) with the radii of ``config``."""
    return {
        "SGD": OptimizerSpec("SGD", "sgd"),
        "NAG": OptimizerSpec("NAG", "nag"),
        "SAM": OptimizerSpec("SAM", "sam", rho=config.rho_sam),
        "MSAM": OptimizerSpec("MSAM", "msam", rho=config.rho_msam),
        "MSAM-unnormalized": OptimizerSpec("MSAM-unnormalized", "msam",
                                           rho=config.rho_unnormalized, normalize=False),
        "MSAM-lr-scaled": OptimizerSpec("MSAM-lr-scaled", "msam", rho=config.rho_lr_scaled,
                                        normalize=False, scale_by_lr=True),
    }


def msam_spec(rho: float) -> OptimizerSpec:
    """The :class:`OptimizerSpec` of MSAM with radius ``rho`` (signed; the label shows it)."""
    return OptimizerSpec(f"MSAM(rho={rho:g})", "msam", rho=float(rho))


def build_optimizer(spec: OptimizerSpec, params: Any, config: ReproConfig) -> torch.optim.Optimizer:
    """The torch optimizer of ``spec`` with ``config``'s lr, momentum and weight decay.

    SGD is ``torch.optim.SGD``; NAG is :class:`msam.NAG` (Sutskever form, parameters at
    ``w - lr mu v``); SAM is :class:`msam.SAM` around SGD; MSAM is :class:`msam.MSAM`.
    """
    kw = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if spec.kind == "sgd":
        return torch.optim.SGD(params, **kw)
    if spec.kind == "nag":
        return NAG(params, **kw)
    if spec.kind == "sam":
        return SAM(params, torch.optim.SGD, rho=spec.rho, **kw)
    if spec.kind == "msam":
        return MSAM(params, rho=spec.rho, normalize=spec.normalize, scale_by_lr=spec.scale_by_lr,
                    **kw)
    raise ValueError(f"unknown optimizer kind {spec.kind!r}; choose sgd, nag, sam or msam")
