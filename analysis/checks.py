"""Cheap up-front checks of a model, a loss and one batch, shared by every routine that evaluates
the loss as a fixed function of the weights (sharpness metrics, slices, curvature operators at
construction).

Two kinds of check run on the first batch, before anything is computed or changed:

* **inputs** (:func:`check_first_batch`): parameters on the meta device, a forward pass or a
  loss that fails (re-raised as one ``ValueError`` naming the batch, the inputs' and targets'
  shapes and dtypes, with the original error chained), and for the built-in losses the targets
  against the outputs: ``cross_entropy`` needs integer class indices of shape ``(N,)`` in
  ``[0, C)`` (or class probabilities of the outputs' shape), ``mse`` floating targets of the
  outputs' shape (:mod:`analysis.target_checks`); a language model's ``(B, T, V)`` logits with
  token targets under either of them are refused with the advice to use ``"lm"`` or ``"model_lm"``.
* **determinism** (:func:`check_repeatable_forward`): a dropout module with ``p > 0`` that is
  active under the routine's mode is refused by name, and the outputs of the first batch are
  computed twice and must agree to ``|a - b| <= rtol * max(1, max |a|)`` with
  ``rtol = max(REPEAT_RTOL, 4 eps)`` (``1e-6`` for float32/float64, ``4 eps`` for half
  precision): a deterministic model repeats its outputs exactly, the tolerance leaves room for
  non-deterministic GPU reductions, and dropout changes outputs by O(1). This also catches randomness no module
  scan can see, e.g. ``F.dropout(x, training=True)`` inside ``forward``.

Train-mode BatchNorm is *not* refused here: on a fixed batch it is a deterministic function of
the weights (batch statistics), which is what ``mode="train"`` asks for. (The curvature operators
refuse it for their own reason, see :func:`analysis.operators.check_deterministic_setup`.)

Both checks use at most :data:`CHECK_SAMPLES` samples of the first batch, run without autograd,
restore buffers (BatchNorm statistics), module flags and the global random number generators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .data import DataSource, to_device
from .evaluation import forward, model_device_dtype, model_mode
from .target_checks import check_targets, describe

__all__ = [
    "CHECK_SAMPLES",
    "REPEAT_RTOL",
    "active_dropout",
    "check_first_batch",
    "check_repeatable_forward",
    "check_seed",
]

#: At most this many samples of the first batch are used by the checks.
CHECK_SAMPLES = 64
#: Relative tolerance of the double evaluation (see the module docstring).
REPEAT_RTOL = 1e-6

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


def _head(obj: Any, k: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[:k] if obj.dim() > 0 else obj
    if isinstance(obj, Mapping):
        return {key: _head(v, k) for key, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_head(v, k) for v in obj)
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_seed(seed: Any, where: str) -> int:
    """``seed`` as an int; ``TypeError`` naming ``where`` and the value for anything that is not
    an integer (a string, a float, a bool), before anything is computed."""
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{where}: seed must be an integer, got {type(seed).__name__} {seed!r}")
    return int(seed)


def active_dropout(model: nn.Module, mode: str | None) -> list[str]:
    """Names of the dropout modules (``p > 0``) that are active under ``mode``."""
    out = []
    for name, m in model.named_modules():
        active = mode == "train" or (mode is None and m.training)
        if active and isinstance(m, _DROPOUT) and m.p > 0:
            out.append(f"{name or type(m).__name__!r} ({type(m).__name__}(p={m.p}))")
    return out


@contextlib.contextmanager
def _untouched(model: nn.Module, mode: str | None, device: torch.device) -> Iterator[None]:
    """Mode set; buffers, flags and the global RNG restored on exit; no autograd."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), model_mode(model, mode), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _first_batch(source: DataSource, device, dtype) -> tuple[Any, Any, int] | None:
    """This rank's first batch (``None`` for a sharded rank that holds no batch)."""
    for batch in source:
        x = to_device(_head(batch.inputs, CHECK_SAMPLES), device, dtype)
        y = to_device(batch.targets, device, dtype)
        return x, y, batch.index
    return None


def _run_forward(model: nn.Module, x: Any, index: int, where: str, device, dtype) -> Any:
    try:
        return forward(model, x)
    except Exception as err:
        raise ValueError(
            f"{where}: the forward pass failed on batch {index} (inputs {describe(x)}; model "
            f"parameters {str(dtype).replace('torch.', '')} on {device}): {_first_line(err)}"
        ) from err


def _compare(a: Any, b: Any, index: int, where: str) -> None:
    ta = [a] if isinstance(a, torch.Tensor) else [t for t in _tensors(a)]
    tb = [b] if isinstance(b, torch.Tensor) else [t for t in _tensors(b)]
    for u, v in zip(ta, tb):
        if not (u.is_floating_point() or u.is_complex()):
            if not torch.equal(u, v):
                raise _random_error(where, index, "an integer output", "differs", "")
            continue
        diff = (u.double() - v.double()).abs()
        scale = max(1.0, float(u.double().abs().max())) if u.numel() else 1.0
        rtol = max(REPEAT_RTOL, 4 * torch.finfo(u.dtype).eps) if u.is_floating_point() else REPEAT_RTOL
        ok = (diff <= rtol * scale) | (u.isnan() & v.isnan())
        if u.numel() and not bool(ok.all()):
            k = int(torch.nan_to_num(diff, nan=float("inf")).reshape(-1).argmax())
            raise _random_error(where, index, f"{float(u.reshape(-1)[k]):.6g}",
                                f"{float(v.reshape(-1)[k]):.6g}", f" at output entry {k}")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "logits") and isinstance(obj.logits, torch.Tensor):
        yield obj.logits


def _random_error(where: str, index: int, a: str, b: str, at: str) -> ValueError:
    return ValueError(
        f"{where}: the model's forward is random (two evaluations of batch {index} differ{at}: "
        f"{a} vs {b}), so the loss is not a fixed function of the weights; use mode='eval', "
        "remove the randomness (e.g. F.dropout(..., training=True) in forward) or pass "
        "check_deterministic=False"
    )


def _check_dropout(model: nn.Module, mode: str | None, where: str) -> None:
    active = active_dropout(model, mode)
    if active:
        raise ValueError(
            f"{where}: active dropout under mode={mode!r} in {', '.join(active)}; every "
            "evaluation would see another random mask; use mode='eval' or pass "
            "check_deterministic=False"
        )


def check_repeatable_forward(model: nn.Module, source: DataSource, mode: str | None,
                             *, where: str = "") -> None:
    """Raise ``ValueError`` unless the outputs of the first batch are reproducible.

    Active dropout modules are named; otherwise the outputs of the first
    :data:`CHECK_SAMPLES` samples are computed twice and compared (see the module docstring).
    Buffers, module flags and the global RNG are restored.

    Args:
        model: the network.
        source: the data.
        mode: ``"eval"``, ``"train"`` or ``None`` (the modules' own flags).
        where: the routine's name, prefixed to the message.
    """
    where = where or "check_repeatable_forward"
    _check_dropout(model, mode, where)
    device, dtype = model_device_dtype(model)
    first = _first_batch(source, device, dtype)
    if first is None:
        return
    x, _, index = first
    with _untouched(model, mode, device):
        a = _run_forward(model, x, index, where, device, dtype)
        b = _run_forward(model, x, index, where, device, dtype)
    _compare(a, b, index, where)


def check_first_batch(
    model: nn.Module,
    loss_fn: Callable,
    source: DataSource,
    mode: str | None,
    *,
    where: str,
    deterministic: bool = True,
) -> None:
    """Run the input checks (and, with ``deterministic``, the determinism check) on batch 0.

    Raises, before anything is computed: ``ValueError`` for parameters on the meta device, a
    forward or loss that fails on the first batch (the original error chained), targets that do
    not fit the built-in loss (shape, class range, a language model's ``(B, T)`` tokens), a
    non-scalar loss, or a random forward; ``TypeError`` for targets of the wrong type or dtype
    for the built-in loss (float class labels for ``cross_entropy``, integer labels for ``mse``,
    a batch dict; see :func:`analysis.target_checks.check_targets`).

    Args:
        model: the network.
        loss_fn: the resolved loss callable.
        source: the data.
        mode: the mode the routine evaluates in.
        where: the routine's name, prefixed to every message.
        deterministic: also run :func:`check_repeatable_forward` (``check_deterministic``).
    """
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"{where}: the model's parameters are on the meta device (no values), e.g. "
            f"{meta[0]!r}; materialize them first (model.to_empty(device=...) and load a "
            "state dict, or load_state_dict(..., assign=True))"
        )
    if deterministic:
        _check_dropout(model, mode, where)
    device, dtype = model_device_dtype(model)
    first = _first_batch(source, device, dtype)
    if first is None:  # a sharded rank without batches: nothing to check here
        return
    x, y, index = first
    y_head = _head(y, CHECK_SAMPLES)
    with _untouched(model, mode, device):
        out = _run_forward(model, x, index, where, device, dtype)
        check_targets(loss_fn, out, y_head, y, index, where)
        try:
            loss = loss_fn(out, y_head)
        except Exception as err:
            raise ValueError(
                f"{where}: the loss failed on batch {index} (outputs {describe(out)}, targets "
                f"{describe(y_head)}): {_first_line(err)}"
            ) from err
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                f"{where}: loss_fn must return a scalar tensor (the batch mean), got "
                f"{describe(loss)} on batch {index}"
            )
        if deterministic:
            again = _run_forward(model, x, index, where, device, dtype)
    if deterministic:
        _compare(out, again, index, where)
