"""Every ```python block of the README and of the docs site (docs/**/*.md) runs as written.

Each page runs in its own namespace, its blocks top to bottom, in a temporary working directory,
on CPU; the test id is the page's path (``README.md``, ``guides/hessian.md``, ...), and a failure
names the block and the heading above it.

A block that is not meant to run (it needs a GPU, a data set on disk, a package outside the
``make test`` extras) starts with the comment line ``# not executed here: <reason>``: it is only
compiled, so its syntax stays checked. Every other ```python block runs; a fence spelled
otherwise (```py, ```python3, an indented ```python) is refused rather than silently left out.

``docs/gallery/`` is left out: ``make docs`` generates it from examples/*.ipynb by executing them
(and tests/landscape/test_notebook.py runs the notebooks).
"""

import pathlib
import re

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = DOCS / "gallery"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
SKIP = re.compile(r"\A# not executed here: *(.*)")
# fences that would look like Python to a reader but that the collector does not run
EVASIVE = re.compile(r"^[ \t]*```[ \t]*(py|python3|pycon|ipython|Python)\b|^[ \t]+```python", re.M)


def pages() -> list[pathlib.Path]:
    docs = sorted(p for p in DOCS.rglob("*.md") if GENERATED not in p.parents)
    return [ROOT / "README.md", *docs]


def page_id(path: pathlib.Path) -> str:
    return str(path.relative_to(DOCS if DOCS in path.parents else ROOT))


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """``(heading, code, skip_reason)`` for every ```python fence, in order.

    ``heading`` is the last Markdown heading above the fence; ``skip_reason`` is the reason of a
    ``# not executed here: ...`` first line, else None.
    """
    out = []
    for m in FENCE.finditer(text):
        heads = HEADING.findall(_outside_fences(text[: m.start()]))
        m_skip = SKIP.match(m.group(1))
        out.append((heads[-1] if heads else "top", m.group(1),
                    m_skip.group(1).strip() if m_skip else None))
    return out


def _outside_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


PAGES = {page_id(p): p for p in pages()}
RUNNABLE = sorted(name for name, p in PAGES.items()
                  if any(skip is None for _, _, skip in blocks(p.read_text())))


def test_the_collector_sees_runs_and_skips():
    text = ("# Page\n\n## First\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n\n## Second\n\n"
            "```python\n# not executed here: needs a GPU\nimport cuda_thing\n```\n")
    assert blocks(text) == [("First", "x = 1\n", None),
                            ("Second", "# not executed here: needs a GPU\nimport cuda_thing\n",
                             "needs a GPU")]
    assert EVASIVE.search("```py\nx\n```") and EVASIVE.search("  ```python\nx\n  ```")
    assert not EVASIVE.search("```python\nx\n```\n```bash\nls\n```")


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_python_fence_is_collected(name):
    # a fence the parser misses (a typo in its opening line, an unclosed block, a ```py) is never
    # run: the blocks collected must be every ```python fence of the page, each non-empty
    text = PAGES[name].read_text()
    assert not EVASIVE.findall(text), f"{name}: a Python fence the tests would not run"
    opened = len(re.findall(r"^```python$", text, flags=re.M))
    found = blocks(text)
    assert len(found) == opened, f"{opened} python fences in {name}, {len(found)} collected"
    assert all(code.strip() for _, code, _ in found)
    for heading, code, skip in found:
        if skip is not None:
            assert skip, f"{name} [{heading}]: '# not executed here:' needs a reason"
            compile(code, f"{name}[{heading}]", "exec")  # kept syntactically valid


def test_the_pages_hold_code_to_run():
    assert "README.md" in RUNNABLE and len(RUNNABLE) >= 10, RUNNABLE


@pytest.mark.parametrize("name", RUNNABLE)
def test_page_runs(name, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, (heading, code, skip) in enumerate(blocks(PAGES[name].read_text())):
        if skip is not None:
            continue
        try:
            exec(compile(code, f"{name}[{heading}, python block {i}]", "exec"), namespace)
        except Exception as exc:  # the message is the point
            pytest.fail(f"{name} [{heading}], python block {i} failed: "
                        f"{type(exc).__name__}: {exc}\n{code}")
    import matplotlib.pyplot as plt

    plt.close("all")


def test_readme_is_short_and_its_quick_start_trains_with_msam():
    # issue 23: a README of at most 200 lines whose quick start (at most 20 lines) trains with
    # MSAM, then measures lambda_max and draws a slice; the rest lives in docs/
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    quick = text.split("## Quick start", 1)[1]
    code = FENCE.search(quick).group(1)
    assert len(code.splitlines()) <= 20, code
    for needed in ("from msam import MSAM", "top_eigenpairs(", "slice_1d(", "opt.step()"):
        assert needed in code, needed
    assert "make demo" in text and "make test" in text


def _defaults_table() -> dict[tuple[str, str], tuple[str, str]]:
    """docs/cli.md's table of shared defaults: (command, option) -> (default, Python counterpart)."""
    text = (DOCS / "cli.md").read_text()
    table = text.split("| command | option | default | Python counterpart |", 1)[1]
    out = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        command, options, defaults, python = (c.strip() for c in line.strip("|").split(" | "))
        options = re.findall(r"`(--[\w-]+)`", options)
        values = defaults.split(", ") if len(options) > 1 else [defaults.split(", ")[0]]
        assert len(values) == len(options), line
        for option, value in zip(options, values):
            out[(command.strip("`").replace("all", "*"), option)] = (value, python)
    return out


def test_the_cli_page_shows_the_shared_defaults():
    # docs/cli.md shows landscape.defaults.DEFAULTS (the one table the CLI and the Python API
    # take their defaults from): every row is there with its value and its Python function
    from landscape.defaults import DEFAULTS

    shown = _defaults_table()
    assert len(shown) == len(DEFAULTS), sorted(shown)
    for d in DEFAULTS:
        value, python = shown[(d.command, d.option)]
        if isinstance(d.value, tuple):
            assert [float(v) for v in value.split()] == list(d.value), (d.option, value)
        elif isinstance(d.value, str):
            assert value == d.value, (d.option, value)
        else:
            assert float(value) == d.value, (d.option, value)
        assert d.function.split(":")[1] + "(" in python, (d.option, python)
        for parameter in d.parameter.split(","):
            assert parameter + "=" in python, (d.option, parameter, python)
