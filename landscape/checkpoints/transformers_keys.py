"""Hugging Face ``transformers`` key conversion: the checkpoint key names a ``save_pretrained``
folder holds, renamed to the model's own, the way ``from_pretrained`` does.

transformers 5 renames modules of some architectures (ViT: ``vit.encoder.layer.0.attention.
attention.query`` became ``vit.layers.0.attention.q_proj``) and keeps writing the original names:
``save_pretrained`` reverts the conversion, ``from_pretrained`` applies it
(``transformers.conversion_mapping.get_model_conversion_mapping`` lists the renamings of a
model, ``transformers.core_model_loading.rename_source_key`` applies them to one key, adding or
removing the ``base_model_prefix`` as needed). :func:`transformers_key_renames` uses those same
functions, so a folder that transformers itself loads loads here too. Keys that only a
``WeightConverter`` (a tensor merge or split, e.g. stacked MoE experts) can produce are refused
naming them: those are not renames of one tensor.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterable

from torch import nn

from .result import CheckpointError, short_list

__all__ = ["transformers_key_renames"]


def _is_transformers_model(model: nn.Module | None) -> bool:
    if model is None or "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def transformers_key_renames(keys: Iterable[str], model: nn.Module | None,
                             path: pathlib.Path) -> dict[str, str]:
    """``{checkpoint key: model key}`` for the keys transformers renames when it loads into
    ``model`` (empty when ``model`` is not a transformers ``PreTrainedModel``, or when the keys
    already are the model's).

    Raises:
        CheckpointError: keys that transformers would merge or split (a ``WeightConverter``),
            named; they cannot be loaded key by key.
    """
    keys = list(keys)
    if not _is_transformers_model(model):
        return {}
    target = model.state_dict()
    if all(k in target for k in keys):
        return {}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # a custom model transformers has no mapping for: keys as they are
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renames: dict[str, str] = {}
    merged: list[str] = []
    prefix = getattr(model, "base_model_prefix", None) or None
    for key in keys:
        new, pattern = rename_source_key(key, renamings, converters, prefix, target)
        if new not in target and key in target:  # as transformers: keep a key that matches
            new, pattern = rename_source_key(key, [], [], prefix, target)
        if pattern is not None:
            merged.append(key)
        elif new != key and new in target:
            renames[key] = new
    if merged:
        raise CheckpointError(
            f"{path}: transformers merges or splits these tensors when it loads them into "
            f"{type(model).__name__} ({short_list(merged, 4)}); they cannot be loaded key by key. "
            "Load the folder with from_pretrained and pass that model")
    if len(set(renames.values())) != len(renames):
        return {}  # two keys onto one name: not a plain renaming, leave the keys as they are
    return renames
