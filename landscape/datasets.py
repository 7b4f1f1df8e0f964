"""The bundled data: the 8x8 handwritten digits (1,797 images, 10 classes).

The images ship inside the package (``landscape/data/digits.npz``, the UCI "Optical Recognition
of Handwritten Digits" test set as distributed with scikit-learn, CC BY 4.0), so nothing is
downloaded at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

__all__ = ["Digits", "load_digits"]


@dataclass(frozen=True)
class Digits:
    """Train/test tensors: images ``(N, 1, 8, 8)`` scaled to [0, 1], labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test


def load_digits(
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    label_noise: float = 0.0,
    train_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    flatten: bool = False,
) -> Digits:
    """Load the bundled digits with a seeded, stratification-free random split.

    Args:
        test_fraction: fraction of the 1,797 images held out for testing.
        seed: seed of the split (and of the label noise).
        label_noise: fraction of TRAINING labels replaced by a uniformly drawn different class
            (makes generalization gaps measurable on this easy data set).
        train_size: keep only the first ``train_size`` training images after shuffling.
        dtype: floating dtype of the images.
        flatten: return images as ``(N, 64)`` instead of ``(N, 1, 8, 8)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise!r}")
    with resources.files("landscape").joinpath("data/digits.npz").open("rb") as fh:
        npz = np.load(fh)
        images, labels = npz["images"], npz["labels"]
    x = torch.from_numpy(images.astype(np.float32) / 16.0).to(dtype).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    if flatten:
        x = x.reshape(len(x), -1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    if train_size is not None:
        if not 0 < train_size <= len(train_idx):
            raise ValueError(f"train_size must be in [1, {len(train_idx)}], got {train_size!r}")
        train_idx = train_idx[:train_size]
    y_train = y[train_idx].clone()
    if label_noise > 0:
        flip = torch.rand(len(y_train), generator=g) < label_noise
        shift = torch.randint(1, 10, (len(y_train),), generator=g)
        y_train[flip] = (y_train[flip] + shift[flip]) % 10
    return Digits(x[train_idx].contiguous(), y_train, x[test_idx].contiguous(), y[test_idx].clone())
