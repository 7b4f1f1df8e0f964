"""Reading one file safely: a regular file only (``os.stat``, never opened otherwise), the
format sniffed by content (:func:`checkpoint_format`), the CRC-32 of a torch zip verified,
``torch.load(weights_only=True)`` with unsafe pickles refused, safetensors."""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import stat
import zipfile
from typing import Any

import torch

from .result import CheckpointError, UnsafeCheckpointError, short_list


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


def regular_file(path: pathlib.Path) -> int:
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
    size = regular_file(path)
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


def verify_zip(path: pathlib.Path) -> None:
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
                    f"{short_list(names, 5)}), not a PyTorch file"
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


# the opcodes pickle protocols 4 and 5 added (torch's weights_only unpickler reads protocol 2)
_PROTOCOL_4_OPCODES = {140: "SHORT_BINUNICODE", 141: "BINUNICODE8", 142: "BINBYTES8",
                       144: "ADDITEMS", 145: "FROZENSET", 146: "NEWOBJ_EX", 147: "STACK_GLOBAL",
                       148: "MEMOIZE", 149: "FRAME", 150: "BYTEARRAY8", 151: "NEXT_BUFFER",
                       152: "READONLY_BUFFER"}


def torch_load(path: pathlib.Path, map_location: Any, allow_pickle: bool) -> Any:
    try:
        # an open file, not the path: torch.load dispatches on a ".safetensors" suffix itself
        with open(path, "rb") as fh:
            return torch.load(fh, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        op = re.search(r"Unsupported operand (\d+)", str(exc))
        if op and int(op.group(1)) in _PROTOCOL_4_OPCODES:
            raise UnsafeCheckpointError(
                f"refused to load {path}: it is a pickle of protocol 4 or 5 (opcode {op.group(1)} "
                f"= {_PROTOCOL_4_OPCODES[int(op.group(1))]}; torch.save(..., pickle_protocol=4 or "
                "5)), which torch's safe weights_only loader does not read; nothing in it was run. "
                "Re-save it "
                "with torch.save's default protocol (torch.save(torch.load(f, weights_only=False), "
                "f) where you trust it), or pass allow_pickle=True (command line: --trust-pickle) "
                "if you created it yourself") from None
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


def safetensors_load(path: pathlib.Path, map_location: Any) -> tuple[dict, dict]:
    """The tensors and the metadata of a safetensors file, read onto ``map_location``; a damaged
    file raises :class:`CheckpointError` naming the path and the cause."""
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
