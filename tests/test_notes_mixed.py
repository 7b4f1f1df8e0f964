"""The python blocks of docs/notes/mixed.md run as they are (issue 27: their asserts check the
tracker's data forms, autocast, the bfloat16 floor, the products' memory estimate and the ReLU
kinks against independent computations)."""

from __future__ import annotations

import pathlib
import re

import pytest

NOTES = pathlib.Path(__file__).resolve().parents[1] / "docs" / "notes" / "mixed.md"
BLOCKS = re.findall(r"```python\n(.*?)```", NOTES.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_notes_block_runs(index):
    exec(compile(BLOCKS[index], f"{NOTES.name}[{index}]", "exec"), {"__name__": "__main__"})
