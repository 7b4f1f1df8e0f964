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
from .unperturb import check_optimizer, perturbed_flag, refuse_sam_ascent, unperturbed_state


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
            ``pytorch_model.bin``, possibly sharded with ``*.index.json``).
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
            state needed to undo MSAM's perturbation, no key matching the model, or (strict)
            keys / shapes that do not match the model.
    """
    path = pathlib.Path(path)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str or None, got {type(prefix).__name__}")
    if os.path.isdir(path):
        state, meta, fmt = load_folder(path, map_location, allow_pickle)
        opt_state, okey = None, ""
    else:
        state, opt_state, meta, okey, fmt = load_file(path, map_location, allow_pickle)
    if opt_state is not None:
        check_optimizer(opt_state, path, okey)
    state = strip_prefixes(state, model)
    state, used_prefix, ignored = select_prefix(state, model, prefix, path)

    refuse_sam_ascent(opt_state, path)
    if model is not None:
        refuse_untied(state, model, path)  # before the move-back writes one value to all twins
    perturbed = bool(opt_state) and perturbed_flag(opt_state)  # type: ignore[arg-type]
    unperturbed = False
    if perturbed and unperturb:
        state = unperturbed_state(state, opt_state, model, path, okey)  # type: ignore[arg-type]
        unperturbed = True

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
        metadata=meta,
        missing_keys=tuple(missing),
        unexpected_keys=tuple(unexpected),
        shape_mismatches=tuple(mismatched),
        perturbed=perturbed,
        unperturbed=unperturbed,
        prefix=used_prefix,
        ignored_keys=tuple(ignored),
    )
