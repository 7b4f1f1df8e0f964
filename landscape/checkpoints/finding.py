"""Finding checkpoints: files and folders expanded into the checkpoints they hold."""

from __future__ import annotations

import os
import pathlib
import re

from .formats import HF_LAYOUTS
from .result import CheckpointError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def find_checkpoints(paths: list[str | pathlib.Path]) -> list[pathlib.Path]:
    """Expand files and directories into a sorted list of checkpoint files.

    A directory contributes its files ending in one of :data:`CHECKPOINT_SUFFIXES` (not
    recursive; regular files only); a Hugging Face ``save_pretrained`` folder (it holds ``model.safetensors``,
    ``pytorch_model.bin`` or their ``.index.json``) is one checkpoint, returned as the folder.
    A directory's sub-folders that are such folders are checkpoints too (a Hugging Face Trainer
    output folder holds ``checkpoint-500/``, ``checkpoint-1000/``...), in natural order (500
    before 1000), after the files.
    Raises ``FileNotFoundError`` for a missing path and ``CheckpointError`` for a directory
    without checkpoints.
    """
    out: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if not os.path.lexists(p):
            raise FileNotFoundError(f"checkpoint not found: {p}")
        if p.is_dir():
            if _is_weights_folder(p):
                out.append(p)
                continue
            # a scan takes regular files only (a FIFO or socket named x.pt is skipped, never opened)
            found = sorted(q for q in p.iterdir() if q.suffix in CHECKPOINT_SUFFIXES and q.is_file())
            found += sorted((q for q in p.iterdir() if q.is_dir() and _is_weights_folder(q)),
                            key=_natural_key)
            if not found:
                raise CheckpointError(
                    f"no checkpoints in directory {p} (looked for {', '.join(CHECKPOINT_SUFFIXES)})"
                )
            out += found
        else:
            out.append(p)
    return out


def _is_weights_folder(p: pathlib.Path) -> bool:
    """A Hugging Face ``save_pretrained`` or Trainer ``checkpoint-N`` folder."""
    return any(os.path.lexists(p / name) for pair in HF_LAYOUTS for name in pair)


def _natural_key(p: pathlib.Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
