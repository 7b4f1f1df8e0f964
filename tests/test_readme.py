"""The README's Python examples run as written.

Each ``## `` section runs in its own namespace (its fences top to bottom), in a temporary
working directory, on CPU.
"""

import pathlib
import re

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _sections() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    out: dict[str, list[str]] = {}
    for chunk in re.split(r"^(?=## )", text, flags=re.M):
        title = chunk.splitlines()[0].lstrip("# ").strip() if chunk.startswith("## ") else "intro"
        blocks = FENCE.findall(chunk)
        if blocks:
            out[title] = blocks
    return out


SECTIONS = _sections()


def test_every_python_fence_is_run():
    # a fence the parser misses (a typo in its opening line, an unclosed block) is never run:
    # the blocks collected must be every ```python fence the README has, and non-empty
    text = (ROOT / "README.md").read_text()
    opened = len(re.findall(r"^```python$", text, flags=re.M))
    collected = sum(len(blocks) for blocks in SECTIONS.values())
    assert collected == opened, f"{opened} python fences in the README, {collected} collected"
    assert all(code.strip() for blocks in SECTIONS.values() for code in blocks)
    assert opened > 0


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_readme_section_runs(title, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(SECTIONS[title]):
        try:
            exec(compile(code, f"README.md[{title}, python block {i}]", "exec"), namespace)
        except Exception as exc:  # the message is the point
            pytest.fail(f"README section {title!r}, python block {i} failed: "
                        f"{type(exc).__name__}: {exc}\n{code}")
    import matplotlib.pyplot as plt

    plt.close("all")
