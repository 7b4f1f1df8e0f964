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


def test_every_listed_name_of_every_module_is_documented():
    # a submodule's __all__ holds the names only it exports (tests/test_import_paths.py)
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    undocumented = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            try:
                mod = importlib.import_module(name)
            except ModuleNotFoundError as exc:  # an integration whose framework is absent
                if exc.name and exc.name.split(".")[0] in PACKAGES:
                    raise
                continue
            for public in getattr(mod, "__all__", ()):
                obj = getattr(mod, public)
                if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
                    undocumented.append(f"{name}.{public}")
    assert not undocumented, f"no docstring for {undocumented}"


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
