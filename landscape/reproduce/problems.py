"""The model and data of the reproduction: :class:`Problem` and :func:`digits_problem`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from analysis.data import Data, as_data
from analysis.evaluation import resolve_loss
from analysis.losses import LossSpec

from .config import ReproConfig


@dataclass
class Problem:
    """A model factory and data: the small-scale digits by default, or the user's.

    Args:
        model_fn: ``seed -> nn.Module`` (a fresh, initialized model; the global RNG is seeded
            with ``seed`` before the call).
        train: training data: an ``(X, y)`` pair (shuffled per epoch with a seeded generator
            and split into ``config.batch_size`` batches) or a DataLoader (used as is; it
            shuffles itself).
        test: test data in any form :func:`analysis.data.as_data` accepts.
        probe: a fixed, small, deterministic part of the training data for Hessians, curvature
            and 2-D surfaces (default: the first ``config.probe_samples`` of an ``(X, y)``
            ``train``; required for a DataLoader ``train``).
        loss_fn: ``"cross_entropy"`` (default), ``"mse"`` or a callable (e.g. with label
            smoothing); the training loss and every measured loss.
        name: a label recorded in the JSON.
    """

    model_fn: Callable[[int], nn.Module]
    train: Data
    test: Data
    probe: Data | None = None
    loss_fn: LossSpec = "cross_entropy"
    name: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        if not callable(self.model_fn):
            raise TypeError(f"Problem.model_fn must be callable, got {type(self.model_fn).__name__}")
        self.loss = resolve_loss(self.loss_fn)
        as_data(self.test)  # validates the form
        if not is_pair(self.train):
            as_data(self.train)

    def probe_data(self, config: ReproConfig) -> Data:
        """The probe set (see the class docstring)."""
        if self.probe is not None:
            return self.probe
        if is_pair(self.train):
            x, y = self.train
            n = min(config.probe_samples, len(y))
            return x[:n], y[:n]
        raise ValueError(
            "Problem.probe is required when `train` is a DataLoader: pass a small fixed "
            "(X, y) subset of the training data"
        )

    def full_train(self) -> Data:
        """The training set for evaluation (a pair is evaluated in batches of 512)."""
        return self.train


def is_pair(data: Any) -> bool:
    """Whether ``data`` is an ``(X, y)`` pair of tensors."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], torch.Tensor) and isinstance(data[1], torch.Tensor))


def digits_problem(config: ReproConfig | None = None, *, data_seed: int = 0) -> Problem:
    """The small-scale problem: bundled digits with label noise, ``digits_cnn(config.width)``.

    The split and the noisy labels are fixed (``data_seed``); seeds vary the initialization and
    the batch order, so optimizers are compared on the same data (paired).
    """
    from ..datasets import load_digits
    from ..models import digits_cnn

    config = config if config is not None else ReproConfig()
    d = load_digits(test_fraction=config.test_fraction, seed=data_seed,
                    label_noise=config.label_noise, train_size=config.train_size)
    width = config.width

    def model_fn(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return digits_cnn(width)

    desc = (f"bundled 8x8 digits, {len(d.y_train)} training images with "
            f"{config.label_noise:.0%} of the labels flipped, {len(d.y_test)} clean test images; "
            f"digits_cnn(width={width}) with BatchNorm")
    return Problem(model_fn, d.train, d.test, loss_fn="cross_entropy", name="digits",
                   description=desc)


# ================================================================================================


def epoch_batches(train: Data, batch_size: int, gen: torch.Generator) -> Iterator[tuple[Any, Any]]:
    """One epoch of ``(x, y)`` batches: a tensor pair shuffled by ``gen`` and cut into
    ``batch_size`` rows, any other data source in its own order and batches."""
    if is_pair(train):
        x, y = train
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]
    else:
        for b in as_data(train):
            yield b.inputs, b.targets


def steps_per_epoch(train: Data, batch_size: int) -> int:
    """Optimizer steps of one epoch of :func:`epoch_batches` (``ceil(N / batch_size)`` for a pair)."""
    if is_pair(train):
        return math.ceil(len(train[1]) / batch_size)
    try:
        return len(train)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in as_data(train))
