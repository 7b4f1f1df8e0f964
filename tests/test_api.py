"""Every exported name resolves, and every exported function/class is documented."""

import importlib
import inspect

import pytest

PACKAGES = ["msam", "analysis", "landscape"]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_resolve_and_are_documented(package):
    mod = importlib.import_module(package)
    assert mod.__all__, f"{package}.__all__ is empty"
    assert len(set(mod.__all__)) == len(mod.__all__), "duplicate names in __all__"
    undocumented = []
    for name in mod.__all__:
        obj = getattr(mod, name)  # AttributeError names the missing export
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
            undocumented.append(name)
    assert not undocumented, f"{package}: no docstring for {undocumented}"


def test_console_script_entry_point_runs(capsys):
    # the `landscape` script named in pyproject resolves and answers --help with exit code 0
    import pathlib

    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["landscape"].partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("sharpness", "hessian", "slice", "report", "demo", "reproduce"):
        assert command in out, f"`landscape --help` does not list {command!r}"
