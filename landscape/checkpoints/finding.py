"""Finding checkpoints: files and folders expanded into the checkpoints they hold."""

from __future__ import annotations

import os
import pathlib

from .formats import HF_LAYOUTS
from .result import CheckpointError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


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
            if any(os.path.lexists(p / name) for pair in HF_LAYOUTS for name in pair):
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
