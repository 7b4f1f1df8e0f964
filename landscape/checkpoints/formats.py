"""Checkpoint layouts: training dicts (``model`` / ``state_dict`` / ``model_state_dict`` beside an
optimizer), PyTorch Lightning ``.ckpt`` (``optimizer_states``), Hugging Face ``save_pretrained``
folders (sharded with an index), and the DDP ``module.`` / ``torch.compile`` ``_orig_mod.``
prefixes."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .reading import checkpoint_format, regular_file, safetensors_load, torch_load, verify_zip
from .result import CheckpointError, short_list

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")


PREFIXES = ("module.", "_orig_mod.")


# Hugging Face ``save_pretrained`` folders: (index file, single file), safetensors first
HF_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _split(obj: Any, path: pathlib.Path) -> tuple[dict, list[tuple[str, dict]], dict]:
    """(state_dict, optimizer states as ``(key, state)`` pairs, metadata) from whatever
    torch.load returned. Every optimizer of the file is returned: PyTorch Lightning's
    ``"optimizer_states"`` list may hold several (one per optimizer of the module)."""
    if isinstance(obj, nn.Module):  # only reachable with allow_pickle=True
        return dict(obj.state_dict()), [], {}
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}; expected a state_dict or a dict with a "
            f"'model' / 'state_dict' / 'model_state_dict' entry"
        )
    if _is_state_dict(obj):
        return dict(obj), [], {}
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if _is_state_dict(inner):
            okey = next((k for k in _OPTIMIZER_KEYS if isinstance(obj.get(k), Mapping)), "")
            optimizers = [(okey, dict(obj[okey]))] if okey else []
            # PyTorch Lightning: "optimizer_states" is a list, one state_dict per optimizer
            states = obj.get("optimizer_states")
            if not okey and states is not None and not isinstance(states, (list, tuple)):
                raise CheckpointError(
                    f"{path}: malformed optimizer state: optimizer_states is a "
                    f"{type(states).__name__}, expected a list of optimizer state dicts")
            lightning = not okey and isinstance(states, (list, tuple))
            if lightning:
                for i, opt in enumerate(states):
                    if not isinstance(opt, Mapping):
                        raise CheckpointError(
                            f"{path}: malformed optimizer state: optimizer_states[{i}] is a "
                            f"{type(opt).__name__}, expected a dict"
                        )
                    optimizers.append((f"optimizer_states[{i}]", dict(opt)))
            skip = {key, *_OPTIMIZER_KEYS} | ({"optimizer_states"} if lightning else set())
            meta = {k: v for k, v in obj.items() if k not in skip}
            return dict(inner), optimizers, meta
    # a state dict mixed with a few non-tensor extras (e.g. a version number)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) - 2 and not any(isinstance(v, Mapping) for v in obj.values()):
        return tensors, [], {k: v for k, v in obj.items() if k not in tensors}
    keys = [str(k) for k in obj][:10]
    raise CheckpointError(
        f"{path} has no model weights: top-level keys are {keys}; expected a state_dict or a "
        f"dict with a 'model' / 'state_dict' / 'model_state_dict' entry"
    )


def load_file(path: pathlib.Path, map_location: Any, allow_pickle: bool
               ) -> tuple[dict, list[tuple[str, dict]], dict, str]:
    """(state, optimizer states as ``(key, state)`` pairs, metadata, format) of one file,
    format sniffed."""
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        state, meta = safetensors_load(path, map_location)
        return state, [], meta, fmt
    obj = _torch_object(path, map_location, allow_pickle)
    state, optimizers, meta = _split(obj, path)
    return state, optimizers, meta, fmt


def _torch_object(path: pathlib.Path, map_location: Any, allow_pickle: bool) -> Any:
    """What ``torch.load`` returns for ``path``, its zip CRCs verified first."""
    with open(path, "rb") as fh:
        is_zip = fh.read(2) == b"PK"
    if is_zip:
        verify_zip(path)
    return torch_load(path, map_location, allow_pickle)


# a Hugging Face Trainer ``checkpoint-N/`` folder keeps the optimizer beside the weights
TRAINER_OPTIMIZER_FILE = "optimizer.pt"


def _trainer_optimizer(path: pathlib.Path, map_location: Any, allow_pickle: bool) -> list[tuple[str, dict]]:
    """The optimizer state a Hugging Face Trainer saved in the folder (``optimizer.pt``), if any."""
    file = path / TRAINER_OPTIMIZER_FILE
    if not os.path.lexists(file):
        return []
    if checkpoint_format(file) != "torch":
        raise CheckpointError(f"{file} is not an optimizer state saved by torch.save (it is a "
                              f"{checkpoint_format(file)} file)")
    obj = _torch_object(file, map_location, allow_pickle)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: malformed optimizer state: a {type(obj).__name__}, expected "
                              "an optimizer state_dict (a dict)")
    return [(TRAINER_OPTIMIZER_FILE, dict(obj))]


def load_folder(path: pathlib.Path, map_location: Any, allow_pickle: bool
                 ) -> tuple[dict, list[tuple[str, dict]], dict, str]:
    """A Hugging Face ``save_pretrained`` folder (one weights file or shards listed in an
    index) or Trainer ``checkpoint-N/`` folder (its ``optimizer.pt`` read too): (state,
    optimizer states, metadata, format)."""
    state, meta, fmt = _folder_weights(path, map_location, allow_pickle)
    return state, _trainer_optimizer(path, map_location, allow_pickle), meta, fmt


def _folder_weights(path: pathlib.Path, map_location: Any, allow_pickle: bool) -> tuple[dict, dict, str]:
    for index_name, single in HF_LAYOUTS:
        index = path / index_name
        if os.path.lexists(index):
            regular_file(index)
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError("weight_map is not a mapping of names to files")
                if not weight_map:
                    raise ValueError("its weight_map is empty (it lists no tensors)")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index: {type(exc).__name__}: {exc}") from None
            shards = sorted(set(weight_map.values()))
            bad = [s for s in shards if pathlib.PurePath(s).name != s or s in ("", ".", "..")]
            if bad:
                raise CheckpointError(f"{index} names shard files outside its folder: {bad[:3]}")
            absent = [s for s in shards if not os.path.lexists(path / s)]
            if absent:
                raise CheckpointError(f"{index} lists shard files that are not found in {path}: {short_list(absent, 3)}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                part, _, _, fmt = load_file(path / shard, map_location, allow_pickle)
                expected = [k for k, v in weight_map.items() if v == shard]
                absent = [k for k in expected if k not in part]
                if absent:
                    raise CheckpointError(
                        f"{path / shard} lacks tensors that {index_name} places in it: {short_list(absent, 5)}"
                    )
                twice = [k for k in part if k in state]
                if twice:
                    raise CheckpointError(f"{path / shard} repeats tensors of another shard: {short_list(twice, 5)}")
                state.update(part)
            return state, {"shards": len(shards), "index": index_name}, fmt
        if os.path.lexists(path / single):
            state, _, meta, fmt = load_file(path / single, map_location, allow_pickle)
            return state, meta, fmt
    looked = ", ".join(n for pair in HF_LAYOUTS for n in pair)
    raise CheckpointError(f"{path} is a directory without model weights (looked for {looked})")


def strip_prefixes(
    state: dict[str, torch.Tensor], model: nn.Module | None, model_keys: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """``state`` without the wrapper prefixes of :data:`PREFIXES` (DDP/``DataParallel``
    ``"module."``, ``torch.compile`` ``"_orig_mod."``), removed while every key has one, unless the
    model itself is wrapped and the keys already match it (``model_keys``: its state-dict keys)."""
    if model_keys is None:
        model_keys = set(model.state_dict()) if model is not None else set()
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                # keep the prefix if the model itself is wrapped and the names already match
                if model is not None and set(state) <= model_keys and not set(stripped) <= model_keys:
                    continue
                state, changed = stripped, True
    # torch.compile on a sub-module: "encoder._orig_mod.0.weight" (never a real attribute name)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        n = k if k in model_keys else ".".join(c for c in k.split(".") if c != "_orig_mod")
        out[n if n not in out and n not in state else k] = v
    return out
