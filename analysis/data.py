"""One way in for data: a tensor pair, a list of batches, or a DataLoader, weighted exactly.

Every routine of the toolkit that evaluates a loss over "the data" accepts ``data`` in one of
these forms and turns it into a :class:`DataSource`:

* a pair ``(X, y)`` of tensors (split into batches of ``batch_size``; one batch if ``None``),
* a list (or tuple) of batches ``[(x_1, y_1), (x_2, y_2), ...]``,
* a ``torch.utils.data.DataLoader`` (or any re-iterable yielding ``(inputs, targets)``),
* a dict of tensors (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``, e.g. a
  tokenizer's output; split like a pair), or batches that are such dicts (a list of dicts, a
  DataLoader yielding dicts, as Hugging Face collators do).

Inputs may be a tensor, a tuple of tensors or a dict of tensors; targets are a tensor whose first
dimension counts the samples. A batch that is a single dict is passed to the model as keyword
arguments and is also its own target (``Batch.targets is Batch.inputs``), so a language-model
loss can read ``labels`` / ``attention_mask`` from it (:mod:`analysis.losses`). The loss function is assumed to return the **mean** over the batch
(as ``F.cross_entropy`` and ``F.mse_loss`` do by default); dataset quantities are then weighted
exactly by the number of loss terms, the samples by default,

    L(w) = sum_b (n_b / N) * L_b(w),      N = sum_b n_b,

also when the last batch is smaller (a loss with ``num_terms``, e.g. a language-model loss over
tokens, weights by its terms instead: :func:`analysis.losses.loss_terms`). Consumers accumulate ``n_b * L_b`` and divide by ``N`` at
the end, so ``N`` never has to be known in advance. Under ``torch.distributed`` a source built
with ``shard=True`` yields only this rank's batches (batch ``i`` goes to rank ``i % world``; a
DataLoader whose sampler is a ``DistributedSampler`` is taken as already split); consumers then
all-reduce both their weighted sums and the sample count ``N`` (see :mod:`analysis.distributed`).
Note that ``DistributedSampler`` pads ranks to equal size by repeating samples unless the dataset
size divides evenly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import distributed as dist

__all__ = ["Batch", "DataSource", "as_data", "to_device", "batch_size_of", "slice_samples",
           "microbatches"]

#: What every entry point accepts as ``data``: an ``(X, y)`` pair of tensors (split by
#: ``batch_size`` where a function has one), a dict of tensors (one batch), a list of ``(x, y)``
#: batches or batch dicts, a ``DataLoader``, another re-iterable of batches, or a
#: :class:`DataSource` (:func:`as_data` turns each into one).
Data = Union[tuple, list, dict, DataLoader, "DataSource", Iterable]


@dataclass
class Batch:
    """One batch: ``inputs`` (tensor, tuple or dict), ``targets`` and its sample count ``size``."""

    inputs: Any
    targets: Any
    size: int
    index: int = 0


def batch_size_of(obj: Any) -> int:
    """Number of samples in a tensor / tuple / dict (first dimension of the first tensor)."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise ValueError("a batch tensor must have a batch dimension, got a 0-d tensor")
        return int(obj.shape[0])
    if isinstance(obj, Mapping):
        for v in obj.values():
            return batch_size_of(v)
    if isinstance(obj, (tuple, list)) and obj:
        return batch_size_of(obj[0])
    raise TypeError(f"cannot count the samples of a {type(obj).__name__}")


def to_device(obj: Any, device: torch.device | str | None, dtype: torch.dtype | None = None) -> Any:
    """Move tensors in ``obj`` (nested tuples/lists/dicts) to ``device``.

    Floating-point tensors are also cast to ``dtype`` when given (so that float32 data can feed a
    float64 model); integer tensors (class labels) keep their dtype.
    """
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point() and obj.dtype != dtype:
            return obj.to(device=device, dtype=dtype, non_blocking=True)
        return obj.to(device=device, non_blocking=True) if device is not None else obj
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device, dtype) for v in obj)
    return obj


def slice_samples(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a tensor / dict / tuple batch (views; along the first
    dimension of every tensor, other values as they are)."""
    if isinstance(obj, Mapping):
        return {k: slice_samples(v, start, stop) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_samples(t, start, stop) for t in obj)
    return obj[start:stop] if isinstance(obj, torch.Tensor) else obj


def microbatches(inputs: Any, targets: Any, size: int,
                 microbatch_size: int | None) -> Iterator[tuple[Any, Any, int]]:
    """``(inputs, targets, samples)`` of consecutive slices of at most ``microbatch_size``
    samples of one batch of ``size`` samples (the batch itself for ``None`` or a batch that is
    not larger). Targets that are the inputs (a batch dict) stay the same object per slice.

    Weighted by their loss terms (:func:`analysis.losses.loss_terms`), the slices' batch-mean
    losses add up to the batch's: ``N_b L_b = sum_m N_m L_m``, also for token-weighted
    language-model losses with padding (a slice's terms are its own counted tokens).
    """
    if microbatch_size is None or size <= microbatch_size:
        yield inputs, targets, size
        return
    same = targets is inputs
    for start in range(0, size, microbatch_size):
        stop = min(start + microbatch_size, size)
        x = slice_samples(inputs, start, stop)
        yield x, (x if same else slice_samples(targets, start, stop)), stop - start


def _check_count(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _is_dict_data(data: Any) -> bool:
    return (isinstance(data, Mapping) and bool(data)
            and all(isinstance(v, torch.Tensor) for v in data.values()))


def _is_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (torch.Tensor, Mapping))
        and isinstance(data[1], torch.Tensor)
        and not isinstance(data[0], (tuple, list))
    )


class DataSource:
    """A re-iterable view of the data that yields :class:`Batch` objects.

    ``kind`` says which form the data has: ``"pair"``, ``"dict"`` (a dict of tensors, split
    like a pair), ``"batches"`` (a list), ``"loader"`` or ``"iterable"``; the first three are
    :attr:`in_memory`.

    Args:
        data: ``(X, y)``, a dict of tensors, a list of ``(x, y)`` batches (or batch dicts), a
            DataLoader, or another DataSource.
        batch_size: batch size used to split a tensor pair (``None``: one batch). Ignored for
            the other forms.
        max_samples: stop after this many samples (the last batch is truncated to fit).
        shard: under an initialized process group, yield only this rank's batches. A DataLoader
            whose sampler is a ``DistributedSampler`` is always treated as sharded.

    Raises:
        ValueError: for empty data, a pair whose inputs and targets disagree in length, a
            non-positive ``batch_size`` or ``max_samples``.
        TypeError: for an object that is none of the accepted forms.
    """

    def __init__(
        self,
        data: Data,
        *,
        batch_size: int | None = None,
        max_samples: int | None = None,
        shard: bool = False,
    ):
        if isinstance(data, DataSource):
            batch_size = batch_size if batch_size is not None else data.batch_size
            max_samples = max_samples if max_samples is not None else data.max_samples
            shard = shard or data.shard
            data = data.data
        _check_count("batch_size", batch_size)
        _check_count("max_samples", max_samples)
        if not isinstance(shard, bool):
            raise TypeError(f"shard must be True or False, got {shard!r}")
        self.data = data
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.shard = shard
        if _is_pair(data):
            x, y = data
            nx, ny = batch_size_of(x), batch_size_of(y)
            if nx != ny:
                raise ValueError(f"inputs have {nx} samples but targets have {ny}")
            if ny == 0:
                raise ValueError("data is empty (0 samples)")
            self.kind = "pair"
        elif _is_dict_data(data):
            sizes = {k: batch_size_of(v) for k, v in data.items()}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"the tensors of the data dict disagree in length: {sizes}")
            if next(iter(sizes.values())) == 0:
                raise ValueError("data is empty (0 samples)")
            self.kind = "dict"
        elif isinstance(data, DataLoader):
            self.kind = "loader"
            if isinstance(data.sampler, DistributedSampler) and dist.is_distributed():
                self.shard = True  # already split across ranks: consumers must all-reduce
        elif isinstance(data, (list, tuple)):
            if len(data) == 0:
                raise ValueError("data is empty (an empty list of batches)")
            for i, b in enumerate(data):
                if not ((isinstance(b, (tuple, list)) and len(b) == 2) or isinstance(b, Mapping)):
                    raise TypeError(
                        f"batch {i} is a {type(b).__name__}; expected an (inputs, targets) pair "
                        "or a dict of tensors"
                    )
            self.kind = "batches"
        elif isinstance(data, torch.Tensor):
            raise TypeError(
                "data is a single tensor; pass an (inputs, targets) pair, a list of batches or "
                "a DataLoader"
            )
        elif isinstance(data, Mapping):
            raise TypeError(
                "a data dict must map names to tensors of equal length, got values of types "
                f"{sorted({type(v).__name__ for v in data.values()})}" if data else
                "data is an empty dict"
            )
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Iterator)):
            self.kind = "iterable"
        else:
            raise TypeError(
                f"unsupported data of type {type(data).__name__}; pass an (inputs, targets) pair "
                "of tensors, a list of (inputs, targets) batches, or a DataLoader"
            )
        self._num_samples: int | None = None

    def __repr__(self) -> str:
        n = self._num_samples if self._num_samples is not None else "?"
        return f"DataSource(kind={self.kind!r}, num_samples={n})"

    @property
    def in_memory(self) -> bool:
        """True for data held in memory, which consumers may cache on the device: a tensor pair,
        a dict of tensors (e.g. one tokenizer batch) or a list of batches; False for a
        DataLoader or another iterable, which is re-iterated."""
        return self.kind in ("pair", "dict", "batches")

    @property
    def is_shuffled(self) -> bool:
        """True when iterating twice can give different batches (a shuffling DataLoader)."""
        return self.kind == "loader" and isinstance(self.data.sampler, RandomSampler)

    def _raw(self) -> Iterator[tuple[Any, Any]]:
        if self.kind == "pair":
            x, y = self.data
            n = batch_size_of(y)
            bs = self.batch_size or n
            for start in range(0, n, bs):
                sl = slice(start, min(start + bs, n))
                xb = {k: v[sl] for k, v in x.items()} if isinstance(x, Mapping) else x[sl]
                yield xb, y[sl]
        elif self.kind == "dict":
            n = batch_size_of(self.data)
            bs = self.batch_size or n
            for start in range(0, n, bs):
                b = {k: v[start:start + bs] for k, v in self.data.items()}
                yield b, b
        else:
            for b in self.data:
                if isinstance(b, Mapping):  # a batch dict is its own target
                    yield b, b
                    continue
                if not (isinstance(b, (tuple, list)) and len(b) >= 2):
                    raise TypeError(
                        f"the data yielded a {type(b).__name__}; expected (inputs, targets)"
                    )
                yield b[0], b[1]

    def __iter__(self) -> Iterator[Batch]:
        seen = 0
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.shard else (0, 1)
        # a DataLoader with a DistributedSampler is already split across ranks
        presharded = self.kind == "loader" and isinstance(self.data.sampler, DistributedSampler)
        count = 0
        for i, (x, y) in enumerate(self._raw()):
            n = batch_size_of(y)
            if self.max_samples is not None:
                if seen >= self.max_samples:
                    break
                if seen + n > self.max_samples:
                    keep = self.max_samples - seen
                    same = y is x
                    x = slice_samples(x, 0, keep)
                    y, n = (x if same else slice_samples(y, 0, keep)), keep
            seen += n
            if n == 0:
                continue
            if presharded or world == 1 or i % world == rank:
                count += n
                yield Batch(x, y, n, i)
        if seen == 0:
            raise ValueError("data is empty (it yielded no samples)")
        self._num_samples = count

    def num_samples(self) -> int:
        """Number of samples this source yields on this rank (one pass if not yet known).

        On one process this is the dataset size ``N``; with ``shard=True`` it is this rank's
        share, and consumers all-reduce it together with their weighted sums.
        """
        if self._num_samples is None:
            for _ in self:
                pass
        return self._num_samples  # type: ignore[return-value]


def as_data(
    data: Data,
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
    shard: bool = False,
) -> DataSource:
    """Wrap any accepted data form into a :class:`DataSource` (see the module docstring).

    Raises:
        ValueError: for ``None`` or empty data and non-positive counts.
        TypeError: for data of another form and counts that are not integers (a bool included).
    """
    if data is None:
        raise ValueError("data is required (got None)")
    return DataSource(data, batch_size=batch_size, max_samples=max_samples, shard=shard)
