"""load_checkpoint: read, unwrap, select the prefix, move MSAM's weights back, load into a model."""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any

from torch import nn

from .formats import load_file, load_folder, strip_prefixes
from .matching import compare_with_model, refuse_untied, select_prefix
from .result import Checkpoint, PerturbedCheckpointWarning
from .transformers_keys import transformers_key_renames
from .unperturb import check_optimizers, move_back_all, perturbed_states
from .validation import validate_tensors


def load_checkpoint(
    path: str | pathlib.Path,
    model: nn.Module | None = None,
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    allow_pickle: bool = False,
    unperturb: bool = True,
    prefix: str | None = None,
) -> Checkpoint:
    """Load a checkpoint safely and (optionally) into ``model``.

    The format is recognized by content, whatever the suffix (see :func:`checkpoint_format`);
    anything that is not a regular file (a FIFO, a device) is refused without being opened, and
    the CRC-32 of every member of a torch zip is verified before ``torch.load`` reads it.

    Args:
        path: a torch file (read with ``torch.load(weights_only=True)``), a safetensors file, or
            a Hugging Face ``save_pretrained`` folder (``model.safetensors`` or
            ``pytorch_model.bin``, possibly sharded with ``*.index.json``) or Trainer
            ``checkpoint-N/`` folder (its ``optimizer.pt`` is read too).
        model: if given, the weights are copied into it (``load_state_dict``).
        map_location: where tensors are loaded (default ``"cpu"``).
        strict: with a model, refuse missing / unexpected keys and shape mismatches (all listed
            by name in the error). With ``strict=False`` the matching tensors are loaded and the
            rest is reported on the returned object; a load that matches no key at all is
            still refused.
        allow_pickle: load arbitrary pickles (``weights_only=False``). **Runs code from the
            file**; only for legacy files you trust. Default False.
        unperturb: undo MSAM's perturbation when the optimizer state says the weights were saved
            perturbed (see the module docstring). Default True.
        prefix: take only the keys under this prefix, with the prefix removed (e.g.
            ``"model."`` for a Lightning module holding the network as ``self.model``); keys
            outside it are listed in ``ignored_keys``. ``None`` (default) detects a prefix when
            one is needed and exactly one makes the keys match ``model``; ``""`` disables that.

    Returns:
        :class:`Checkpoint`.

    Raises:
        FileNotFoundError: the path does not exist.
        UnsafeCheckpointError: the pickle references code; it was not run.
        CheckpointError: not a regular file or not a checkpoint (says what it looks like),
            corrupt (CRC) or truncated, no weights in it, a malformed or non-finite optimizer
            state needed to undo MSAM's perturbation (any optimizer of the file), several
            optimizers that cannot be matched to the parameters, no key matching the model,
            (strict) keys / shapes that do not match the model, integer data for floating-point
            tensors, non-finite values, or a model / tensors on the meta device.

    Every checkpoint goes through one validation step before anything changes, whatever its
    container: every optimizer state in it
    (:func:`landscape.checkpoints.unperturb.check_optimizers`: a Lightning ``.ckpt``'s
    ``optimizer_states``, a Hugging Face Trainer folder's ``optimizer.pt``), then the tensors
    (:func:`landscape.checkpoints.validation.validate_tensors`: dtype classes, finiteness, the
    meta device), the tied weights and the keys and shapes; only then are MSAM's weights moved
    back (every perturbed optimizer, :func:`landscape.checkpoints.unperturb.move_back_all`) and
    loaded. A ``transformers`` model gets transformers' own key renaming first
    (:func:`landscape.checkpoints.transformers_keys.transformers_key_renames`).
    """
    path = pathlib.Path(path)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str or None, got {type(prefix).__name__}")
    # 1. read: whatever the container, the weights and EVERY optimizer state in it
    if os.path.isdir(path):
        state, optimizers, meta, fmt = load_folder(path, map_location, allow_pickle)
    else:
        state, optimizers, meta, fmt = load_file(path, map_location, allow_pickle)
    # 2. validate, before anything changes: every optimizer, then the tensors (keys matched)
    check_optimizers(optimizers, path)
    state = strip_prefixes(state, model)
    renames = transformers_key_renames(state, model, path)
    state = {renames.get(k, k): v for k, v in state.items()}
    state, used_prefix, ignored = select_prefix(state, model, prefix, path)
    validate_tensors(state, model, path)
    if model is not None:
        refuse_untied(state, model, path)  # before the move-back writes one value to all twins
    # 3. move MSAM's weights back (every perturbed optimizer), 4. load
    perturbed = bool(perturbed_states(optimizers))
    unperturbed = False
    if perturbed and unperturb:
        state = move_back_all(state, optimizers, model, path)
        unperturbed = True
    opt_state = next((o for _, o in perturbed_states(optimizers)),
                     optimizers[0][1] if optimizers else None)

    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    if model is not None:
        loadable, missing, unexpected, mismatched = compare_with_model(state, model, strict, path)
        model.load_state_dict(loadable, strict=False)
    if unperturbed:
        warnings.warn(
            f"{path} was saved while MSAM's parameters were perturbed; moved back to "
            "w = w~ + rho*v/||v|| using the optimizer state stored in the checkpoint",
            PerturbedCheckpointWarning,
            stacklevel=2,
        )

    return Checkpoint(
        path=str(path),
        format=fmt,
        state_dict=state,
        optimizer_state=opt_state,
        optimizer_states=tuple(o for _, o in optimizers),
        metadata=meta,
        missing_keys=tuple(missing),
        unexpected_keys=tuple(unexpected),
        shape_mismatches=tuple(mismatched),
        perturbed=perturbed,
        unperturbed=unperturbed,
        prefix=used_prefix,
        ignored_keys=tuple(ignored),
    )
