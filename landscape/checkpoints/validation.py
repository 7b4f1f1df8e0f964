"""The tensor half of the one validation step every loaded checkpoint goes through, whatever its
container, before anything changes (the optimizer half, every optimizer of the file, is
:func:`landscape.checkpoints.unperturb.check_optimizers`):

* the meta device: a model whose tensors are on ``meta`` has no storage, so ``load_state_dict``
  would "succeed" and load nothing; tensors read to ``map_location="meta"`` hold no values;
* dtype classes: integer (or boolean) data is never cast into floating-point parameters, and
  real data never into complex ones (floating-point whole numbers into an integer buffer, such
  as ``num_batches_tracked`` of a state dict converted wholesale to ``float16``, is exact and
  allowed) (a safetensors header that relabels ``F32`` as ``I32`` makes
  every weight an integer bit pattern of about 1e9); refused naming the keys; without a model,
  a file without any floating-point tensor is refused;
* finiteness: ``inf`` / ``NaN`` in the floating-point tensors that would be loaded are refused
  naming the keys (a diverged or damaged save would make every analysed number NaN); a tensor
  that the model itself holds with non-finite values (a ``-inf`` attention-mask buffer) is
  exempt. Without a model every floating-point tensor is checked.

Shapes and key names are checked against the model in
:mod:`landscape.checkpoints.matching`, also before ``load_state_dict``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import torch
from torch import nn

from .result import CheckpointError, short_list

__all__ = ["dtype_class", "validate_tensors"]


def dtype_class(dtype: torch.dtype) -> str:
    """``"complex"``, ``"floating"`` or ``"integer"`` (booleans included): a checkpoint tensor
    is loaded only into a model tensor of the same class (``float16`` into ``float32`` is fine,
    ``int32`` into ``float32`` is not)."""
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "integer"


def _exact_integers(value: torch.Tensor, target: torch.Tensor) -> bool:
    """Floating-point data of whole numbers for an integer tensor (``num_batches_tracked`` of a
    state dict converted wholesale to half precision): the cast is exact, so allowed."""
    return (dtype_class(value.dtype) == "floating" and dtype_class(target.dtype) == "integer"
            and target.dtype != torch.bool and bool(torch.isfinite(value).all())
            and torch.equal(value, value.round()))


def _count_nonfinite(t: torch.Tensor) -> int:
    """The number of inf/NaN entries of a floating or complex tensor (sparse: its stored values;
    types without ``isfinite`` such as float8 are checked in float32)."""
    if t.layout == torch.sparse_coo:
        t = t.coalesce().values()
    elif t.layout != torch.strided:
        t = t.values()
    if not t.numel():
        return 0
    try:
        finite = torch.isfinite(t)
    except (NotImplementedError, RuntimeError):
        finite = torch.isfinite(t.to(torch.complex64 if t.is_complex() else torch.float32))
    return int((~finite).sum())


def validate_tensors(state: Mapping[str, torch.Tensor], model: nn.Module | None,
                     path: pathlib.Path) -> None:
    """Refuse a checkpoint whose tensors must not be loaded (see the module docstring).

    Args:
        state: the checkpoint's tensors, keys already matched to ``model``'s names.
        model: the model they are loaded into, or ``None``.
        path: the checkpoint (named in the errors).

    Raises:
        CheckpointError: a meta-device model or checkpoint, an integer/boolean tensor for a
            floating-point parameter (or any other dtype-class change), no floating-point tensor
            at all, or non-finite values; the message names the keys.
    """
    if model is not None:
        on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if on_meta:
            raise CheckpointError(
                f"cannot load {path} into {type(model).__name__}: its tensors are on the meta "
                f"device ({short_list(on_meta, 4)}), which holds no storage, so nothing would be "
                "loaded; create the model on a real device (model.to_empty(device='cpu')) first")
    meta_keys = [k for k, t in state.items() if t.is_meta]
    if meta_keys:
        raise CheckpointError(
            f"{path} was read to the meta device ({short_list(meta_keys, 4)}): its tensors hold no "
            "values; load with map_location='cpu' (or another real device)")
    if model is not None:
        target = model.state_dict()
        changed = [(k, v.dtype, target[k].dtype) for k, v in state.items()
                   if k in target and dtype_class(v.dtype) != dtype_class(target[k].dtype)
                   and not _exact_integers(v, target[k])]
        if changed:
            shown = [f"{k} ({str(a).removeprefix('torch.')} in the file, "
                     f"{str(b).removeprefix('torch.')} in the model)" for k, a, b in changed]
            kinds = sorted({dtype_class(a) for _, a, _ in changed})
            raise CheckpointError(
                f"{path} holds {' and '.join(kinds)} data for tensors of another kind in "
                f"{type(model).__name__}: {short_list(shown, 4)}; it is not cast (integer bit "
                "patterns are not weights); refused. Was the file's dtype header altered or the "
                "file saved from another model?")
        # a tensor the model itself holds non-finite (a -inf attention mask buffer) may be so
        loaded = [k for k in state if k in target and (
            dtype_class(target[k].dtype) == "integer" or target[k].is_meta
            or bool(torch.isfinite(target[k]).all()))]
    else:
        if state and not any(dtype_class(v.dtype) != "integer" for v in state.values()):
            kinds = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
            raise CheckpointError(
                f"{path} holds no floating-point tensors (only {', '.join(kinds)}: "
                f"{short_list(list(state), 4)}); integer data are not weights; refused")
        loaded = list(state)
    nonfinite = {k: n for k in loaded if dtype_class(state[k].dtype) != "integer"
                 and (n := _count_nonfinite(state[k]))}
    if nonfinite:
        counts = [f"{k} ({n} of {state[k].numel()} values)" for k, n in nonfinite.items()]
        raise CheckpointError(
            f"{path} holds non-finite values (inf or NaN) in {short_list(counts, 4)}; every "
            "number computed from it would be NaN; refused")
