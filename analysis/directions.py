"""Directions in parameter space for landscape slices, sharpness probes and curvature.

A *direction* is a flat 1-D tensor over the trainable parameters of a model, in the order of
:class:`analysis.ParameterSpace` (the same convention as the Hessian engine's
eigenvectors), on the model's device and in its dtype. This module builds the directions the
loss-landscape literature uses:

* :func:`random_direction`: Gaussian ``d ~ N(0, I)``, then normalized per output filter
  ("filter normalization", Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"),
  per tensor ("layer"), over the whole model ("model") or not at all; 1-D tensors (biases,
  BatchNorm scales and shifts) zeroed by default (``ignore="biasbn"``), as in Li et al.'s
  ``--xignore biasbn``.
* :func:`gradient_direction`: the dataset gradient ``g = sum_b n_b grad L_b(w) / N``.
* :func:`momentum_direction`: the optimizer's momentum (``momentum_buffer`` of torch SGD and
  :class:`msam.MSAM`, ``exp_avg`` of AdamW and AdamW-MSAM, the base optimizer's state of the
  SAM wrapper), the direction MSAM perturbs along (Becker et al. 2024, "Momentum-SAM").
* :func:`interpolation_direction`: ``w_b - w_a`` between two models (Goodfellow et al. 2015).
* :func:`pca_directions`: the first principal directions of a trajectory of checkpoints,
  ``w_i - w_final`` (Li et al. 2018, Sec. 7), with the explained variance ratio.
* :func:`orthogonalize` and :func:`normalize_direction` to combine them (e.g. a random
  direction made orthogonal to the gradient, or a filter-normalized Hessian eigenvector).

Example:
    >>> import torch
    >>> from analysis import random_direction
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> d1 = random_direction(model, seed=0)
    >>> d2 = random_direction(model, seed=1, orthogonal_to=d1)
    >>> abs(float(d1 @ d2)) < 1e-5
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from .checks import check_first_batch
from .data import Data, as_data, to_device
from .evaluation import forward, model_mode, resolve_loss
from .losses import LossSpec, loss_terms
from .params import ParameterSpace
from .pca import state_vector

__all__ = ["NORMALIZATIONS", "as_direction", "orthogonalize", "normalize_direction"]

#: Accepted values of ``normalization``.
NORMALIZATIONS = ("filter", "layer", "model", None)
_IGNORES = ("biasbn", None)
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def _space(model: nn.Module, params: Sequence[str | nn.Parameter] | None) -> ParameterSpace:
    if isinstance(model, ParameterSpace):
        return model
    return ParameterSpace(model, params)


def _check_options(normalization: str | None, ignore: str | None) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
        )
    if ignore not in _IGNORES:
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")


def as_direction(direction: Any, space: ParameterSpace, what: str = "direction", *,
                 nonzero: str | None = None) -> torch.Tensor:
    """A direction checked against ``space``, returned flat, detached and contiguous on the
    space's device and in its dtype (the one validator of the toolkit's directions).

    Accepted: a flat tensor or numpy array over the space (ParameterSpace order), a list or
    tuple of per-parameter tensors (one per parameter, in order) or a ``{name: tensor}`` dict
    with exactly the space's names.

    Args:
        direction: the direction.
        space: the parameter space it lives in.
        what: its name in error messages.
        nonzero: refuse the zero vector, with this reason appended to the message (default
            ``None``: zero is allowed).

    Raises:
        TypeError: not a tensor, a list of tensors or a dict; not floating point.
        ValueError: the wrong length or shapes, dict keys that do not match, non-finite
            entries, or the zero vector when ``nonzero`` is given.
    """
    if isinstance(direction, np.ndarray):
        direction = torch.from_numpy(direction)
    if isinstance(direction, Mapping):
        missing = [n for n in space.names if n not in direction]
        extra = [n for n in direction if n not in space.names]
        if missing or extra:
            raise ValueError(f"{what} keys do not match the parameters: missing {missing}, "
                             f"unexpected {extra}")
        direction = [direction[n] for n in space.names]
    if isinstance(direction, (list, tuple)):
        if not all(isinstance(t, (torch.Tensor, np.ndarray)) for t in direction):
            raise TypeError(f"{what} must be a flat tensor, a list of per-parameter tensors or a "
                            "dict; got a list that is not all tensors")
        direction = space.flatten([torch.as_tensor(t) for t in direction])
    if not isinstance(direction, torch.Tensor):
        raise TypeError(f"{what} must be a flat torch.Tensor, a list of tensors or a dict, got "
                        f"{type(direction).__name__}")
    if not direction.is_floating_point():
        raise TypeError(f"{what} must be floating point, got dtype {direction.dtype}")
    space.check_vector(direction, what)
    d = direction.detach().to(device=space.device, dtype=space.dtype).contiguous()
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"{what} contains non-finite values")
    if nonzero is not None and not bool(space.all_reduce((d != 0).any().reshape(1).double())[0]):
        raise ValueError(f"{what} is the zero vector (zero norm); {nonzero}")
    return d


def normalize_direction(
    direction: torch.Tensor,
    model: nn.Module,
    normalization: str | None = "filter",
    ignore: str | None = "biasbn",
    *,
    params: Sequence[str | nn.Parameter] | None = None,
) -> torch.Tensor:
    """Rescale a direction to the scale of the weights (returns a new tensor).

    With ``w`` the model's current weights and ``d`` the direction, split per parameter tensor:

    * ``"filter"`` (Li et al. 2018): for every tensor and every output filter ``f`` (the slice
      ``[f, ...]`` along dimension 0, e.g. one output channel of a convolution or one row of a
      linear layer; for a 1-D tensor each entry), ``d_f <- d_f * ||w_f|| / ||d_f||``;
    * ``"layer"``: ``d_p <- d_p * ||w_p|| / ||d_p||`` for each parameter tensor ``p``;
    * ``"model"``: ``d <- d * ||w|| / ||d||`` over all kept entries;
    * ``None``: no rescaling.

    ``ignore="biasbn"`` (default) sets the 1-D tensors (biases, BatchNorm weights and biases) to
    zero first, so they stay fixed along the slice. Where a filter of ``w`` or of ``d`` is zero
    (e.g. a zero-initialized BatchNorm bias or a pruned channel) the result is zero there; there
    is no division by zero.

    Args:
        direction: flat tensor over the trainable parameters (ParameterSpace order).
        model: the model whose weights set the scale.
        normalization: ``"filter"`` (default), ``"layer"``, ``"model"`` or ``None``.
        ignore: ``"biasbn"`` (default) or ``None``.
        params: restrict the parameter space (see :class:`ParameterSpace`).

    Returns:
        The normalized direction, on the model's device and in its dtype.

    Raises:
        ValueError: for a direction of the wrong length or an unknown option.
    """
    _check_options(normalization, ignore)
    space = _space(model, params)
    d = as_direction(direction, space).clone()
    views = space.unflatten(d)
    weights = [p.detach() for p in space.params]
    if ignore == "biasbn":
        for v in views:
            if v.dim() <= 1:
                v.zero_()
    if normalization is None:
        return d
    if normalization == "model":
        # only the kept (not ignored) tensors count towards ||w||
        kept = [i for i, v in enumerate(views) if not (ignore == "biasbn" and v.dim() <= 1)]
        if not kept:
            return d
        wn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(weights[i]) for i in kept]))
        dn = torch.linalg.vector_norm(d)
        if space.sharded:  # the norms of the whole model: every rank's shards
            wn, dn = (space.all_reduce(torch.stack([wn, dn]).double() ** 2).sqrt()
                      .to(d.dtype).unbind())
        d.mul_(torch.where(dn > 0, wn / torch.where(dn > 0, dn, 1), 0))
        return d
    layer_norms = _layer_norms(space, views, weights) if normalization == "layer" else None
    for i, (v, w) in enumerate(zip(views, weights)):
        if ignore == "biasbn" and v.dim() <= 1:
            continue
        if normalization == "layer" or v.dim() == 0:
            wn, dn = (torch.linalg.vector_norm(w), torch.linalg.vector_norm(v)) \
                if layer_norms is None else layer_norms[i]
            v.mul_(torch.where(dn > 0, wn / torch.where(dn > 0, dn, 1), 0))
        else:  # filter
            v2, w2 = v.reshape(v.shape[0], -1), w.reshape(w.shape[0], -1)
            wn = torch.linalg.vector_norm(w2, dim=1, keepdim=True)
            dn = torch.linalg.vector_norm(v2, dim=1, keepdim=True)
            v2.mul_(torch.where(dn > 0, wn / torch.where(dn > 0, dn, 1), 0))
    return d


def _layer_norms(space: ParameterSpace, views: Sequence[torch.Tensor],
                 weights: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``(||w_p||, ||d_p||)`` of every parameter tensor over all ranks' shards (one all-reduce
    of ``2 P`` squared norms); ``None`` for a space that is not sharded (computed per tensor)."""
    if not space.sharded:
        return None
    sq = torch.stack([torch.linalg.vector_norm(t).double() ** 2
                      for w, v in zip(weights, views) for t in (w, v)])
    norms = space.all_reduce(sq).sqrt().to(views[0].dtype)
    return [(norms[2 * i], norms[2 * i + 1]) for i in range(len(views))]


def project_out(d: torch.Tensor, basis: Sequence[torch.Tensor],
                space: ParameterSpace | None = None) -> torch.Tensor:
    """One Gram-Schmidt pass: ``d <- d - (d . q) q`` for each unit vector ``q`` of the
    orthonormal ``basis`` in turn (modified Gram-Schmidt), in ``d``'s dtype. With a sharded
    ``space`` the vectors are this rank's shards and each ``d . q`` is all-reduced."""
    for q in basis:
        d = d - ((d @ q) if space is None else space.dot(d, q).to(d.dtype)) * q
    return d


def orthogonalize(
    direction: torch.Tensor,
    against: torch.Tensor | Sequence[torch.Tensor],
    *,
    keep_norm: bool = False,
    space: ParameterSpace | None = None,
) -> torch.Tensor:
    """Gram-Schmidt: remove from ``direction`` its components along ``against``.

    ``d2 <- d2 - (d2 . d1) / (d1 . d1) * d1`` for one ``d1``; for several, they are first made
    orthonormal among themselves (modified Gram-Schmidt in float64) and then projected out.

    Args:
        direction: the flat direction ``d2`` to orthogonalize.
        against: a flat direction ``d1`` or a sequence of them (same length as ``d2``).
        keep_norm: rescale the result to ``||d2||`` (keeps the scale of a filter-normalized
            direction; filter norms then hold only approximately).
        space: the parameter space of a sharded (FSDP2) model: the vectors are this rank's
            shards and the inner products are summed over the ranks (default: plain vectors).

    Returns:
        A new tensor orthogonal to every direction in ``against`` (up to rounding), in the dtype
        and on the device of ``direction``.

    Raises:
        ValueError: if shapes differ, an ``against`` direction is zero, or ``direction`` lies in
            their span (the result would be zero).
    """
    if not isinstance(direction, torch.Tensor):
        raise TypeError(f"direction must be a torch.Tensor, got {type(direction).__name__}")
    if direction.dim() != 1:
        raise ValueError(f"direction must be flat (1-D), got shape {tuple(direction.shape)}")
    if not isinstance(against, (torch.Tensor, list, tuple)):
        raise TypeError(f"against must be a flat tensor or a list of them, got {type(against).__name__}")
    basis_in = [against] if isinstance(against, torch.Tensor) else list(against)
    d = direction.detach().to(torch.float64)
    basis: list[torch.Tensor] = []
    for i, b in enumerate(basis_in):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"against[{i}] must be a torch.Tensor, got {type(b).__name__}")
        if b.shape != direction.shape:
            raise ValueError(
                f"against[{i}] has shape {tuple(b.shape)}, direction has {tuple(direction.shape)}"
            )
        u = project_out(b.detach().to(device=d.device, dtype=torch.float64), basis, space)
        nu = _norm(u, space)
        if not nu > 0:
            raise ValueError(
                f"against[{i}] is zero (or in the span of the previous ones); cannot orthogonalize"
            )
        basis.append(u / nu)
    norm0 = _norm(d, space)
    d = project_out(project_out(d, basis, space), basis, space)  # a second pass for full accuracy
    nd = _norm(d, space)
    if not nd > 1e-12 * max(float(norm0), 1e-300):
        raise ValueError("direction lies in the span of `against`; the orthogonalized direction is zero")
    if keep_norm:
        d = d * (norm0 / nd)
    return d.to(direction.dtype)


def _norm(v: torch.Tensor, space: ParameterSpace | None) -> torch.Tensor:
    return torch.linalg.vector_norm(v) if space is None else space.norm(v)


def random_direction(
    model: nn.Module,
    *,
    normalization: str | None = "filter",
    ignore: str | None = "biasbn",
    seed: int = 0,
    params: Sequence[str | nn.Parameter] | None = None,
    orthogonal_to: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """A seeded Gaussian direction, normalized to the scale of the weights (Li et al. 2018).

    ``d ~ N(0, I)`` is drawn with its own ``torch.Generator`` (the global RNG is untouched) on
    the CPU in float64, so the same seed gives the same direction on every device and dtype;
    then :func:`normalize_direction` applies ``normalization`` and ``ignore``. With
    ``orthogonal_to``, the normalized direction is made orthogonal to the given direction(s)
    and rescaled to its previous norm (:func:`orthogonalize` with ``keep_norm=True``); in high
    dimension this changes it very little (random vectors are nearly orthogonal), and the
    filter norms then hold approximately. On an FSDP2-sharded model (a sharded
    :class:`ParameterSpace`) the direction is this rank's shards of the one-process direction
    with the same seed: the draw's entries of this rank (no rank holds the full draw), filters
    normalized locally (``Shard(0)`` keeps every filter on one rank), layer and model norms and
    the orthogonalization summed over the ranks.

    Args:
        model: the model (its weights set the scale, its parameters the space).
        normalization: ``"filter"`` (default), ``"layer"``, ``"model"`` or ``None``.
        ignore: ``"biasbn"`` (default: 1-D tensors are zero) or ``None``.
        seed: seed of the generator.
        params: restrict the parameter space (see :class:`ParameterSpace`).
        orthogonal_to: a direction or a sequence of directions to be orthogonal to.

    Returns:
        A flat tensor on the model's device and in its dtype.
    """
    _check_options(normalization, ignore)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    space = _space(model, params)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # a sharded space (FSDP2): this rank's entries of the one-process draw, drawn in chunks
    raw = torch.randn(space.numel, generator=gen, dtype=torch.float64) if space.shards is None \
        else space.shards.randn(gen)
    d = normalize_direction(raw.to(device=space.device, dtype=space.dtype), space, normalization, ignore)
    if orthogonal_to is not None:
        against = [orthogonal_to] if isinstance(orthogonal_to, torch.Tensor) else list(orthogonal_to)
        against = [as_direction(a, space, "orthogonal_to") for a in against]
        d = orthogonalize(d, against, keep_norm=True, space=space if space.sharded else None)
    return d


def gradient_direction(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    *,
    params: Sequence[str | nn.Parameter] | None = None,
    mode: str | None = "eval",
    batch_size: int | None = None,
) -> torch.Tensor:
    """The dataset gradient ``g = grad L(w) = sum_b t_b grad L_b(w) / T`` (``t_b`` the loss terms of
    batch ``b``: samples, or counted tokens for a language-model loss; ``T = sum_b t_b``).

    Computed with ``torch.autograd.grad``, so the parameters' ``.grad`` fields are not touched;
    the model's train/eval flags and its buffers (BatchNorm running statistics, which
    ``mode="train"`` would update) are restored. With a sharded data source the weighted sum and
    ``N`` are all-reduced over ranks.

    Args:
        model: the network.
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable returning the batch-mean loss.
        data: an ``(X, y)`` pair, a list of batches or a DataLoader (see :mod:`analysis.data`).
        params: restrict the parameter space.
        mode: ``"eval"`` (default: BatchNorm uses running statistics), ``"train"`` or ``None``.
        batch_size: batch size to split a tensor pair.

    Returns:
        The flat gradient (ParameterSpace order, model's device and dtype). It points uphill;
        use its negative for the descent direction.
    """
    loss_fn = resolve_loss(loss_fn)
    space = _space(model, params)
    source = as_data(data, batch_size=batch_size)
    # the first batch against the model and the loss (one-line errors instead of torch's)
    check_first_batch(model, loss_fn, source, mode, where="gradient_direction()",
                      deterministic=False)
    total = torch.zeros(space.numel + 1, device=space.device, dtype=torch.float64)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # train-mode BN would move them
    try:
        with model_mode(model, mode), torch.enable_grad():
            for batch in source:
                x = to_device(batch.inputs, space.device, space.dtype)
                y = to_device(batch.targets, space.device, space.dtype)
                loss = loss_fn(forward(model, x), y)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError("loss_fn must return a scalar tensor")
                grads = torch.autograd.grad(loss, space.params, allow_unused=True)
                t = loss_terms(loss_fn, x, y, batch.size)  # tokens for an LM, as the loss
                total[:-1] += space.flatten(list(grads)).to(torch.float64) * t
                total[-1] += t
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if source.shard:
        dist.all_reduce_sum(total)
    return (total[:-1] / total[-1]).to(space.dtype)


def _momentum_state(optimizer: Any) -> tuple[Any, str | None]:
    """The optimizer whose state holds the momentum (the base optimizer of a SAM wrapper)."""
    candidates = [optimizer]
    base = getattr(optimizer, "base_optimizer", None)
    if base is not None:
        candidates.append(base)
    for opt in candidates:
        state = getattr(opt, "state", None)
        if not isinstance(state, Mapping):
            continue
        for key in _MOMENTUM_KEYS:
            for st in state.values():
                if isinstance(st, Mapping) and isinstance(st.get(key), torch.Tensor):
                    return opt, key
    return None, None


def momentum_direction(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    *,
    params: Sequence[str | nn.Parameter] | None = None,
) -> torch.Tensor:
    """The optimizer's momentum as a flat direction.

    Reads ``state[p]["momentum_buffer"]`` (torch SGD, :class:`msam.MSAM`) or
    ``state[p]["exp_avg"]`` (torch Adam/AdamW, AdamW-MSAM); for a SAM-style wrapper the state
    of ``optimizer.base_optimizer``. The buffer accumulates gradients, so it points uphill (the
    update moves along its negative); MSAM perturbs along ``-v / ||v||`` (Becker et al. 2024).
    Parameters without state (not yet stepped, or frozen) get zeros.

    Args:
        optimizer: a stepped optimizer.
        model: defines the parameter space and its order (recommended); without it, the order of
            the optimizer's ``param_groups``.
        params: restrict the model's parameter space.

    Returns:
        A flat tensor (the model's device and dtype).

    Raises:
        ValueError: if the optimizer holds no momentum at all (no step taken yet, or momentum 0).
    """
    if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "state"):
        raise TypeError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    opt, key = _momentum_state(optimizer)
    if opt is None:
        raise ValueError(
            f"{type(optimizer).__name__} holds no momentum state (no tensor under "
            f"{' or '.join(repr(k) for k in _MOMENTUM_KEYS)}): take at least one step, with "
            "momentum > 0 for SGD"
        )
    if model is not None:
        space = _space(model, params)
        tensors = space.params
    else:
        if params is not None:
            raise ValueError("`params` needs `model`")
        tensors, seen = [], set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    tensors.append(p)
        if not tensors:
            raise ValueError("the optimizer has no trainable parameters")
        space = None
    bufs = []
    for p in tensors:
        st = opt.state.get(p, {})
        buf = st.get(key) if isinstance(st, Mapping) else None
        bufs.append(buf.detach() if isinstance(buf, torch.Tensor) else None)
    if space is not None:
        return space.flatten(bufs)
    dtype, device = tensors[0].dtype, tensors[0].device
    return torch.cat([
        (b.reshape(-1).to(device=device, dtype=dtype) if b is not None
         else torch.zeros(p.numel(), device=device, dtype=dtype))
        for b, p in zip(bufs, tensors)
    ])


def interpolation_direction(
    model_a: nn.Module,
    model_b: nn.Module | Mapping[str, torch.Tensor],
    *,
    params: Sequence[str | nn.Parameter] | None = None,
) -> torch.Tensor:
    """``d = w_b - w_a``, so that ``w_a + alpha d`` runs from ``model_a`` (0) to ``model_b`` (1).

    The linear path between two solutions (Goodfellow et al. 2015, "Qualitatively characterizing
    neural network optimization problems"; Li et al. 2018, Sec. 3).

    Args:
        model_a: the origin; defines the parameter space.
        model_b: the end point: a model or a state_dict with the same parameter names and shapes.
        params: restrict the parameter space of ``model_a``.

    Returns:
        A flat tensor in ``model_a``'s space (device and dtype).

    Raises:
        ValueError: if ``model_b`` lacks a parameter or a shape differs.
    """
    space = _space(model_a, params)
    return state_vector(model_b, space, "model_b") - space.vector()
