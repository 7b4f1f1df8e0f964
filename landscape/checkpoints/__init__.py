"""Safe checkpoint loading: ``weights_only`` pickles and safetensors, key and shape reports, MSAM.

:func:`load_checkpoint` reads

* torch files with ``torch.load(weights_only=True)``: a plain ``state_dict``, or a dictionary
  holding one under ``"model"``, ``"state_dict"`` or ``"model_state_dict"`` (training
  checkpoints such as ``{"model": ..., "optimizer": ..., "epoch": 3}`` and PyTorch Lightning
  ``.ckpt`` files, whose ``"optimizer_states"`` list is read too), with ``nn.DataParallel`` /
  DDP ``"module."`` and ``torch.compile`` ``"_orig_mod."`` prefixes removed (also nested), and a
  module-attribute prefix such as Lightning's ``"model."`` removed when it is the only prefix
  that makes the keys match the model (or when given as ``prefix=``);
* safetensors files;
* Hugging Face ``save_pretrained`` folders (``model.safetensors`` or ``pytorch_model.bin``,
  possibly sharded with their ``.index.json``); tied weights absent from the files (a language
  model head) are not reported missing.

Files are checked before anything parses them: a path that is not a regular file (a FIFO, a
device, a dangling symlink) is refused from ``os.stat`` alone, without opening it, so nothing can
block; the format is recognized by content, whatever the suffix (:func:`checkpoint_format`), so
an image, JSON or text file named ``.pt`` is reported as such; the CRC-32 of every member of a
torch zip is verified (``torch.load`` does not check them, so a flipped bit would load silently).

Security: a pickle that references anything beyond tensors and plain containers (a class, a
function such as ``os.system``) is refused with :class:`UnsafeCheckpointError` *before* any of it
runs; ``weights_only=True`` unpickling never calls the referenced object. Loading such files is
possible only with the explicit opt-in ``allow_pickle=True`` (CLI: ``--trust-pickle``), meant
for legacy files you created yourself; it is never the default.

MSAM checkpoints: between steps MSAM keeps the parameters at the perturbed point
``w~ = w - rho * v / ||v||`` (Becker et al. 2024, Algorithm 1). A checkpoint saved from there
(``torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()})`` without calling
``opt.eval()`` first) holds ``w~``, not the weights the optimizer is training. When the
checkpoint's optimizer state says it was saved perturbed, the loader **moves the weights back**
to ``w = w~ + rho * v / ||v||`` using the momentum buffers and ``rho`` stored in that same
optimizer state, and emits a :class:`PerturbedCheckpointWarning`; the returned
:class:`Checkpoint` records ``perturbed=True, unperturbed=True``. We correct rather than refuse
because the optimizer state holds everything the correction needs exactly (the same formula the
optimizer's own ``eval()`` applies), while refusing would leave the user with no way to evaluate
the file. If the state cannot be matched to the parameters (different counts or shapes), the
file is refused with an explanation instead; ``unperturb=False`` loads the raw perturbed weights.
A malformed optimizer entry (``param_groups`` not a list, a ``perturbed`` flag that is a tensor,
a non-numeric ``perturbation_scale``) or non-finite move-back data (``perturbation_scale``,
``rho``, a momentum buffer) is refused with a :class:`CheckpointError` naming the file and the
key, before any weight is changed.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from analysis.results import Result, to_jsonable
from msam.saved_state import (
    DIRECTION_KEYS,
    SavedStateError,
    direction_buffer,
    unperturbed_parameters,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "UnsafeCheckpointError",
    "PerturbedCheckpointWarning",
    "load_checkpoint",
    "find_checkpoints",
    "CHECKPOINT_SUFFIXES",
    "checkpoint_format",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")
_PREFIXES = ("module.", "_orig_mod.")
# Hugging Face ``save_pretrained`` folders: (index file, single file), safetensors first
_HF_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (unreadable, wrong layout, keys or shapes that differ)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import or call arbitrary objects; it was refused and nothing ran."""


class PerturbedCheckpointWarning(UserWarning):
    """The checkpoint was saved at MSAM's perturbed point and has been moved back."""


@dataclass(frozen=True, repr=False)
class Checkpoint(Result):
    """A loaded checkpoint.

    Attributes:
        path: the file.
        format: ``"torch"`` or ``"safetensors"``.
        state_dict: the model's tensors (prefixes stripped, MSAM perturbation undone).
        optimizer_state: the optimizer ``state_dict`` stored beside the model, if any.
        metadata: the other top-level entries (``epoch``, ``step``...) or safetensors metadata.
        missing_keys: model keys absent from the checkpoint (only when a model was given).
        unexpected_keys: checkpoint keys the model does not have.
        shape_mismatches: ``(key, checkpoint_shape, model_shape)`` triples.
        perturbed: the optimizer state says the weights were saved at MSAM's perturbed point.
        unperturbed: the loader moved them back to ``w = w~ + rho * v / ||v||``.
        prefix: the key prefix removed (given as ``prefix=`` or detected), ``""`` if none.
        ignored_keys: checkpoint keys outside ``prefix`` (other attributes of a Lightning
            module, for example); not loaded and not counted as unexpected.
    """

    path: str
    format: str
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    perturbed: bool = False
    unperturbed: bool = False
    prefix: str = ""
    ignored_keys: tuple[str, ...] = ()

    @property
    def num_tensors(self) -> int:
        return len(self.state_dict)

    @property
    def num_parameters(self) -> int:
        """Number of scalars in floating-point tensors of the state dict."""
        return sum(t.numel() for t in self.state_dict.values() if t.is_floating_point())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (tensor values are not included)."""
        return {
            "path": self.path,
            "format": self.format,
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
            "has_optimizer_state": self.optimizer_state is not None,
            "metadata": to_jsonable(
                {k: v for k, v in self.metadata.items() if not isinstance(v, (torch.Tensor, Mapping))}
            ),
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
            "shape_mismatches": [[k, list(a), list(b)] for k, a, b in self.shape_mismatches],
            "perturbed": self.perturbed,
            "unperturbed": self.unperturbed,
            "prefix": self.prefix,
            "ignored_keys": list(self.ignored_keys),
        }

    def __repr__(self) -> str:
        d = self.to_dict()
        keys = ("path", "format", "num_tensors", "num_parameters", "perturbed", "unperturbed")
        extra = ", ".join(f"{k}={d[k]!r}" for k in keys)
        problems = len(self.missing_keys) + len(self.unexpected_keys) + len(self.shape_mismatches)
        return f"Checkpoint({extra}, key_problems={problems})"

    def _repr_html_(self) -> str:
        import html

        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
            f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in self.to_dict().items()
        )
        return f"<table><caption>Checkpoint</caption>{rows}</table>"


# --------------------------------------------------------------------------------------------
# reading files


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _unsafe_reason(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it references {m.group(1)}, which weights_only loading does not allow"
    m = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+|Trying to call [\w.]+", text)
    if m:
        return m.group(0)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and "Weights only" not in ln), "")
    return first[:200] or "it holds objects other than tensors and plain containers"


def _regular_file(path: pathlib.Path) -> int:
    """The size of ``path`` if it is a regular file (symlinks followed); refused otherwise.

    Uses ``os.stat`` only: a FIFO, socket or device is never opened, so nothing can block.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise CheckpointError(
                f"{path} is a dangling symlink (it points to {os.readlink(path)!r}, which does not exist)"
            ) from None
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory" if stat.S_ISDIR(st.st_mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise CheckpointError(f"{path} is {kind}, not a regular checkpoint file; refused without reading it")
    return st.st_size


def _looks_like(head: bytes) -> str | None:
    """A name for content that is certainly not a checkpoint, from its first bytes."""
    signatures = (
        (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
        (b"GIF8", "a GIF image"), (b"%PDF", "a PDF document"), (b"\x1f\x8b", "gzip data"),
        (b"\x89HDF", "an HDF5 file (Keras/h5py?)"), (b"\x93NUMPY", "a NumPy .npy array"),
        (b"7z\xbc\xaf", "a 7-zip archive"), (b"BZh", "bzip2 data"), (b"\xfd7zXZ", "xz data"),
        (b"\x7fELF", "an executable"), (b"\x08\x01\x12", "an ONNX/protobuf file"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    if stripped[:1] in (b"{", b"["):
        return "JSON"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = head[:-3].decode("utf-8")  # a multi-byte character cut at the end
        except UnicodeDecodeError:
            return None
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        if stripped.startswith(b"version https://git-lfs"):
            return "a Git LFS pointer (run git lfs pull)"
        return "text" + (" (HTML)" if stripped[:1] == b"<" else "")
    return None


def checkpoint_format(path: str | pathlib.Path) -> str:
    """The format of a checkpoint file, by its content (whatever its suffix).

    Checks that ``path`` is a regular file with ``os.stat`` (a FIFO or device is refused without
    being opened, so this never blocks), then reads the first bytes:

    * ``"torch"``: a zip archive (``torch.save``'s format since 1.6) or a pickle (protocol >= 2;
      ``torch.save(..., _use_new_zipfile_serialization=False)``);
    * ``"safetensors"``: an 8-byte little-endian header length ``n`` (with ``n`` fitting in the
      file) followed by a JSON object.

    Args:
        path: the file.

    Returns:
        ``"torch"`` or ``"safetensors"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: not a regular file, or content that is not a checkpoint (the message says
            what it looks like: PNG, JSON, text, empty...).
    """
    path = pathlib.Path(path)
    size = _regular_file(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"{path} is not a checkpoint: the file is empty")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "torch"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "torch"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
        if head[8:9] == b"{" and 0 < n < 1 << 32:
            raise CheckpointError(
                f"{path} is a truncated safetensors file: its header says {n} bytes, the file has "
                f"{size - 8} after the length field"
            )
    seen = _looks_like(head)
    if seen is None:
        seen = f"unrecognized binary data (first bytes {head[:8].hex(' ')})"
    raise CheckpointError(
        f"{path} is not a checkpoint: it looks like {seen}, not a PyTorch (zip or pickle) or "
        "safetensors file"
    )


def _verify_zip(path: pathlib.Path) -> None:
    """Check the zip structure and the CRC-32 of every member before ``torch.load`` sees it.

    ``torch.load`` never checks CRCs, so a flipped bit in a tensor would load silently. Reading
    every member costs one extra sequential read of the file (zlib's CRC-32 runs at GB/s).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                raise CheckpointError(
                    f"{path} is not a checkpoint: a zip archive without data.pkl (members: "
                    f"{_names(names, 5)}), not a PyTorch file"
                )
            bad = zf.testzip()
    except CheckpointError:
        raise
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path} is a truncated or damaged zip archive: {exc}") from None
    except (OSError, EOFError, ValueError, NotImplementedError, zipfile.LargeZipFile) as exc:
        raise CheckpointError(f"{path} is a damaged zip archive: {type(exc).__name__}: {exc}") from None
    if bad is not None:
        raise CheckpointError(
            f"{path} is corrupt: member {bad!r} fails its CRC-32 check (the file was damaged "
            "after it was written; re-copy or re-save it)"
        )


def _torch_load(path: pathlib.Path, map_location: Any, allow_pickle: bool) -> Any:
    try:
        # an open file, not the path: torch.load dispatches on a ".safetensors" suffix itself
        with open(path, "rb") as fh:
            return torch.load(fh, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            reason = _unsafe_reason(exc)
            lightning = ""
            if path.suffix == ".ckpt" or "lightning" in reason.lower():
                lightning = (
                    " (a PyTorch Lightning checkpoint whose hyper_parameters, callbacks or loops "
                    "hold objects other than plain values is refused too: weights_only loading "
                    "allows only tensors and plain containers)"
                )
            raise UnsafeCheckpointError(
                f"refused to load {path}: {reason}; nothing in it was run{lightning}. "
                "If you created this file yourself and trust it, pass allow_pickle=True "
                "(command line: --trust-pickle)"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
    except Exception as exc:  # any parse failure of a corrupt file: report it in one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {msg}") from None


def _safetensors_load(path: pathlib.Path, map_location: Any) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=device) as fh:
            meta = dict(fh.metadata() or {})
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
        return out, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file: {msg}") from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _split(obj: Any, path: pathlib.Path) -> tuple[dict, dict | None, dict, str]:
    """(state_dict, optimizer_state, metadata, optimizer key) from whatever torch.load returned."""
    if isinstance(obj, nn.Module):  # only reachable with allow_pickle=True
        return dict(obj.state_dict()), None, {}, ""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}; expected a state_dict or a dict with a "
            f"'model' / 'state_dict' / 'model_state_dict' entry"
        )
    if _is_state_dict(obj):
        return dict(obj), None, {}, ""
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if _is_state_dict(inner):
            okey = next((k for k in _OPTIMIZER_KEYS if isinstance(obj.get(k), Mapping)), "")
            opt = obj[okey] if okey else None
            # PyTorch Lightning: "optimizer_states" is a list, one state_dict per optimizer
            states = obj.get("optimizer_states")
            if opt is None and isinstance(states, (list, tuple)) and len(states) == 1:
                okey, opt = "optimizer_states[0]", states[0]
                if not isinstance(opt, Mapping):
                    raise CheckpointError(
                        f"{path}: malformed optimizer state: optimizer_states[0] is a "
                        f"{type(opt).__name__}, expected a dict"
                    )
            skip = {key, *_OPTIMIZER_KEYS} | ({"optimizer_states"} if okey.startswith("optimizer_states") else set())
            meta = {k: v for k, v in obj.items() if k not in skip}
            return dict(inner), (dict(opt) if opt is not None else None), meta, okey
    # a state dict mixed with a few non-tensor extras (e.g. a version number)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) - 2 and not any(isinstance(v, Mapping) for v in obj.values()):
        return tensors, None, {k: v for k, v in obj.items() if k not in tensors}, ""
    keys = [str(k) for k in obj][:10]
    raise CheckpointError(
        f"{path} has no model weights: top-level keys are {keys}; expected a state_dict or a "
        f"dict with a 'model' / 'state_dict' / 'model_state_dict' entry"
    )


def _load_file(path: pathlib.Path, map_location: Any, allow_pickle: bool) -> tuple[dict, dict | None, dict, str, str]:
    """(state, optimizer state, metadata, optimizer key, format) of one file, format sniffed."""
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        state, meta = _safetensors_load(path, map_location)
        return state, None, meta, "", fmt
    with open(path, "rb") as fh:
        is_zip = fh.read(2) == b"PK"
    if is_zip:
        _verify_zip(path)
    obj = _torch_load(path, map_location, allow_pickle)
    state, opt, meta, okey = _split(obj, path)
    return state, opt, meta, okey, fmt


def _load_folder(path: pathlib.Path, map_location: Any, allow_pickle: bool) -> tuple[dict, dict, str]:
    """A Hugging Face ``save_pretrained`` folder: one weights file or shards listed in an index."""
    for index_name, single in _HF_LAYOUTS:
        index = path / index_name
        if os.path.lexists(index):
            _regular_file(index)
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError("weight_map is not a mapping of names to files")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index: {type(exc).__name__}: {exc}") from None
            shards = sorted(set(weight_map.values()))
            bad = [s for s in shards if pathlib.PurePath(s).name != s or s in ("", ".", "..")]
            if bad:
                raise CheckpointError(f"{index} names shard files outside its folder: {bad[:3]}")
            absent = [s for s in shards if not os.path.lexists(path / s)]
            if absent:
                raise CheckpointError(f"{index} lists shard files that are not found in {path}: {_names(absent, 3)}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                part, _, _, _, fmt = _load_file(path / shard, map_location, allow_pickle)
                expected = [k for k, v in weight_map.items() if v == shard]
                absent = [k for k in expected if k not in part]
                if absent:
                    raise CheckpointError(
                        f"{path / shard} lacks tensors that {index_name} places in it: {_names(absent, 5)}"
                    )
                twice = [k for k in part if k in state]
                if twice:
                    raise CheckpointError(f"{path / shard} repeats tensors of another shard: {_names(twice, 5)}")
                state.update(part)
            return state, {"shards": len(shards), "index": index_name}, fmt
        if os.path.lexists(path / single):
            state, _, meta, _, fmt = _load_file(path / single, map_location, allow_pickle)
            return state, meta, fmt
    looked = ", ".join(n for pair in _HF_LAYOUTS for n in pair)
    raise CheckpointError(f"{path} is a directory without model weights (looked for {looked})")


def _strip_prefixes(
    state: dict[str, torch.Tensor], model: nn.Module | None, model_keys: set[str] | None = None
) -> dict[str, torch.Tensor]:
    if model_keys is None:
        model_keys = set(model.state_dict()) if model is not None else set()
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
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


def _tie_groups(model: nn.Module) -> list[list[str]]:
    """Model state_dict keys grouped by shared storage (tied weights such as a LM head)."""
    groups: dict[tuple, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        shared = t.numel() and not t.is_meta and t.data_ptr() != 0
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if shared else (k,)
        groups.setdefault(ident, []).append(k)
    return list(groups.values())


def _covers(keys: set[str], groups: list[list[str]]) -> bool:
    return all(any(k in keys for k in g) for g in groups)


def _prefix_hint(state: Mapping[str, Any], model_keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in state:
        head = k.split(".", 1)[0] + "."
        counts[head] = counts.get(head, 0) + 1
    model_heads = {k.split(".", 1)[0] + "." for k in model_keys}
    foreign = sorted((p for p in counts if p not in model_heads), key=lambda p: -counts[p])
    if not foreign:
        return ""
    return (
        f"; the checkpoint's keys start with {', '.join(repr(p) for p in foreign[:4])}: if the "
        f"weights sit under a prefix, pass prefix={foreign[0]!r} (command line: --prefix {foreign[0]})"
    )


def _under(
    state: dict[str, torch.Tensor], prefix: str, model: nn.Module | None, model_keys: set[str] | None = None
) -> tuple[dict, list[str]]:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return _strip_prefixes(sub, model, model_keys), [k for k in state if not k.startswith(prefix)]


def _select_prefix(
    state: dict[str, torch.Tensor], model: nn.Module | None, prefix: str | None, path: pathlib.Path
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """(state under the prefix, the prefix, keys outside it) -- explicit, detected or none.

    Detection (``prefix=None`` with a model): when the keys as they are do not cover the model,
    every dotted prefix of the checkpoint keys is tried; one is used when it is the only prefix
    whose removal makes the keys cover the model (e.g. a Lightning module's ``"model."``).
    """
    if prefix is not None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if prefix == "":
            return state, "", []
        prefix = prefix if prefix.endswith(".") else prefix + "."
        sub, outside = _under(state, prefix, model)
        if not sub:
            heads = sorted({k.split(".", 1)[0] + "." for k in state})
            raise CheckpointError(
                f"{path}: no key starts with prefix {prefix!r}; the keys start with {_names(heads, 6)}"
            )
        return sub, prefix, outside
    if model is None:
        return state, "", []
    groups = _tie_groups(model)
    if _covers(set(state), groups):
        return state, "", []
    counts: dict[str, int] = {}
    for k in state:
        parts = k.split(".")[:-1]
        for i in range(1, min(len(parts), 4) + 1):
            if parts[i - 1] not in ("module", "_orig_mod"):
                p = ".".join(parts[:i]) + "."
                counts[p] = counts.get(p, 0) + 1
    model_keys = {k for g in groups for k in g}
    fits = []
    for p in sorted(p for p, n in counts.items() if n >= len(groups)):  # enough keys to cover
        sub, outside = _under(state, p, model, model_keys)
        if _covers(set(sub), groups):
            fits.append((p, sub, outside))
    if len(fits) == 1:
        return fits[0][1], fits[0][0], fits[0][2]
    if len(fits) > 1:
        raise CheckpointError(
            f"{path}: several prefixes make the keys match {type(model).__name__}: "
            f"{', '.join(repr(p) for p, _, _ in fits[:6])}; pass prefix= (command line: --prefix) "
            "to choose one"
        )
    return state, "", []


# --------------------------------------------------------------------------------------------
# MSAM: saved at the perturbed point

_FLAG_KEYS = ("perturbed", "is_perturbed", "msam_perturbed")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    text, kind = repr(value), type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{article} {kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


def _malformed(path: pathlib.Path, key: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: malformed optimizer state: {key} is {what}")


def _flag(value: Any, path: pathlib.Path, key: str) -> bool:
    """A boolean flag stored as bool, int or a one-element tensor; anything else is refused."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise _malformed(path, key, f"{_describe(value)}; expected a boolean")
        value = value.item()
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    raise _malformed(path, key, f"{_describe(value)}; expected a boolean")


def _check_optimizer(opt: Mapping[str, Any], path: pathlib.Path, okey: str) -> None:
    """Refuse an optimizer state_dict whose structure the loader cannot read (names the key)."""
    okey = okey or "optimizer"
    for key in _FLAG_KEYS:
        if key in opt:
            _flag(opt[key], path, f"{okey}[{key!r}]")
    if "sam" in opt:
        sam = opt["sam"]
        if not isinstance(sam, Mapping):
            raise _malformed(path, f"{okey}['sam']", f"{_describe(sam)}; expected a dict")
        if "perturbed" in sam:
            _flag(sam["perturbed"], path, f"{okey}['sam']['perturbed']")
    groups = opt.get("param_groups")
    if groups is not None:
        if not isinstance(groups, (list, tuple)):
            raise _malformed(path, f"{okey}['param_groups']", f"{_describe(groups)}; expected a list of dicts")
        for gi, g in enumerate(groups):
            where = f"{okey}['param_groups'][{gi}]"
            if not isinstance(g, Mapping):
                raise _malformed(path, where, f"{_describe(g)}; expected a dict")
            params = g.get("params", [])
            if not isinstance(params, (list, tuple)) or not all(
                    isinstance(p, (int, str)) and not isinstance(p, bool) for p in params):
                raise _malformed(path, f"{where}['params']", f"{_describe(params)}; expected a list of ids")
            names = g.get("param_names")
            if names is not None and not isinstance(names, (list, tuple)):
                raise _malformed(path, f"{where}['param_names']", f"{_describe(names)}; expected a list of names")
            for key in ("perturbed", "is_perturbed"):
                if key in g:
                    _flag(g[key], path, f"{where}[{key!r}]")
    per_param = opt.get("state")
    if per_param is not None:
        if not isinstance(per_param, Mapping):
            raise _malformed(path, f"{okey}['state']", f"{_describe(per_param)}; expected a dict")
        for pid, st in per_param.items():
            where = f"{okey}['state'][{pid!r}]"
            if not isinstance(st, Mapping):
                raise _malformed(path, where, f"{_describe(st)}; expected a dict")
            for key in DIRECTION_KEYS:
                if key in st and st[key] is not None and not (
                        isinstance(st[key], torch.Tensor) and st[key].is_floating_point()):
                    raise _malformed(path, f"{where}[{key!r}]", f"{_describe(st[key])}; expected a float tensor")


def _perturbed_flag(opt_state: Mapping[str, Any]) -> bool:
    """Whether an optimizer state_dict says its parameters were saved at a perturbed point.

    Assumes :func:`_check_optimizer` accepted it (flags are boolean-like).
    """
    for key in _FLAG_KEYS:
        if key in opt_state:
            return bool(_scalar(opt_state[key]))
    for g in opt_state.get("param_groups", []) or []:
        for key in ("perturbed", "is_perturbed"):
            if isinstance(g, Mapping) and key in g and bool(_scalar(g[key])):
                return True
    return False


def _scalar(x: Any) -> Any:
    return x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x


def _parameter_names(state: dict[str, torch.Tensor], model: nn.Module | None) -> list[str]:
    if model is not None:
        return [n for n, _ in model.named_parameters()]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith(buffers)]


def _strip_name(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _match_optimizer_params(
    groups: list, per_param: Mapping, order: list[tuple[Any, int]], names: list[str],
    state: Mapping[str, torch.Tensor], path: pathlib.Path, explain: str,
) -> list[str]:
    """The model parameter name of each optimizer parameter, in ``order``.

    * By name when every group records ``param_names`` (torch >= 2.5 optimizers built from
      ``model.named_parameters()``).
    * By position when there is one parameter group (an optimizer built from
      ``model.parameters()`` lists them in ``named_parameters()`` order).
    * With several groups and no names, by shape when every perturbed parameter's shape
      identifies one model parameter; otherwise the match is ambiguous and refused, since a
      wrong match would silently add another parameter's momentum.
    """
    if groups and all(isinstance(g.get("param_names"), (list, tuple))
                      and len(g["param_names"]) == len(g.get("params", [])) for g in groups):
        recorded = [_strip_name(str(n)) for g in groups for n in g["param_names"]]
        known = set(names)
        missing = [n for n in recorded if n not in known]
        if missing:
            raise CheckpointError(
                f"{path}: the optimizer names parameters the model does not have {missing[:5]}; "
                f"{explain}"
            )
        return recorded
    if len(groups) <= 1:
        return list(names)
    shapes: dict[tuple, list[str]] = {}
    for n in names:
        if n in state:
            shapes.setdefault(tuple(state[n].shape), []).append(n)
    matched: list[str] = []
    used: set[str] = set()
    for pid, _ in order:
        st = per_param.get(pid, per_param.get(str(pid), {}))
        buf = direction_buffer(st) if isinstance(st, Mapping) else None
        if buf is None:
            matched.append("")  # not perturbed: never looked up
            continue
        candidates = [n for n in shapes.get(tuple(buf.shape), []) if n not in used]
        if len(shapes.get(tuple(buf.shape), [])) != 1 or not candidates:
            raise CheckpointError(
                f"{path}: the optimizer has {len(groups)} parameter groups and records no "
                f"parameter names, and its parameter {pid} (shape {tuple(buf.shape)}) could be "
                f"any of {shapes.get(tuple(buf.shape), [])}; {explain}"
            )
        matched.append(candidates[0])
        used.add(candidates[0])
    return matched


def _unperturb(
    state: dict[str, torch.Tensor], opt_state: Mapping[str, Any], model: nn.Module | None,
    path: pathlib.Path, okey: str = "optimizer",
) -> dict[str, torch.Tensor]:
    """Move ``w~`` back to ``w = w~ + c_g * d`` for every parameter group ``g``.

    The loader's part is matching the optimizer's parameters to the weights' names; the
    move-back itself (``d`` the stored direction buffer, ``c_g`` the coefficient the optimizer
    applied, or the paper's definition from ``rho``) is :func:`msam.unperturbed_parameters`,
    whose errors are reported here in the checkpoint's own terms.
    """
    groups = [dict(g, params=list(g.get("params", []))) for g in opt_state.get("param_groups") or []]
    per_param = opt_state.get("state") or {}
    order: list[tuple[Any, int]] = []
    for gi, g in enumerate(groups):
        order += [(pid, gi) for pid in g["params"]]
    names = _parameter_names(state, model)
    explain = (
        "cannot match the optimizer state to the parameters to undo MSAM's perturbation "
        "(was the optimizer built from model.parameters()?); save after optimizer.eval(), or "
        "load with unperturb=False to take the perturbed weights as they are"
    )
    if len(order) != len(names):
        raise CheckpointError(
            f"{path}: the optimizer has {len(order)} parameters but the model {len(names)}; {explain}"
        )
    if not order:
        return state
    matched = _match_optimizer_params(groups, per_param, order, names, state, path, explain)
    # a weight the checkpoint lacks is a placeholder: an error only if it was perturbed
    weights = [state.get(name, _ABSENT) for name in matched]
    try:
        moved = unperturbed_parameters({"param_groups": groups, "state": per_param}, weights,
                                       assume_perturbed=True)
    except SavedStateError as exc:
        raise _move_back_error(exc, path, okey or "optimizer", order, matched, state, explain) from None
    out = dict(state)
    for (pid, _), name, w, new in zip(order, matched, weights, moved):
        if new is w:
            continue
        if name not in state:  # only an empty buffer matches the placeholder's shape
            raise CheckpointError(f"{path}: momentum of optimizer parameter {pid} has shape "
                                  f"{tuple(new.shape)} but {name!r} is absent; {explain}")
        out[name] = new
    return out


_ABSENT = torch.empty(0)


def _move_back_error(
    exc: SavedStateError, path: pathlib.Path, okey: str, order: list[tuple[Any, int]],
    matched: list[str], state: Mapping[str, torch.Tensor], explain: str,
) -> CheckpointError:
    """msam's refusal to move the weights back, naming the checkpoint's entry."""
    if exc.reason == "shape":
        pid, name = order[exc.position][0], matched[exc.position]
        got = tuple(state[name].shape) if name in state else "absent"
        return CheckpointError(f"{path}: momentum of optimizer parameter {pid} has shape "
                               f"{tuple(exc.value.shape)} but {name!r} is {got}; {explain}")
    if exc.reason == "buffer_not_finite":
        pid, name = order[exc.position][0], matched[exc.position]
        where, value = f"{okey}['state'][{pid!r}][{exc.key!r}] (for {name!r})", "non-finite values"
        return CheckpointError(f"{path}: optimizer state {where} holds {value}: {_NOT_FINITE}")
    where = f"{okey}['param_groups'][{exc.group}][{exc.key!r}]"
    if exc.reason == "not_finite":
        return CheckpointError(f"{path}: optimizer state {where} is {_scalar(exc.value)}: {_NOT_FINITE}")
    if exc.reason == "not_a_number":
        return _malformed(path, where, f"{_describe(exc.value)}; expected a real number")
    if exc.reason == "not_a_flag":
        return _malformed(path, where, f"{_describe(exc.value)}; expected a boolean")
    if exc.reason == "overflow":
        name = matched[exc.position]
        return CheckpointError(
            f"{path}: moving {name!r} back from MSAM's perturbed point overflows "
            f"{state[name].dtype} (coefficient {exc.value:.3g}); refused. Load with "
            "unperturb=False to take the perturbed weights as they are"
        )
    if exc.reason == "no_coefficient":
        return CheckpointError(
            f"{path}: the optimizer state says the weights are perturbed but records neither "
            "'perturbation_scale' nor 'rho'; cannot move them back (load with "
            "unperturb=False to take them as they are)"
        )
    return CheckpointError(f"{path}: {exc}")


_NOT_FINITE = ("the data needed to move MSAM's weights back is not finite (it would turn the "
               "weights into NaN); refused. Load with unperturb=False to take the perturbed "
               "weights as they are")


# --------------------------------------------------------------------------------------------
# public API


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
        state, meta, fmt = _load_folder(path, map_location, allow_pickle)
        opt_state, okey = None, ""
    else:
        state, opt_state, meta, okey, fmt = _load_file(path, map_location, allow_pickle)
    if opt_state is not None:
        _check_optimizer(opt_state, path, okey)
    state = _strip_prefixes(state, model)
    state, used_prefix, ignored = _select_prefix(state, model, prefix, path)

    sam_state = opt_state.get("sam") if isinstance(opt_state, Mapping) else None
    if isinstance(sam_state, Mapping) and bool(_scalar(sam_state.get("perturbed", False))):
        raise CheckpointError(
            f"{path} was saved between SAM's first_step() and second_step(): its weights are at "
            "the ascent point w + e, not at w; save after second_step() (or after "
            "optimizer.unperturb())"
        )
    perturbed = bool(opt_state) and _perturbed_flag(opt_state)  # type: ignore[arg-type]
    unperturbed = False
    if perturbed and unperturb:
        state = _unperturb(state, opt_state, model, path, okey)  # type: ignore[arg-type]
        unperturbed = True

    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    if model is not None:
        target = model.state_dict()
        tied = {k: g for g in _tie_groups(model) for k in g}
        missing = [k for k in target if k not in state and not any(j in state for j in tied.get(k, ()))]
        unexpected = [k for k in state if k not in target]
        mismatched = [
            (k, tuple(state[k].shape), tuple(target[k].shape))
            for k in state
            if k in target and tuple(state[k].shape) != tuple(target[k].shape)
        ]
        bad = {k for k, _, _ in mismatched}
        loadable = {k: v for k, v in state.items() if k in target and k not in bad}
        if not loadable and target:
            raise CheckpointError(
                f"{path} matches none of {type(model).__name__}'s keys (nothing would be loaded): "
                f"checkpoint keys {_names(list(state), 4)}; model keys {_names(list(target), 4)}"
                + ("; shape mismatches on every common key" if mismatched else "")
                + _prefix_hint(state, list(target))
            )
        if strict and (missing or unexpected or mismatched):
            parts = []
            if missing:
                parts.append(f"missing keys: {_names(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_names(unexpected)}")
            if mismatched:
                parts.append(
                    "shape mismatches: "
                    + _names([f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in mismatched])
                )
            raise CheckpointError(
                f"{path} does not match {type(model).__name__}: " + "; ".join(parts)
                + (_prefix_hint(state, list(target)) if unexpected else "")
            )
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


def find_checkpoints(paths: list[str | pathlib.Path]) -> list[pathlib.Path]:
    """Expand files and directories into a sorted list of checkpoint files.

    A directory contributes its files ending in one of :data:`CHECKPOINT_SUFFIXES` (not
    recursive; regular files only); a Hugging Face ``save_pretrained`` folder (it holds ``model.safetensors``,
    ``pytorch_model.bin`` or their ``.index.json``) is one checkpoint, returned as the folder.
    Raises ``FileNotFoundError`` for a missing path and ``CheckpointError`` for a directory
    without checkpoints.
    """
    out: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if not os.path.lexists(p):
            raise FileNotFoundError(f"checkpoint not found: {p}")
        if p.is_dir():
            if any(os.path.lexists(p / name) for pair in _HF_LAYOUTS for name in pair):
                out.append(p)
                continue
            # a scan takes regular files only (a FIFO or socket named x.pt is skipped, never opened)
            found = sorted(q for q in p.iterdir() if q.suffix in CHECKPOINT_SUFFIXES and q.is_file())
            if not found:
                raise CheckpointError(
                    f"no checkpoints in directory {p} (looked for {', '.join(CHECKPOINT_SUFFIXES)})"
                )
            out += found
        else:
            out.append(p)
    return out
