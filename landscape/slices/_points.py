"""Evaluating the loss at points ``w + sum_k c_k d_k``: the per-point evaluator, the in-place
parameter mover, the shared setup of a slice and :func:`evaluate_line` (the one call that
evaluates a list of points, e.g. the points of a line)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from analysis import distributed as dist
from analysis.checks import check_first_batch
from analysis.data import DataSource, as_data, to_device
from analysis.evaluation import correct_count, forward, model_device_dtype, model_mode, resolve_loss
from analysis.losses import LossFn, loss_terms
from analysis.params import ParameterSpace

from ..store import tensor_hash, tensors_hash
from ._checks import check_bool, check_metrics, loss_name


class Evaluator:
    """Evaluates ``sum n_b L_b``, correct predictions and ``N`` at the current parameters."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        source: DataSource,
        *,
        want_accuracy: bool,
        cache: bool | str,
        bn_source: DataSource | None,
    ):
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
        self.model, self.loss_fn, self.source = model, loss_fn, source
        self.device, self.dtype = model_device_dtype(model)
        self.want_accuracy = want_accuracy
        self.has_accuracy = want_accuracy
        self.samples = 0
        do_cache = cache is True or (cache == "auto" and source.in_memory)
        self.batches = self._load(source) if do_cache else None
        self.bn_source = bn_source
        self.bn_batches = None
        if bn_source is not None:
            if bn_source is source and self.batches is not None:
                self.bn_batches = self.batches
            elif do_cache:
                self.bn_batches = self._load(bn_source)

    def _load(self, source: DataSource) -> list[tuple[Any, Any, int]]:
        return [
            (to_device(b.inputs, self.device, self.dtype),
             to_device(b.targets, self.device, self.dtype), b.size)
            for b in source
        ]

    def _iter(self, batches: list | None, source: DataSource):
        if batches is not None:
            yield from batches
        else:
            for b in source:
                yield (to_device(b.inputs, self.device, self.dtype),
                       to_device(b.targets, self.device, self.dtype), b.size)

    def data_hash(self) -> str | None:
        """Hash of the cached data (``None`` when not cached)."""
        if self.batches is None:
            return None
        return tensors_hash([(x, y) for x, y, _ in self.batches])

    def recalibrate(self, bns: list[nn.modules.batchnorm._BatchNorm]) -> None:
        """Recompute BatchNorm running statistics at the current parameters.

        As :func:`msam.recalibrate_batchnorm`: only the BatchNorm layers run in training mode
        (dropout stays off), and each batch gets momentum ``n_b / (N_seen + n_b)``, so the
        statistics are the sample-weighted mean over batches (exact for an uneven last batch).
        The caller restores the momenta afterwards.
        """
        for m in bns:
            m.reset_running_stats()
        flags = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            for m in bns:
                m.train()
            seen = 0
            for x, _, n in self._iter(self.bn_batches, self.bn_source):
                for m in bns:
                    m.momentum = n / (seen + n)
                forward(self.model, x)
                seen += n
        finally:
            for m, f in flags:
                m.training = f

    def point(self, out: torch.Tensor) -> None:
        """Write ``[sum t L, correct, T]`` of the current parameters into ``out`` (on device).

        ``t`` is a batch's number of loss terms (:func:`analysis.losses.loss_terms`: samples
        for classification, counted tokens for a language model), so ``out[0] / out[2]`` is the
        dataset loss as :func:`analysis.evaluate` weights it, and ``out[1] / out[2]`` the
        accuracy per sample or per token (:func:`analysis.evaluation.correct_count`). The samples
        of the pass are kept in :attr:`samples`. :func:`evaluate_line` evaluates many points
        through :meth:`terms` and :func:`point_sums` instead (the same numbers, bit for bit).
        """
        out.copy_(point_sums([self.terms()], out.device)[0])

    def terms(self) -> PassTerms:
        """One pass over the data at the current parameters: per batch the loss (a detached
        0-d tensor on the device, nothing read back), its loss terms and its correct count."""
        losses, counts, terms = [], [], []
        samples = 0
        for x, y, n in self._iter(self.batches, self.source):
            samples += n
            outputs = forward(self.model, x)
            loss = self.loss_fn(outputs, y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(
                    "loss_fn must return a scalar tensor (the batch mean), got "
                    + (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__)
                )
            losses.append(loss.detach())
            terms.append(loss_terms(self.loss_fn, x, y, n))
            if self.has_accuracy:
                c = correct_count(outputs, y, self.loss_fn)
                if c is None:
                    self.has_accuracy = False
                else:
                    counts.append(c)
        self.samples = samples
        return PassTerms(losses, counts if self.has_accuracy else None, terms)


class PassTerms(NamedTuple):
    """What one pass over the data leaves for :func:`point_sums`: the per-batch losses (0-d
    tensors), correct counts (``None``: no accuracy) and loss terms ``t_b``."""

    losses: list
    counts: list | None
    terms: list


def _column_sums(values: torch.Tensor) -> torch.Tensor:
    """``sum_b values[:, b]`` added left to right (``0 + v_0 + v_1 + ...``), the order in which
    one point's batches arrive: the same bits as adding them up one batch at a time."""
    acc = values[:, 0].clone()
    for b in range(1, values.shape[1]):
        acc += values[:, b]
    return acc


def point_sums(passes: Sequence[PassTerms], device: torch.device) -> torch.Tensor:
    """The ``(len(passes), 3)`` float64 sums ``[sum_b t_b L_b, sum_b correct_b, sum_b t_b]`` of
    the passes of a line, with a handful of kernels for the whole line instead of a few per
    point and batch: the losses of all points are stacked once, cast to float64, multiplied by
    ``t_b`` and added over the batches in their order (:func:`_column_sums`), which gives the
    bits of the point-by-point float64 accumulation ``0 + t_0 L_0 + t_1 L_1 + ...``. The
    correct counts go the same way (column 1 stays 0 when a pass has no accuracy).
    """
    out = torch.zeros(len(passes), 3, device=device, dtype=torch.float64)
    widths = {len(p.losses) for p in passes}
    if len(widths) != 1 or 0 in widths:  # batches differ per pass (a DataLoader): one by one
        return torch.cat([point_sums([p], device) for p in passes]) if len(passes) > 1 else out
    width = widths.pop()
    terms = torch.tensor([p.terms for p in passes], dtype=torch.float64)
    losses = torch.stack([loss for p in passes for loss in p.losses]).view(len(passes), width)
    out[:, 0] = _column_sums(losses.to(device=device, dtype=torch.float64) * terms.to(device))
    if all(p.counts is not None for p in passes):
        counts = torch.stack([torch.as_tensor(c, device=device) for p in passes for c in p.counts])
        out[:, 1] = _column_sums(counts.view(len(passes), width).to(device, torch.float64))
    out[:, 2] = _column_sums(terms).to(device)
    return out


class Mover:
    """Sets the parameters to ``w + sum_k c_k d_k`` in place with foreach ops."""

    def __init__(self, space: ParameterSpace, origin: torch.Tensor, directions: Sequence[torch.Tensor]):
        self.params = space.params
        self.w = space.unflatten(origin)
        self.ds = [space.unflatten(d) for d in directions]

    def set(self, coeffs: Sequence[float]) -> None:
        """``params <- w + sum_k c_k d_k``: one foreach copy and one foreach axpy per nonzero
        ``c_k``, in this order, so a point's weights depend only on its coefficients."""
        if torch.is_grad_enabled():  # outside a slice's no-grad block (a slice runs inside one)
            with torch.no_grad():
                return self.set(coeffs)
        torch._foreach_copy_(self.params, self.w)
        for c, d in zip(coeffs, self.ds):
            if c != 0.0:
                torch._foreach_add_(self.params, d, alpha=float(c))


class Session:
    """Shared setup of a slice: validation, mode, buffers, exact restore."""

    def __init__(self, model, loss_fn, data, *, metrics, mode, batch_size, cache,
                 recalibrate_bn, bn_data, params, check_deterministic=True, where="slice"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if mode not in ("eval", "train", None):
            raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
        self.model = model
        self.metrics = check_metrics(metrics)
        self.loss_name = loss_name(loss_fn)
        self.loss_fn = resolve_loss(loss_fn)
        self.mode = mode
        self.space = ParameterSpace(model, params)
        self.source = as_data(data, batch_size=batch_size)
        for flag, value in (("check_deterministic", check_deterministic),
                            ("recalibrate_bn", recalibrate_bn)):
            check_bool(flag, value)
        check_first_batch(model, self.loss_fn, self.source, mode, where=where,
                          deterministic=check_deterministic)
        self.recalibrate_bn = bool(recalibrate_bn)
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.recalibrate_bn and not self.bns:
            warnings.warn("recalibrate_bn=True but the model has no BatchNorm layer", stacklevel=3)
            self.recalibrate_bn = False
        bn_source = None
        if self.recalibrate_bn:
            bn_source = self.source if bn_data is None else as_data(bn_data, batch_size=batch_size)
        self.evaluator = Evaluator(
            model, self.loss_fn, self.source, want_accuracy="accuracy" in self.metrics,
            cache=cache, bn_source=bn_source,
        )

    def weight_meta(self, d: torch.Tensor, name: str, w: torch.Tensor) -> dict:
        return {
            "name": name,
            "norm": float(self.space.norm(d)),  # over all ranks' shards under FSDP2
            "numel": int(self.space.full_numel),
            "weight_norm": float(self.space.norm(w)),
            "hash": tensor_hash(d),
        }

    def num_samples(self) -> int:
        """The samples of one pass over the data (all ranks' shards together)."""
        n = int(self.evaluator.samples)
        if self.source.shard:
            t = torch.tensor([float(n)], dtype=torch.float64, device=self.space.device)
            dist.all_reduce_sum(t)
            n = int(t.item())
        return n

    def finish(self, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        n = stats[..., 2]
        loss = stats[..., 0] / n
        loss = np.where(np.isfinite(loss), loss, np.nan)
        acc = stats[..., 1] / n if self._has_acc() else None
        return loss, acc

    def _has_acc(self) -> bool:
        return "accuracy" in self.metrics and self.evaluator.has_accuracy

    def run(self, body: Callable[[torch.Tensor], Any]) -> Any:
        """Run ``body(w)`` (``w``: the saved flat weights) with the mode set, no autograd, and
        parameters and buffers restored exactly at the end."""
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        momenta = [(m, m.momentum) for m in self.bns]
        try:
            with self.space.restored() as w, model_mode(self.model, self.mode), torch.no_grad():
                return body(w)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mom in momenta:
                m.momentum = mom


def evaluate_line(session: Session, mover: Mover, coords: Sequence[Sequence[float]],
                  bar: Any = None) -> torch.Tensor:
    """The sums ``[sum_b n_b L_b, correct, N]`` at the points ``w + sum_k c_k d_k``, one row per
    coefficient tuple ``c`` of ``coords`` (the points of a line ``w + alpha d``, of a grid row
    ``w + x d1 + y d2`` at fixed ``x``, or the origin ``[(0, ...)]``).

    This is the one place a slice evaluates points: per point the parameters are set in place
    from the saved ``w`` (:class:`Mover`), BatchNorm statistics are recomputed if
    ``session.recalibrate_bn``, and one pass over the data leaves its per-batch losses on the
    model's device (:meth:`Evaluator.terms`, no read-back, no per-point accumulation kernels);
    the ``float64`` sums of the whole line are formed once at the end (:func:`point_sums`) and,
    with sharded data, the ``(len(coords), 3)`` sums are all-reduced once.
    Must run inside :meth:`Session.run` (mode set, no autograd, weights restored after).

    Args:
        session: the slice's shared setup (model, data, evaluator, BatchNorm layers).
        mover: sets the parameters to ``w + sum_k c_k d_k``.
        coords: the coefficient tuples, one per point.
        bar: a tqdm bar advanced by one per point, or ``None``.

    Returns:
        A ``(len(coords), 3)`` float64 tensor on the model's device; the loss at point ``p`` is
        ``out[p, 0] / out[p, 2]`` (see :meth:`Session.finish`).
    """
    passes = []
    for c in coords:
        mover.set(c)
        if session.recalibrate_bn:
            session.evaluator.recalibrate(session.bns)
        passes.append(session.evaluator.terms())
        if bar is not None:
            bar.update(1)
    stats = point_sums(passes, session.space.device)
    if session.source.shard:
        dist.all_reduce_sum(stats)
    return stats
